"""The undo log: every store a request makes into physical memory, its old bytes kept first.

Promises to the request transactions of a ``txipc_sim`` kernel (systems/txipc_sim/) and to
any reader of its memory:

* ``UndoLog.carve(lay)`` takes the log's area from the tail of the page-frame area
  (``param.TXLOG_BYTES``) and returns the layout the storage stack then uses (fewer frames);
  the page cache never lends those frames, and their descriptors stay invalid, so a cache
  walk never takes the log for file data;
* while a transaction is open (``begin`` .. ``commit``/``abort``), every store through the one
  write accessor (``PhysMem.write``) into ``span`` is recorded *before it lands*: its
  address, length and the old bytes, with a checksum per record. The log's own stores
  bypass the accessor (a logging unit, not a kernel store), so they are not logged;
* ``abort`` reads the records back out of memory, checks every checksum and the count,
  then puts the old bytes back newest first: memory in ``span`` is byte-identical to what
  it was at ``begin``. A record that fails its check raises ``LogDamaged`` before a byte is
  restored; a transaction made ``irrevocable`` (it wrote to the disk, or the log was full)
  cannot be aborted either (``Irrevocable``, with the reason);
* ``commit`` empties the log with one header store; the header says at any time whether a
  transaction is open, so a reader after the kernel's death could roll it back (``records``).

Layout (little-endian, at ``phys``; numpy structured dtypes ``HEADER`` and ``RECORD``)::

    +0    header   64 B   magic TXLG | version u16 | state u16 | tid u64 | records u64
                          | used u64 (bytes of records) | ... | csum u64 (xxh3 of bytes before)
    +64   record 0        phys u64 | length u32 | seq u32 | csum u64 (xxh3 of the old
                          bytes, seeded with phys, length and seq) | old bytes, padded to 8
          record 1 ...
          ...             up to TXLOG_BYTES; a transaction that needs more is irrevocable
"""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import xxhash

from kernel import param
from kernel.hw.physmem import PAGE, PartLayout, PhysMem, magic_of

_csum = xxhash.xxh3_64_intdigest
MAGIC, VERSION = magic_of("TXLG"), 1
IDLE, OPEN, IRREVOCABLE = 0, 1, 2

HEADER = np.dtype(
    {
        "names": ["magic", "version", "state", "tid", "records", "used", "csum"],
        "formats": ["<u4", "<u2", "<u2", "<u8", "<u8", "<u8", "<u8"],
        "offsets": [0, 4, 6, 8, 16, 24, 56],
        "itemsize": 64,
    }
)
RECORD = np.dtype(
    {
        "names": ["phys", "length", "seq", "csum"],
        "formats": ["<u8", "<u4", "<u4", "<u8"],
        "offsets": [0, 8, 12, 16],
        "itemsize": 24,
    }
)
_HDR = struct.Struct("<IHHQQQ24x")  # the header's bytes before csum (HEADER above)
_REC = struct.Struct("<QIIQ")  # RECORD above, for the store path
_MASK = (1 << 64) - 1
assert _HDR.size + 8 == HEADER.itemsize and _REC.size == RECORD.itemsize


def _seed(phys: int, n: int, seq: int) -> int:
    return (phys * 0x9E3779B97F4A7C15 ^ (n << 32) ^ seq) & _MASK


class LogDamaged(Exception):
    """The undo log failed its own checks: it cannot be trusted to roll back."""


class Irrevocable(Exception):
    """The open transaction can no longer be rolled back (``reason``)."""


class UndoLog:
    def __init__(self, mem: PhysMem, phys: int, nbytes: int, span: tuple[int, int]):
        if nbytes < HEADER.itemsize + RECORD.itemsize + PAGE:
            raise ValueError(f"undo log of {nbytes} bytes: too small for one page store")
        self.mem, self.phys, self.nbytes, self.span = mem, phys, nbytes, span
        self.mm = mem.mm
        self.state, self.tid = IDLE, 0
        self.used = self.count = 0
        self.reason = ""  # why the open transaction became irrevocable
        self.stores = self.bytes = 0  # logged since boot
        self._header()
        mem.watchers.append(self.record)
        mem.watch_span = span

    @staticmethod
    def carve(lay: PartLayout, nbytes: int = param.TXLOG_BYTES) -> tuple[PartLayout, int]:
        """(the layout without the log's frames, where the log starts)."""
        frames = -(-nbytes // PAGE)
        if lay.nframes - frames < param.MIN_FRAMES:
            raise ValueError(f"partition {lay.part_id}: no room for an undo log of {nbytes} B")
        small = replace(lay, nframes=lay.nframes - frames)
        return small, small.frame_phys(small.nframes)

    def _header(self) -> None:
        body = _HDR.pack(MAGIC, VERSION, self.state, self.tid, self.count, self.used)
        self.mm[self.phys : self.phys + HEADER.itemsize] = body + _csum(body).to_bytes(8, "little")

    # --- a transaction ----------------------------------------------------------------------
    def begin(self, tid: int) -> None:
        self.state, self.tid, self.used, self.count, self.reason = OPEN, tid, 0, 0, ""
        self._header()

    def record(self, phys: int, data) -> None:
        """The accessor's watcher: keep the old bytes of a store about to land."""
        if self.state != OPEN:
            return
        n = len(data)
        room = _REC.size + (n + 7) // 8 * 8
        if self.used + room > self.nbytes - HEADER.itemsize:
            self.irrevocable(f"undo log full ({self.nbytes} bytes)")
            return
        old = self.mm[phys : phys + n]
        at = self.phys + HEADER.itemsize + self.used
        seq = self.count
        self.mm[at : at + _REC.size] = _REC.pack(phys, n, seq, _csum(old, _seed(phys, n, seq)))
        self.mm[at + _REC.size : at + _REC.size + n] = old
        self.used += room
        self.count += 1
        self.stores += 1
        self.bytes += n

    def irrevocable(self, reason: str) -> None:
        """From here on the open transaction keeps what it did (the disk saw it)."""
        if self.state == OPEN:
            self.state, self.reason = IRREVOCABLE, reason
            self._header()

    def commit(self) -> None:
        self.state, self.used, self.count = IDLE, 0, 0
        self._header()

    def abort(self) -> int:
        """Put back every logged store, newest first; the bytes restored."""
        if self.state == IRREVOCABLE:
            raise Irrevocable(self.reason)
        recs = self.records()
        if len(recs) != self.count:
            raise LogDamaged(f"{len(recs)} sound records of {self.count} logged")
        self.state = IDLE  # the restores are no stores of the transaction
        restored = 0
        for phys, old in reversed(recs):
            self.mem.write(phys, old)
            restored += len(old)
        self.used = self.count = 0
        self._header()
        return restored

    def records(self) -> list[tuple[int, bytes]]:
        """(phys, old bytes) of each record, read from memory and checked, oldest first."""
        out, at, end = [], self.phys + HEADER.itemsize, self.phys + HEADER.itemsize + self.used
        while at < end:
            r = np.frombuffer(self.mm, RECORD, 1, at)[0]
            phys, n, seq = int(r["phys"]), int(r["length"]), int(r["seq"])
            old = self.mm[at + RECORD.itemsize : at + RECORD.itemsize + n]
            lo, hi = self.span
            if seq != len(out) or not lo <= phys <= phys + n <= hi:
                raise LogDamaged(f"record {len(out)} at {at:#x}: bad sequence or address")
            if _csum(old, _seed(phys, n, seq)) != int(r["csum"]):
                raise LogDamaged(f"record {seq} at {at:#x}: checksum mismatch")
            out.append((phys, old))
            at += RECORD.itemsize + (n + 7) // 8 * 8
        return out

    def close(self) -> None:
        if self.record in self.mem.watchers:
            self.mem.watchers.remove(self.record)
