"""The metadata journal: commit/replay, incomplete and damaged transactions, checkpoints, revokes."""

import hashlib

import pytest

from kernel import param
from kernel.core.journal import Journal, JournalDamaged, JournalError, format_journal
from kernel.hw.blockdev import BlockDevice

B = param.BLOCK_SIZE
NBLOCKS = 400
JSTART, JLEN = 10, 64
SEED = 0x1234ABCD


class Crash(Exception):
    pass


@pytest.fixture
def img(tmp_path):
    p = str(tmp_path / "disk.img")
    with open(p, "wb") as f:
        f.truncate(NBLOCKS * B)
    with BlockDevice(p, "none", delay=False) as dev:
        format_journal(dev, JSTART, JLEN, SEED)
    return p


def open_journal(path, **kw):
    dev = BlockDevice(path, "none", write_cache=True, delay=False)
    return dev, Journal(dev, JSTART, JLEN, SEED, **kw)


def blk(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (B // 4)


def file_block(path, b) -> bytes:
    with open(path, "rb") as f:
        f.seek(b * B)
        return f.read(B)


def poke(path, b, offset, data) -> None:
    with open(path, "r+b") as f:
        f.seek(b * B + offset)
        f.write(data)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def power_loss(dev) -> None:
    dev.crash()
    dev.close()


def test_commit_then_replay_after_power_loss(img):
    dev, j = open_journal(img)
    assert j.replay().transactions == 0
    t1 = j.commit({100: blk(1), 101: blk(2)})
    t2 = j.commit({100: blk(3), 150: blk(4)})
    assert t2 == t1 + 1
    power_loss(dev)  # committed, never checkpointed
    assert file_block(img, 100) == bytes(B)  # home locations untouched so far
    dev, j = open_journal(img)
    scan = j.replay()
    assert scan.transactions == 2 and set(scan.blocks) == {100, 101, 150}
    assert [dev.read(b) for b in (100, 101, 150)] == [blk(3), blk(2), blk(4)]
    assert j.next_tid == t2 + 1
    power_loss(dev)
    assert file_block(img, 100) == blk(3)  # replay flushed its writes
    dev, j = open_journal(img)
    assert j.replay().transactions == 0  # the log was reset after replay
    assert j.commit({120: blk(5)}) == t2 + 1  # tids keep increasing across mounts
    dev.close()


def test_a_log_of_many_transactions_is_scanned_in_a_few_device_requests(img):
    dev, j = open_journal(img)
    for i in range(20):  # 3 blocks each: descriptor, copy, commit; 60 of the log's 63
        j.commit({100 + i: blk(i)})
    power_loss(dev)
    dev, j = open_journal(img)
    before = dev.stats["requests"]
    scan = j.scan()
    # read ahead (windows of 8, 16, 32, then the rest): 4 requests where block by block
    # took 2 per transaction
    assert dev.stats["requests"] - before == 4
    assert scan.transactions == 20 and scan.blocks == {100 + i: blk(i) for i in range(20)}
    dev.close()


def test_transaction_without_commit_block_is_discarded(img):
    dev, j = open_journal(img)
    j.replay()
    j.commit({100: blk(1)})
    real_write = dev.write
    writes = []

    def crash_before_commit_block(b, data):
        writes.append(b)
        if len(writes) == 2:  # 1: descriptor + copies, 2: the commit block
            raise Crash()
        real_write(b, data)

    dev.write = crash_before_commit_block
    with pytest.raises(Crash):
        j.commit({100: blk(2), 200: blk(3)})
    power_loss(dev)  # descriptor + copies were flushed, no commit
    dev, j = open_journal(img)
    scan = j.replay()
    assert scan.transactions == 1
    assert "no commit block" in scan.discarded
    assert dev.read(100) == blk(1) and dev.read(200) == bytes(B)
    dev.close()


def test_commit_block_with_another_tid_ends_the_log(img):
    dev, j = open_journal(img)
    j.replay()
    j.commit({100: blk(1)})  # descriptor @1, copy @2, commit @3
    j.commit({100: blk(2)})  # descriptor @4, copy @5, commit @6
    power_loss(dev)
    poke(img, JSTART + 6, 0, file_block(img, JSTART + 3))  # transaction 1's commit block
    dev, j = open_journal(img)
    scan = j.replay()
    assert scan.transactions == 1 and dev.read(100) == blk(1)
    dev.close()


@pytest.mark.parametrize("where", ["copy_of_last", "copy_of_first", "descriptor_entry"])
def test_damaged_committed_transaction_is_refused_and_nothing_written(img, where):
    dev, j = open_journal(img)
    j.replay()
    j.commit({100: blk(1), 101: blk(2)})  # desc @1, copies @2-3, commit @4
    j.commit({102: blk(3)})  # desc @5, copy @6, commit @7
    power_loss(dev)
    target = {
        "copy_of_last": JSTART + 6,
        "copy_of_first": JSTART + 3,
        "descriptor_entry": JSTART + 5,
    }[where]
    offset = 32 if where == "descriptor_entry" else 1000
    old = file_block(img, target)[offset]
    poke(img, target, offset, bytes([old ^ 0x40]))
    before = digest(img)
    dev, j = open_journal(img)
    with pytest.raises(JournalDamaged) as ei:
        j.replay()
    msg = str(ei.value)
    if where == "descriptor_entry":
        assert f"journal block {target}" in msg and "has a commit block" in msg
    else:
        commit = JSTART + (7 if where == "copy_of_last" else 4)
        assert f"journal block {commit}" in msg and "do not match the commit checksum" in msg
    power_loss(dev)
    assert digest(img) == before  # validated first: not one block was applied
    assert file_block(img, 100) == bytes(B)


@pytest.mark.parametrize(
    "damage,words", [("magic", "bad magic"), ("sequence", "checksum mismatch")]
)
def test_bad_journal_superblock_is_refused(img, damage, words):
    dev, j = open_journal(img)
    j.replay()
    j.commit({100: blk(1)})
    power_loss(dev)
    poke(img, JSTART, 0 if damage == "magic" else 20, b"\xff")
    before = digest(img)
    dev, j = open_journal(img)
    with pytest.raises(JournalDamaged, match=f"journal superblock \\(block {JSTART}\\): {words}"):
        j.replay()
    power_loss(dev)
    assert digest(img) == before


def test_journal_of_another_file_system_is_refused(img):
    dev = BlockDevice(img, "none", delay=False)
    with pytest.raises(JournalDamaged, match="another file system"):
        Journal(dev, JSTART, JLEN, SEED + 1).replay()
    dev.close()


def test_checkpoint_when_full_writes_home_and_restarts_the_log(img):
    dev, j = open_journal(img)
    j.replay()
    assert j.capacity_blocks == JLEN - 1 and j.max_txn_blocks == int(param.MAX_TXN_FRACTION * 63)
    want = {}
    for t in range(12):  # 12 x (1 + 10 + 1) blocks: far more than 63
        blocks = {200 + (t * 7 + k) % 40: blk(1000 * t + k) for k in range(10)}
        j.commit(blocks)
        want.update(blocks)
        assert j.used_blocks <= j.capacity_blocks
    assert j.stats["checkpoints"] >= 2
    checkpointed = [b for b in want if file_block(img, b) != bytes(B)]
    assert checkpointed, "a full journal must have written blocks home"
    power_loss(dev)
    dev, j = open_journal(img)
    j.replay()
    for b, data in want.items():
        assert dev.read(b) == data, b
    dev.close()


def test_explicit_checkpoint_empties_the_log(img):
    dev, j = open_journal(img)
    j.replay()
    j.commit({100: blk(1)})
    j.checkpoint()
    assert j.used_blocks == 0 and j.pending_checkpoint == 0
    power_loss(dev)
    assert file_block(img, 100) == blk(1)
    dev, j = open_journal(img)
    assert j.replay().transactions == 0
    dev.close()


def test_oversized_transaction_is_never_built(img):
    dev, j = open_journal(img)
    j.replay()
    too_many = {200 + k: blk(k) for k in range(j.max_txn_entries + 1)}
    with pytest.raises(JournalError, match="exceeds the journal's limit"):
        j.commit(too_many)
    assert j.used_blocks == 0
    j.commit({200 + k: blk(k) for k in range(j.max_txn_entries)})  # the limit itself fits
    assert j.used_blocks <= j.max_txn_blocks
    dev.close()


def test_journal_refuses_its_own_region_and_block_zero(img):
    dev, j = open_journal(img)
    j.replay()
    for bad in (0, JSTART, JSTART + 5, NBLOCKS):
        with pytest.raises(JournalError, match="not a metadata block"):
            j.commit({bad: blk(1)})
    dev.close()


@pytest.mark.parametrize("revoke", [True, False])
def test_revoke_keeps_replay_off_a_reused_block(img, revoke):
    dev, j = open_journal(img)
    j.replay()
    j.commit({300: blk(7), 301: blk(8)})  # 300 is an indirect block, say
    # 300 is freed (a revoke record if asked), then reused as file data, written in place
    j.commit({301: blk(9)}, revoked=[300] if revoke else [])
    dev.write(300, blk(0xDA7A))
    dev.flush()
    power_loss(dev)
    dev, j = open_journal(img)
    j.replay()
    assert dev.read(300) == (blk(0xDA7A) if revoke else blk(7))
    assert dev.read(301) == blk(9)
    dev.close()
