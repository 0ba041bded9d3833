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
  bypass the accessor (a logging unit, not a kernel store), so they are not logged. Given
  the page cache's layout (``frames``), a store into a frame that was free when the
  transaction began (descriptor invalid, not stored into since) keeps no old bytes:
  nothing refers to a free frame's content, and a roll-back leaves the frame free;
* given the page cache's layout, the first store of a transaction into a frame in use
  that does not cover it whole — one that would carry the frame's other bytes forward, a
  new content checksum computed over them — first checks the frame as it stands against
  its descriptor (the descriptor's own checksum, then the content checksum it holds): a
  frame that fails was changed by no store of the page cache (a wild write, a bit flip),
  and ``damaged`` names it, for the transaction to refuse to commit (a store that covers
  the frame whole carries nothing forward: unchecked);
* ``abort`` reads the records back out of memory, checks every checksum and the count,
  then puts the old bytes back newest first: memory in ``span`` is byte-identical to what
  it was at ``begin`` (but for the content of frames that were free then). A record that fails its check raises ``LogDamaged`` before a byte is
  restored; a transaction made ``irrevocable`` (it wrote to the disk, or the log was full)
  cannot be aborted either (``Irrevocable``, with the reason);
* the header is the log's commit point: ``begin`` writes it open (so a transaction that
  stored nothing yet is open in memory too), each record is written whole before the
  header counts it, and the header counts it before the store lands; ``commit`` writes it
  idle. A process that has only the memory after the kernel's death (``open_transaction``,
  ``roll_back``) therefore finds exactly the open transaction's records, each of which
  landed or was about to land, and rolls them back — or, the header or a record failing
  its check (``LogDamaged``) or the transaction irrevocable (``Irrevocable``), nothing.

Layout (little-endian, at ``phys``; numpy structured dtypes ``HEADER`` and ``RECORD``)::

    +0    header   64 B   magic TXLG | version u16 | state u16 | tid u64 | records u64
                          | used u64 (bytes of records) | ... | csum u64 (xxh3 of bytes before)
                          (version 2: records and used count every record written)
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
from kernel.hw.physmem import PAGE, PAGE_DESC, PG_VALID, PartLayout, PhysMem, magic_of

_csum = xxhash.xxh3_64_intdigest
MAGIC, VERSION = magic_of("TXLG"), 2
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
_DESC_CSUM = PAGE_DESC.size - 8  # where a page descriptor's own checksum starts
_CONTENT_CSUM = PAGE_DESC.dtype.fields["content_csum"][1]
assert _HDR.size + 8 == HEADER.itemsize and _REC.size == RECORD.itemsize


def _seed(phys: int, n: int, seq: int, tid: int) -> int:
    return (phys * 0x9E3779B97F4A7C15 ^ (n << 32) ^ seq ^ tid * 0xC2B2AE3D27D4EB4F) & _MASK


class LogDamaged(Exception):
    """The undo log failed its own checks: it cannot be trusted to roll back."""


class Irrevocable(Exception):
    """The open transaction can no longer be rolled back (``reason``)."""


class UndoLog:
    def __init__(
        self,
        mem: PhysMem,
        phys: int,
        nbytes: int,
        span: tuple[int, int],
        frames: PartLayout | None = None,
    ):
        """``frames``: the page cache's layout; a store into a frame free since the
        transaction began (its descriptor invalid and not stored into by the transaction)
        keeps no old bytes — nothing refers to a free frame's content, and a roll-back
        leaves it free."""
        if nbytes < HEADER.itemsize + RECORD.itemsize + PAGE:
            raise ValueError(f"undo log of {nbytes} bytes: too small for one page store")
        self.mem, self.phys, self.nbytes, self.span = mem, phys, nbytes, span
        self.mm = mem.mm
        self.free_skipped = 0  # bytes stored into free frames, not logged (since boot)
        self._touched: set[int] = set()  # frames whose descriptor the transaction stored
        self._stored: set[int] = set()  # frames the transaction stored into
        self.damaged: list[str] = []  # frames found corrupted at the transaction's first store
        self.checked = 0  # frames checked at a first partial store (since boot)
        self._desc = self._frames = None
        if frames is not None:
            self._desc, self._frames, self._nframes = frames.desc, frames.frames, frames.nframes
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

    @staticmethod
    def place(lay: PartLayout) -> tuple[PartLayout, int, tuple[int, int]]:
        """Where a txipc_sim kernel of ``lay`` keeps its log: (the layout without the log's
        frames, where the log starts, the span it logs: the storage stack, not the mailbox)."""
        small, phys = UndoLog.carve(lay)
        return small, phys, (lay.ksuper, phys)

    def _header(self) -> None:
        _write_header(self.mm, self.phys, self.state, self.tid, self.count, self.used)

    # --- a transaction ----------------------------------------------------------------------
    def begin(self, tid: int) -> None:
        """Open a transaction; the header says so at its first store."""
        self.state, self.tid, self.used, self.count, self.reason = OPEN, tid, 0, 0, ""
        if self._touched:
            self._touched = set()
        if self._stored:
            self._stored = set()
        if self.damaged:
            self.damaged = []
        self._header()  # open in memory from here: a death from now on is inside it

    def record(self, phys: int, data) -> None:
        """The accessor's watcher: keep the old bytes of a store about to land."""
        if self.state != OPEN:
            return
        n = len(data)
        room = _REC.size + (n + 7) // 8 * 8
        if self.used + room > self.nbytes - HEADER.itemsize:
            self.irrevocable(f"undo log full ({self.nbytes} bytes)")
            return
        if self._desc is not None and self._free_frames(phys, n):
            self.free_skipped += n
            return
        seq = self.count
        old = self.mm[phys : phys + n]
        at = self.phys + HEADER.itemsize + self.used
        self.mm[at : at + _REC.size] = _REC.pack(
            phys, n, seq, _csum(old, _seed(phys, n, seq, self.tid))
        )
        self.mm[at + _REC.size : at + _REC.size + n] = old
        self.used += room
        self.count += 1
        self._header()  # the record whole, counted, and only then the store lands
        self.stores += 1
        self.bytes += n

    def _free_frames(self, phys: int, n: int) -> bool:
        """Whether a store lands only in frames free since the transaction began; notes
        the frames whose descriptors it stores into."""
        d = self._desc
        if d <= phys < d + self._nframes * 64:
            self._touched.update(range((phys - d) >> 6, ((phys + n - 1 - d) >> 6) + 1))
            return False
        fa = self._frames
        if not fa <= phys < fa + self._nframes * PAGE:
            return False
        first, last = (phys - fa) // PAGE, (phys + n - 1 - fa) // PAGE
        mm, touched, free = self.mm, self._touched, True
        for f in range(first, last + 1):
            if f in touched or mm[d + f * 64 + 6] & PG_VALID:  # flags: the low byte
                free = False
                if f not in self._stored:
                    self._first_store(f, phys, n)
        return free

    def _first_store(self, f: int, phys: int, n: int) -> None:
        """The transaction's first store into frame f, in use: a store that keeps some of
        its bytes checks them first (their checksum is about to be computed anew)."""
        self._stored.add(f)
        at = self._frames + f * PAGE
        if phys <= at and at + PAGE <= phys + n:
            return  # the frame overwritten whole: nothing of it is carried forward
        d = self._desc + f * 64
        if not self.mm[d + 6] & PG_VALID:
            return  # its descriptor cleared by this transaction: no page to check
        self.checked += 1
        why = _frame_damage(self.mem.view, d, at)
        if why:
            self.damaged.append(f"frame {f} at {at:#x}: {why}")

    def irrevocable(self, reason: str) -> None:
        """From here on the open transaction keeps what it did (the disk saw it)."""
        if self.state == OPEN:
            self.state, self.reason = IRREVOCABLE, reason
            self.count = self.used = 0
            self._header()

    def commit(self) -> None:
        self.state, self.used, self.count = IDLE, 0, 0
        self._header()

    def abort(self) -> int:
        """Put back every logged store, newest first; the bytes restored."""
        if self.state == IRREVOCABLE:
            raise Irrevocable(self.reason)
        recs = self.records(self.used)
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

    def records(self, used: int | None = None) -> list[tuple[int, bytes]]:
        """(phys, old bytes) of each record of the open transaction ``tid``, read from
        memory and checked, oldest first: the ``used`` bytes this log wrote (a record that
        fails its check raises LogDamaged); or, for a reader that has only the memory
        (``used`` None), every record up to the first that fails its check — a record an
        earlier transaction left never passes it, its checksum being seeded with its tid."""
        return _read_records(self.mm, self.phys, self.nbytes, self.span, self.tid, used)

    def close(self) -> None:
        if self.record in self.mem.watchers:
            self.mem.watchers.remove(self.record)


def _frame_damage(view: memoryview, desc: int, frame: int) -> str:
    """Why a frame in use and its descriptor disagree, or "" (the descriptor's own checksum,
    then the frame's content against the checksum the descriptor holds)."""
    raw = bytes(view[desc : desc + PAGE_DESC.size])
    if _csum(raw[:_DESC_CSUM]) != int.from_bytes(raw[_DESC_CSUM:], "little"):
        return "its descriptor fails its checksum"
    want = int.from_bytes(raw[_CONTENT_CSUM : _CONTENT_CSUM + 8], "little")
    if _csum(view[frame : frame + PAGE]) != want:
        return "its content fails the descriptor's checksum"
    return ""


def _write_header(mm, phys: int, state: int, tid: int, count: int, used: int) -> None:
    body = _HDR.pack(MAGIC, VERSION, state, tid, count, used)
    mm[phys : phys + HEADER.itemsize] = body + _csum(body).to_bytes(8, "little")


def _read_records(mm, phys0: int, nbytes: int, span, tid: int, used: int | None):
    """``UndoLog.records``, from the memory alone."""
    strict = used is not None
    start = phys0 + HEADER.itemsize
    end = start + used if strict else phys0 + nbytes
    out, at, (lo, hi) = [], start, span
    while at + RECORD.itemsize <= end:
        r = np.frombuffer(mm, RECORD, 1, at)[0]
        phys, n, seq = int(r["phys"]), int(r["length"]), int(r["seq"])
        body = at + RECORD.itemsize
        old = mm[body : body + n] if body + n <= end else b""
        if (
            seq != len(out)
            or not lo <= phys <= phys + n <= hi
            or len(old) != n
            or _csum(old, _seed(phys, n, seq, tid)) != int(r["csum"])
        ):
            if strict:
                raise LogDamaged(f"record {len(out)} at {at:#x}: checksum, sequence or address")
            break
        out.append((phys, old))
        at = body + (n + 7) // 8 * 8
    return out


# --- after the kernel's death: the open transaction, from the memory alone -------------------
def open_transaction(mem: PhysMem, phys: int, nbytes: int, span) -> list[tuple[int, bytes]] | None:
    """The records of the transaction open at the death (oldest first), checked; None when
    none was open (the death was outside any request). ``LogDamaged``: the header or a
    record failed its check; ``Irrevocable``: the transaction had touched the disk."""
    h = np.frombuffer(mem.mm, HEADER, 1, phys)[0]
    body = bytes(mem.mm[phys : phys + _HDR.size])
    if int(h["magic"]) != MAGIC or int(h["version"]) != VERSION:
        raise LogDamaged(f"header at {phys:#x}: magic or version")
    if _csum(body) != int(h["csum"]):
        raise LogDamaged(f"header at {phys:#x}: checksum")
    state, used, count = int(h["state"]), int(h["used"]), int(h["records"])
    if state == IDLE:
        return None
    if state == IRREVOCABLE:
        raise Irrevocable("the open transaction wrote to the disk or filled the log")
    if state != OPEN or used > nbytes - HEADER.itemsize:
        raise LogDamaged(f"header at {phys:#x}: state {state}, {used} bytes used")
    recs = _read_records(mem.mm, phys, nbytes, span, int(h["tid"]), used)
    if len(recs) != count:
        raise LogDamaged(f"{len(recs)} sound records of {count} counted")
    return recs


def roll_back(mem: PhysMem, phys: int, nbytes: int, span) -> tuple[int, int] | None:
    """Put back the stores of the transaction open at the death (``open_transaction``),
    newest first, and leave the log idle: (records, bytes restored); None if none was open.
    Nothing is restored unless every record passed its check."""
    recs = open_transaction(mem, phys, nbytes, span)
    if recs is None:
        return None
    for at, old in reversed(recs):
        mem.write(at, old)
    tid = int(np.frombuffer(mem.mm, HEADER, 1, phys)[0]["tid"])
    _write_header(mem.mm, phys, IDLE, tid, 0, 0)
    return len(recs), sum(len(old) for _, old in recs)
