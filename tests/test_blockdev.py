"""The block device: model accounting, volatile write cache, exclusive ownership, ranges."""

import os
import signal
import subprocess
import sys

import pytest

from kernel import param
from kernel.hw.blockdev import BlockDevice, DeviceError

B = param.BLOCK_SIZE
NBLOCKS = 64


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(NBLOCKS * B)
    return str(p)


def blk(c: int, n: int = 1) -> bytes:
    return bytes([c]) * (B * n)


def file_block(path: str, b: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(b * B)
        return f.read(B)


def test_model_accounting_per_request(img):
    lat, bw = param.DEVICE_MODELS["ssd"]
    with BlockDevice(img, "ssd", delay=False) as dev:
        assert dev.nblocks == NBLOCKS and dev.model == "ssd"
        dev.read(3)
        assert dev.stats["modeled_s"] == pytest.approx(lat + B / bw)
        dev.write(5, blk(1, 4))
        assert dev.stats["modeled_s"] == pytest.approx(2 * lat + 5 * B / bw)
        dev.flush()
        want = 2 * lat + 5 * B / bw + param.FLUSH_LATENCY_FACTOR * lat
        assert dev.stats["modeled_s"] == pytest.approx(want)
        assert dev.stats["requests"] == 2 and dev.stats["flushes"] == 1
        assert dev.stats["bytes_read"] == B and dev.stats["bytes_written"] == 4 * B


def test_every_model_charges_latency_plus_transfer(img):
    for model, (lat, bw) in param.DEVICE_MODELS.items():
        with BlockDevice(img, model, delay=False) as dev:
            dev.read(0, 8)
            transfer = 8 * B / bw if bw else 0.0
            assert dev.stats["modeled_s"] == pytest.approx(lat + transfer)


def test_model_none_costs_nothing_even_with_delay(img):
    with BlockDevice(img, "none", delay=True) as dev:
        for i in range(50):
            dev.write(i, blk(i))
        dev.flush()
        assert dev.stats["modeled_s"] == 0.0


def test_delay_true_accounts_the_same_as_delay_false(img):
    lat, bw = param.DEVICE_MODELS["nvme"]
    with BlockDevice(img, "nvme", delay=True) as dev:
        dev.write(1, blk(7, 2))
        dev.read(1, 2)
        assert dev.stats["modeled_s"] == pytest.approx(2 * (lat + 2 * B / bw))
        assert dev.read(2) == blk(7)


def test_unknown_model_is_refused(img):
    with pytest.raises(ValueError, match="unknown device model 'floppy'"):
        BlockDevice(img, "floppy")


def test_without_write_cache_writes_reach_the_image_at_once(img):
    with BlockDevice(img, "none", delay=False) as dev:
        dev.write(4, blk(9))
        assert file_block(img, 4) == blk(9)  # before any flush
        dev.crash()  # nothing volatile to lose
        assert dev.read(4) == blk(9)


def test_write_cache_crash_drops_exactly_the_unflushed_writes(img):
    dev = BlockDevice(img, "none", write_cache=True, delay=False)
    dev.write(1, blk(1))
    dev.write(2, blk(2))
    dev.flush()
    dev.write(2, blk(22))  # overwrite of a flushed block
    dev.write(3, blk(3, 2))  # two new blocks
    assert dev.read(1, 4) == blk(1) + blk(22) + blk(3, 2)  # reads see the cache
    assert file_block(img, 2) == blk(2) and file_block(img, 3) == bytes(B)
    assert dev.unflushed == 3
    dev.crash()
    assert dev.read(1, 4) == blk(1) + blk(2) + bytes(2 * B)
    assert file_block(img, 2) == blk(2)
    dev.write(5, blk(5))
    dev.flush()
    assert file_block(img, 5) == blk(5)
    dev.close()


def test_close_writes_the_cache_out(img):
    dev = BlockDevice(img, "none", write_cache=True, delay=False)
    dev.write(6, blk(6))
    dev.close()
    assert file_block(img, 6) == blk(6)


def test_second_open_is_refused_while_the_first_holds_the_disk(img):
    first = BlockDevice(img, "none", delay=False)
    with pytest.raises(DeviceError, match="owned by another kernel") as ei:
        BlockDevice(img, "none", delay=False)
    assert img in str(ei.value)
    first.close()
    BlockDevice(img, "none", delay=False).close()  # free again once closed


def test_non_exclusive_opens_do_not_lock(img):
    a = BlockDevice(img, "none", delay=False, exclusive=False)
    b = BlockDevice(img, "none", delay=False, exclusive=False)
    a.close()
    b.close()


def test_dead_owner_process_releases_the_disk(img):
    code = (
        "import sys, time; from kernel.hw.blockdev import BlockDevice; "
        "d = BlockDevice(sys.argv[1], 'none', delay=False); print('ready', flush=True); "
        "time.sleep(60)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, img],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        with pytest.raises(DeviceError, match="owned by another kernel"):
            BlockDevice(img, "none", delay=False)
        p.send_signal(signal.SIGKILL)  # the owning kernel dies
        p.wait(timeout=10)
        BlockDevice(img, "none", delay=False).close()  # the lock died with it: takeover works
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize(
    "op", ["read_past_end", "read_run_past_end", "write_negative", "write_past_end"]
)
def test_out_of_range_blocks_are_refused(img, op):
    with BlockDevice(img, "none", delay=False) as dev:
        with pytest.raises(DeviceError) as ei:
            if op == "read_past_end":
                dev.read(NBLOCKS)
            elif op == "read_run_past_end":
                dev.read(NBLOCKS - 2, 3)
            elif op == "write_negative":
                dev.write(-1, blk(0))
            else:
                dev.write(NBLOCKS - 1, blk(0, 2))
        msg = str(ei.value)
        bad = {
            "read_past_end": NBLOCKS,
            "read_run_past_end": NBLOCKS,
            "write_negative": -1,
            "write_past_end": NBLOCKS,
        }[op]
        assert f"block {bad} out of range (device has {NBLOCKS} blocks)" in msg
        assert dev.stats["requests"] == 0  # a refused request costs nothing


def test_misaligned_write_is_refused(img):
    with BlockDevice(img, "none", delay=False) as dev:
        with pytest.raises(DeviceError, match="not a positive multiple of 4096"):
            dev.write(0, b"x" * 100)
