"""The metadata write-ahead journal, ordered mode (jbd/ext3-like).

Promises to the file system (kernel/core/fs.py), to fsck and to whoever mounts after a crash:

* ``commit(blocks, revoked)`` makes a set of metadata blocks durable atomically: once it
  returns, a crash at any later point replays all of them or, before it returns, none.
  Write order: descriptor block(s) + block copies, flush, commit block, flush. Ordered
  mode is the caller's half: data blocks are written before commit() is called (the
  first flush covers them);
* committed blocks stay in memory (newest copy per block) until ``checkpoint()`` writes
  them to their home locations, flushes and resets the log to the start of the region
  (sequence = next tid). A transaction that does not fit in what is left of the region
  checkpoints first. No transaction is larger than ``max_txn_blocks`` (MAX_TXN_FRACTION of
  ``capacity_blocks``): the file system commits before it holds more than
  ``max_txn_entries`` blocks, and commit() refuses a larger one (JournalError);
* ``revoked``: blocks freed in this transaction. If an older copy of one is still in the
  log, a revoke record is written so that replay never writes a stale metadata copy over
  a block that has since become file data;
* ``replay()`` at mount validates the whole log first, then applies, flushes and resets it.
  A transaction whose commit block is absent or carries another tid ends the log: it was
  incomplete and is discarded. A committed transaction whose contents do not match its
  commit block's checksum, or a bad journal superblock, is damage: JournalDamaged names the
  block and what is wrong, and NOTHING has been written. The scan reads the log ahead
  (``ReadAhead``): a few device requests for a log of many small transactions.

Layout of the region (journal_start .. journal_start+journal_len-1 of the device):

    +0    journal superblock  magic, version, block size, length, start, sequence, seed, xxh32
    +start ...  transactions, back to back, tids increasing by one from `sequence`:
          [descriptor 0..k-1][copy 0 .. copy n-1][commit]
          descriptor: magic, ndesc, tid, index, nentries, xxh32 | entries (home block u32,
                      flags u32; flag REVOKE = no copy follows)
          commit:     magic, tid, nblocks (descriptors+copies), xxh3-64 of those blocks, xxh32
    (a block after the last transaction is whatever was there: its tid is older, so it
    ends the log)

JournalDamaged messages: "journal superblock (block B): bad magic …" / "…: checksum mismatch
…"; "journal block B (commit of transaction T): contents of journal blocks X..Y do not match
the commit checksum (stored …, computed …)"; "journal block B: descriptor of transaction T:
…, but the transaction has a commit block at block C"; "… names home block H, outside the
file system's metadata area".

Every checksum is seeded with the file system's csum_seed, so a journal block from another
file system (or a symlink body imitating one) never passes.
"""

from __future__ import annotations

import errno
import math
import struct
from dataclasses import dataclass, field
from typing import Callable

import xxhash

from kernel import param
from kernel.core.disklayout import FsError

BSIZE = param.BLOCK_SIZE
JSB_MAGIC, DESC_MAGIC, COMMIT_MAGIC = 0x4A534243, 0x44534243, 0x43534243  # "CBSJ" "CBSD" "CBSC"
JOURNAL_VERSION = 1
REVOKE = 0x1

_JSB = struct.Struct("<IIIIIQI")  # magic, version, bsize, length, start, sequence, seed
_DESC = struct.Struct("<IIQII")  # magic, ndesc, tid, index, nentries
_DESC_HDR = 32  # header + xxh32, padded
_ENTRY = struct.Struct("<II")
ENTRIES_PER_DESC = (BSIZE - _DESC_HDR) // _ENTRY.size
_COMMIT = struct.Struct("<IIQIIQ")  # magic, 0, tid, nblocks, 0, xxh3-64 of the transaction
_U32 = struct.Struct("<I")


class JournalDamaged(FsError):
    """The log is damaged: mounting would trust garbage. Nothing was written."""

    def __init__(self, msg: str):
        super().__init__(errno.EUCLEAN, msg)


class JournalError(RuntimeError):
    """The journal was used against its contract (a transaction too large, a bad block)."""


def _h32(data, seed: int) -> int:
    return xxhash.xxh32_intdigest(data, seed)


def pack_jsb(length: int, start: int, sequence: int, seed: int) -> bytes:
    body = _JSB.pack(JSB_MAGIC, JOURNAL_VERSION, BSIZE, length, start, sequence, seed)
    return (body + _U32.pack(_h32(body, seed))).ljust(BSIZE, b"\0")


def format_journal(dev, start: int, length: int, seed: int, sequence: int = 1) -> None:
    """Write an empty journal (mkfs)."""
    dev.write(start, pack_jsb(length, 1, sequence, seed))


@dataclass
class LogScan:
    """What replay found: the blocks to write home and how the log ends."""

    sequence: int
    start: int
    transactions: int = 0
    next_tid: int = 0
    end: int = 0  # offset after the last complete transaction
    blocks: dict[int, bytes] = field(default_factory=dict)
    discarded: str = ""  # why the scan stopped, if not a clean end


class ReadAhead:
    """Reads of a region read front to back, each device request reading ahead of what was
    asked, as a kernel's journal recovery does: a log of many small transactions then costs
    a few requests, not two per transaction (each with a device's fixed latency, and on a
    loaded machine a wait for the CPU too). The window starts at the first of
    param.JOURNAL_READAHEAD_BLOCKS and doubles up to the second, so reading past the end of
    a short log costs little; nothing is read past ``end``."""

    def __init__(self, read: Callable[[int, int], bytes], end: int):
        self._read, self._end = read, end
        self._window, self._most = param.JOURNAL_READAHEAD_BLOCKS
        self._lo = self._hi = 0
        self._buf = b""

    def __call__(self, blockno: int, count: int) -> bytes:
        if not (self._lo <= blockno and blockno + count <= self._hi):
            n = max(count, min(self._window, self._end - blockno))
            self._buf, self._lo, self._hi = self._read(blockno, n), blockno, blockno + n
            self._window = min(2 * self._window, self._most)
        o = (blockno - self._lo) * BSIZE
        return self._buf[o : o + count * BSIZE]


def scan_log(
    read: Callable[[int, int], bytes],
    jstart: int,
    jlen: int,
    seed: int,
    home_ok: Callable[[int], bool],
) -> LogScan:
    """Validate the whole log (reading only); return the newest copy of every block to replay.

    `read(blockno, count)` reads the device (or an image file, for fsck), ahead of what the
    scan asks for (``ReadAhead``)."""
    read = ReadAhead(read, jstart + jlen)
    raw = read(jstart, 1)
    magic, version, bsize, length, start, sequence, jseed = _JSB.unpack_from(raw)
    where = f"journal superblock (block {jstart})"
    if magic != JSB_MAGIC:
        raise JournalDamaged(f"{where}: bad magic {magic:#010x} (expected {JSB_MAGIC:#010x})")
    (stored,) = _U32.unpack_from(raw, _JSB.size)
    if stored != _h32(raw[: _JSB.size], seed):
        raise JournalDamaged(
            f"{where}: checksum mismatch (stored {stored:#010x}, computed "
            f"{_h32(raw[: _JSB.size], seed):#010x}; or it belongs to another "
            f"file system)"
        )
    if version != JOURNAL_VERSION or bsize != BSIZE:
        raise JournalDamaged(
            f"{where}: version {version}, block size {bsize} (expected {JOURNAL_VERSION}, {BSIZE})"
        )
    if length != jlen or jseed != seed:
        raise JournalDamaged(
            f"{where}: length {length}, seed {jseed:#x} do not match the file "
            f"system superblock ({jlen}, {seed:#x})"
        )
    if not 1 <= start < jlen:
        raise JournalDamaged(f"{where}: start {start} outside the log (1..{jlen - 1})")
    res = LogScan(sequence, start, next_tid=sequence, end=start)
    max_span = max(3, int(param.MAX_TXN_FRACTION * (jlen - 1)))
    latest: dict[int, tuple[int, bytes]] = {}
    revoked: dict[int, int] = {}
    pos, tid = start, sequence

    def damaged_or_end(p: int, what: str) -> None:
        """A descriptor of the expected tid is unreadable: damage if the transaction has a
        commit block after it (it was committed), else an incomplete transaction."""
        hi = min(jlen, p + 1 + max_span)
        if hi > p + 1:
            data = read(jstart + p + 1, hi - p - 1)
            for k in range(hi - p - 1):
                blk = data[k * BSIZE : (k + 1) * BSIZE]
                m, _, t, _, _, _ = _COMMIT.unpack_from(blk)
                if (
                    m == COMMIT_MAGIC
                    and t == tid
                    and _U32.unpack_from(blk, _COMMIT.size)[0] == _h32(blk[: _COMMIT.size], seed)
                ):
                    raise JournalDamaged(
                        f"journal block {jstart + p}: descriptor of transaction "
                        f"{tid}: {what}, but the transaction has a commit block "
                        f"at block {jstart + p + 1 + k}"
                    )
        res.discarded = f"transaction {tid} at journal block {jstart + p}: {what}; incomplete"

    while pos + 1 < jlen:
        descs: list[bytes] = []
        entries: list[tuple[int, int]] = []
        ok = True
        ndesc = 1
        k = 0
        while k < ndesc:
            p = pos + k
            blk = read(jstart + p, 1) if p < jlen else b""
            if not blk:
                raise JournalDamaged(
                    f"journal block {jstart + pos}: transaction {tid} has "
                    f"{ndesc} descriptors, beyond the end of the journal"
                )
            m, nd, t, idx, n = _DESC.unpack_from(blk)
            if m != DESC_MAGIC or t != tid:
                if k == 0:
                    ok = False  # the clean end of the log
                    break
                damaged_or_end(p, f"descriptor {k} missing")
                ok = False
                break
            if (
                _U32.unpack_from(blk, _DESC.size)[0]
                != _h32(blk[: _DESC.size] + blk[_DESC_HDR:], seed)
                or idx != k
                or not 1 <= nd <= max_span
                or n > ENTRIES_PER_DESC
                or (k and nd != ndesc)
            ):
                damaged_or_end(p, f"descriptor {k} has a bad checksum or header")
                ok = False
                break
            ndesc = nd
            descs.append(blk)
            entries += [_ENTRY.unpack_from(blk, _DESC_HDR + i * _ENTRY.size) for i in range(n)]
            k += 1
        if not ok:
            break
        copies = [b for b, f in entries if not f & REVOKE]
        cpos = pos + ndesc + len(copies)
        if cpos >= jlen:
            raise JournalDamaged(
                f"journal block {jstart + pos}: transaction {tid} claims "
                f"{len(copies)} blocks, beyond the end of the journal"
            )
        data = read(jstart + pos + ndesc, len(copies) + 1)
        cblk = data[len(copies) * BSIZE :]
        m, _, t, nblocks, _, dsum = _COMMIT.unpack_from(cblk)
        if m != COMMIT_MAGIC or t != tid:
            res.discarded = f"transaction {tid} at journal block {jstart + pos}: no commit block"
            break
        where = f"journal block {jstart + cpos} (commit of transaction {tid})"
        if _U32.unpack_from(cblk, _COMMIT.size)[0] != _h32(cblk[: _COMMIT.size], seed):
            raise JournalDamaged(f"{where}: commit block checksum mismatch")
        if nblocks != ndesc + len(copies):
            raise JournalDamaged(
                f"{where}: commit says {nblocks} blocks, descriptors say {ndesc + len(copies)}"
            )
        h = xxhash.xxh3_64(seed=seed)
        for d in descs:
            h.update(d)
        h.update(data[: len(copies) * BSIZE])
        if h.intdigest() != dsum:
            raise JournalDamaged(
                f"{where}: contents of journal blocks {jstart + pos}.."
                f"{jstart + cpos - 1} do not match the commit checksum "
                f"(stored {dsum:#018x}, computed {h.intdigest():#018x})"
            )
        for b, f in entries:
            if not home_ok(b):
                raise JournalDamaged(
                    f"journal block {jstart + pos}: transaction {tid} names "
                    f"home block {b}, outside the file system's metadata area"
                )
        ci = 0
        for b, f in entries:
            if f & REVOKE:
                revoked[b] = tid
            else:
                latest[b] = (tid, data[ci * BSIZE : (ci + 1) * BSIZE])
                ci += 1
        res.transactions += 1
        pos, tid = cpos + 1, tid + 1
        res.end, res.next_tid = pos, tid
    res.blocks = {b: d for b, (t, d) in latest.items() if revoked.get(b, -1) < t}
    return res


class Journal:
    def __init__(
        self, dev, start: int, length: int, seed: int, home_ok: Callable[[int], bool] | None = None
    ):
        self.dev, self.start, self.length, self.seed = dev, start, length, seed
        self.home_ok = home_ok or (
            lambda b: 0 < b < dev.nblocks and not start <= b < start + length
        )
        self.capacity_blocks = length - 1
        self.max_txn_blocks = int(param.MAX_TXN_FRACTION * self.capacity_blocks)
        n = self.max_txn_blocks - 2
        while n > 0 and math.ceil(n / ENTRIES_PER_DESC) + n + 1 > self.max_txn_blocks:
            n -= 1
        self.max_txn_entries = n
        if n < 1:
            raise JournalError(f"journal of {length} blocks is too small for any transaction")
        self.head = 1  # offset of the next transaction
        self.next_tid = 1
        self._jsb = (1, 1)  # (start, sequence) as on disk
        self._ckpt: dict[int, bytes] = {}  # newest committed copy of each block in the log
        self.stats = {
            "commits": 0,
            "blocks_logged": 0,
            "revokes": 0,
            "checkpoints": 0,
            "replayed_transactions": 0,
            "replayed_blocks": 0,
        }

    # --- mount ----------------------------------------------------------------------------------
    def scan(self) -> LogScan:
        return scan_log(self.dev.read, self.start, self.length, self.seed, self.home_ok)

    def replay(self) -> LogScan:
        """Validate the log, then write it home, flush and reset. JournalDamaged: nothing written."""
        s = self.scan()
        self.next_tid = s.next_tid
        self.head = s.start
        self._jsb = (s.start, s.sequence)
        if s.transactions:
            _write_runs(self.dev, s.blocks)
            self.dev.flush()
            self._reset()
        self.stats["replayed_transactions"] += s.transactions
        self.stats["replayed_blocks"] += len(s.blocks)
        return s

    # --- running -------------------------------------------------------------------------------
    def commit(self, blocks: dict[int, bytes], revoked=()) -> int:
        for b in blocks:
            if not self.home_ok(b):
                raise JournalError(f"block {b} is not a metadata block of this file system")
        copies = sorted(blocks)
        revokes = sorted(b for b in set(revoked) if b in self._ckpt and b not in blocks)
        if len(copies) + len(revokes) > self.max_txn_entries and revokes:
            self.checkpoint()  # an empty log needs no revoke records
            revokes = []
        n = len(copies) + len(revokes)
        if n > self.max_txn_entries:
            raise JournalError(
                f"transaction of {n} blocks exceeds the journal's limit of {self.max_txn_entries}"
            )
        ndesc = max(1, math.ceil(n / ENTRIES_PER_DESC))
        if self.head + ndesc + len(copies) + 1 > self.length:
            self.checkpoint()
            if revokes:
                revokes = []
                n = len(copies)
                ndesc = max(1, math.ceil(n / ENTRIES_PER_DESC))
        tid = self.next_tid
        entries = [(b, 0) for b in copies] + [(b, REVOKE) for b in revokes]
        descs = []
        for k in range(ndesc):
            chunk = entries[k * ENTRIES_PER_DESC : (k + 1) * ENTRIES_PER_DESC]
            hdr = _DESC.pack(DESC_MAGIC, ndesc, tid, k, len(chunk))
            body = b"".join(_ENTRY.pack(*e) for e in chunk).ljust(BSIZE - _DESC_HDR, b"\0")
            descs.append(
                (hdr + _U32.pack(_h32(hdr + body, self.seed))).ljust(_DESC_HDR, b"\0") + body
            )
        payload = b"".join(descs) + b"".join(blocks[b] for b in copies)
        if len(payload) != (ndesc + len(copies)) * BSIZE:
            raise JournalError("a block to commit is not exactly one block long")
        h = xxhash.xxh3_64(payload, seed=self.seed).intdigest()
        cbody = _COMMIT.pack(COMMIT_MAGIC, 0, tid, ndesc + len(copies), 0, h)
        commit = (cbody + _U32.pack(_h32(cbody, self.seed))).ljust(BSIZE, b"\0")
        base = self.start + self.head
        self.dev.write(base, payload)
        self.dev.flush()
        self.dev.write(base + ndesc + len(copies), commit)
        self.dev.flush()
        self.head += ndesc + len(copies) + 1
        self.next_tid = tid + 1
        for b in copies:
            self._ckpt[b] = blocks[b]
        for b in revoked:
            if b not in blocks:
                self._ckpt.pop(b, None)
        self.stats["commits"] += 1
        self.stats["blocks_logged"] += len(copies)
        self.stats["revokes"] += len(revokes)
        return tid

    def checkpoint(self) -> None:
        """Write every committed block home, flush, and reset the log to the region's start."""
        if self._ckpt:
            _write_runs(self.dev, self._ckpt)
            self.dev.flush()
            self._ckpt.clear()
        self._reset()

    def _reset(self) -> None:
        if self._jsb != (1, self.next_tid) or self.head != 1:
            self.dev.write(self.start, pack_jsb(self.length, 1, self.next_tid, self.seed))
            self.dev.flush()
            self._jsb = (1, self.next_tid)
            self.stats["checkpoints"] += 1
        self.head = 1

    @property
    def used_blocks(self) -> int:
        return self.head - 1

    @property
    def pending_checkpoint(self) -> int:
        return len(self._ckpt)


def _write_runs(dev, blocks: dict[int, bytes]) -> None:
    """Write {blockno: data} in block order, contiguous runs as one request."""
    order = sorted(blocks)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and order[j] == order[j - 1] + 1:
            j += 1
        dev.write(order[i], b"".join(blocks[b] for b in order[i:j]))
        i = j
