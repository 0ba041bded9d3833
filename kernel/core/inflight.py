"""The in-flight request table: which FUSE requests a kernel is handling, and their results.

Promises to the FUSE server (kernel/core/fuse.py), to the kernel daemon that gives it one
(kernel/core/kernel.py) and to a backup that resumes a dead kernel's connection
(systems/orthros/backup.py):

* ``InflightTable(mem, lay, first_open_id=)`` is a kernel object in the partition's
  physical memory (``lay.inflight``, in the kernel superblock's page), every store through
  ``mem.write``: a header and ``INFLIGHT_SLOTS`` entries, each with magic, version and
  checksum (kernel/hw/physmem.py ``Layout``), zeroed when it is made. A serving thread
  owns one slot. For every request whose re-execution is not harmless (``RECORDED``) the
  server stores ``started(unique, nodeid, opcode)`` before it touches anything, and
  ``applied(..., error, reply, op_gen)`` once the request's effect is done, before it
  replies. A request that changes the name space (``IN_OPERATION``) runs as one
  file-system operation (kernel/core/vfs.py ``operation``) and is recorded applied inside
  it, with the operation's generation ``op_gen``.
* ``next_open_id()``: the open-file ids (the high half of a file handle, kernel/core/fuse.py)
  a server hands out; the header holds a limit below which every id given out lies
  (raised a batch at a time), so a backup continues above what the dead kernel gave out.
* ``read_inflight(mem, lay)`` reads a (possibly dead) kernel's table from raw memory: every
  non-zero entry is validated (magic, version, checksum, state, lengths); what fails is
  counted in ``rejected`` (a ``CorruptObject`` each) and never used. With the dead kernel's
  superblock (``handles_open``, ``op_gen``) it decides, for a request the host re-sends
  (``Answers.for_resent``):
  - an entry *applied* whose operation the crash did not interrupt: answered with the
    recorded reply, never executed again (a CREATE with O_EXCL, a RENAME, an UNLINK);
  - an entry *applied* whose operation was the one open at the crash (same ``op_gen``,
    ``handles_open`` > 0): the backup undid it (kernel/core/bufcache.py's undo record),
    so it is executed again; the same for an entry only *started*;
  - no valid entry: executed again when that is harmless (the opcode is not in
    ``IN_OPERATION``: a write at its offset, a setattr, an open, a release repeat the same
    effect) or when no entry was rejected (the kernel died before recording it, so before
    applying it); else answered EIO, because a rejected entry may have been this request,
    applied: executing a CREATE or RENAME again would answer EEXIST/ENOENT for a change
    the application asked for once.

In-flight table (at ``lay.inflight`` = kernel superblock + ``INFLIGHT_OFFSET``)::

    +0     header (64 B)  magic "INFH" u32 | version u16 | flags u16
                          part_id u32 | n_slots u32 | open_id_limit u64 | ... | csum u64
    +64    slot 0 (256 B) magic "INFL" u32 | version u16 | state u16 (1 started, 2 applied)
                          unique u64 (without the resend bit) | nodeid u64
                          opcode u32 | error i32 (an errno; 0: success)
                          op_gen u64 (0: not a file-system operation)
                          reply_len u32 | pad u32 | reply 192 B | ... | csum u64
    +320   slot 1 ...     (INFLIGHT_SLOTS slots)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from kernel import param
from kernel.core import fuseproto as P
from kernel.hw.physmem import KSUPER, CorruptObject, Layout, PartLayout, PhysMem

RESEND_BIT = 1 << 63  # FUSE_UNIQUE_RESEND: the host marks a request it queues again
REPLY_BYTES = 192  # the longest recorded reply: CREATE's entry_out + open_out, 144 B
OPEN_ID_BATCH = 1 << 16  # open ids given out per store of the header's limit

STARTED, APPLIED = 1, 2

HEADER = Layout(
    "in-flight table header",
    "INFH",
    1,
    [("part_id", "I"), ("n_slots", "I"), ("open_id_limit", "Q")],
    64,
)
ENTRY = Layout(
    "in-flight request",
    "INFL",
    1,
    [
        ("unique", "Q"),
        ("nodeid", "Q"),
        ("opcode", "I"),
        ("error", "i"),
        ("op_gen", "Q"),
        ("reply_len", "I"),
        ("pad", "I"),
        ("reply", f"{REPLY_BYTES}s"),
    ],
    256,
)

# The name-space changes: executed again after they were applied they fail (EEXIST,
# ENOENT) or do something else; each runs as one file-system operation.
IN_OPERATION = frozenset(
    {P.MKNOD, P.MKDIR, P.SYMLINK, P.LINK, P.UNLINK, P.RMDIR, P.RENAME, P.RENAME2, P.CREATE}
)
# Recorded too: their reply (a file handle, a count) is answered again as it was given.
RECORDED = IN_OPERATION | {P.SETATTR, P.OPEN, P.WRITE, P.RELEASE}


def _slot_phys(lay: PartLayout, slot: int) -> int:
    return lay.inflight + HEADER.size + slot * ENTRY.size


class InflightTable:
    """This kernel's table (see the module's promises)."""

    def __init__(self, mem: PhysMem, lay: PartLayout, *, first_open_id: int = 1):
        if not 0 < first_open_id < 1 << 32:
            raise ValueError(f"in-flight table: first open id {first_open_id} outside 1..2^32-1")
        self.mem, self.lay = mem, lay
        self.n_slots = param.INFLIGHT_SLOTS
        mem.write(lay.inflight, bytes(HEADER.size + self.n_slots * ENTRY.size))
        self._open_id, self._limit = first_open_id, first_open_id
        self._store_header()
        self._start = [ENTRY.magic, ENTRY.version, STARTED, 0, 0, 0, 0, 0, 0, 0, b""]
        self._done = list(self._start)
        self._done[2] = APPLIED

    def slot_span(self, slot: int) -> tuple[int, int]:
        """Physical address and length of a slot's entry (what a fault corrupts)."""
        return _slot_phys(self.lay, slot), ENTRY.size

    def _store_header(self) -> None:
        self.mem.write(
            self.lay.inflight,
            HEADER.encode(
                part_id=self.lay.part_id, n_slots=self.n_slots, open_id_limit=self._limit
            ),
        )

    def next_open_id(self) -> int:
        """A fresh open-file id; the header's limit is raised before one reaches it."""
        i = self._open_id
        if i >= self._limit:
            self._limit = min(i + OPEN_ID_BATCH, 1 << 32)
            self._store_header()
        self._open_id = i + 1 if i + 1 < 1 << 32 else 1  # 2^32 opens later: wraps
        return i

    def started(self, slot: int, unique: int, nodeid: int, opcode: int) -> None:
        v = self._start
        v[3], v[4], v[5] = unique & ~RESEND_BIT, nodeid, opcode
        self.mem.write(_slot_phys(self.lay, slot), ENTRY.encode_tuple(tuple(v)))

    def applied(
        self, slot: int, unique: int, nodeid: int, opcode: int, error: int, reply, op_gen: int = 0
    ) -> None:
        if len(reply) > REPLY_BYTES:
            raise ValueError(f"opcode {opcode}: reply of {len(reply)} bytes cannot be recorded")
        v = self._done
        v[3], v[4], v[5], v[6], v[7], v[8], v[10] = (
            unique & ~RESEND_BIT,
            nodeid,
            opcode,
            error,
            op_gen,
            len(reply),
            bytes(reply),
        )
        self.mem.write(_slot_phys(self.lay, slot), ENTRY.encode_tuple(tuple(v)))


@dataclass
class Answers:
    """What a backup learnt from a dead kernel's table (``read_inflight``)."""

    entries: dict[int, dict] = field(default_factory=dict)  # unique -> valid entry
    rejected: list[CorruptObject] = field(default_factory=list)  # entries and header
    open_id_limit: int | None = None  # None: the header was rejected
    died_in_op: int = 0  # op_gen of the operation open at the crash; 0: none
    superblock_ok: bool = True
    answered: int = 0  # re-sent requests answered from the table
    refused: int = 0  # re-sent requests answered EIO
    settled: threading.Event = field(default_factory=threading.Event)  # all re-sent answered

    def note(self, wait_s: float = param.INFLIGHT_WAIT_S) -> str:
        """What the table was used for, for the takeover's report, once the re-sent
        requests are answered (or ``wait_s`` has passed: the note then says so)."""
        self.settled.wait(wait_s)
        bad = sum(1 for e in self.rejected if e.kind == ENTRY.kind)
        pending = "" if self.settled.is_set() else " (re-sent requests still unanswered)"
        return (
            f"in-flight requests{pending}: {self.answered} answered from the dead kernel's "
            f"table, {self.refused} answered EIO (record rejected), {bad} table entries rejected"
        )

    def for_resent(self, opcode: int, unique: int, nodeid: int) -> tuple[str, dict | None]:
        """("reply", entry): answer with the entry's recorded error and reply;
        ("execute", None): handle the request as new; ("eio", None): answer EIO."""
        e = self.entries.get(unique & ~RESEND_BIT)
        if e is not None and (e["opcode"], e["nodeid"]) != (opcode, nodeid):
            e = None  # not this request's: its record is not trusted for it
        if e is None:
            unsafe = opcode in IN_OPERATION and any(r.kind == ENTRY.kind for r in self.rejected)
            return ("eio", None) if unsafe else ("execute", None)
        if e["state"] != APPLIED:
            return "execute", None
        if e["op_gen"]:
            if not self.superblock_ok:
                return "eio", None  # cannot tell whether its operation was undone
            if e["op_gen"] == self.died_in_op:
                return "execute", None  # the operation open at the crash: undone
        return "reply", e


def read_inflight(mem: PhysMem, lay: PartLayout) -> Answers:
    """A (possibly dead) kernel's table and superblock, validated (see the module's promises)."""
    a = Answers()
    try:
        ks = KSUPER.decode(mem.read(lay.ksuper, KSUPER.size), 0, lay.ksuper)
        a.died_in_op = ks["op_gen"] if ks["handles_open"] else 0
    except CorruptObject:  # the cache migration rejects and reports it
        a.superblock_ok = False
    try:
        h = HEADER.decode(mem.read(lay.inflight, HEADER.size), 0, lay.inflight)
        a.open_id_limit = h["open_id_limit"]
    except CorruptObject as e:
        a.rejected.append(e)
    raw = np.frombuffer(
        mem.read(_slot_phys(lay, 0), param.INFLIGHT_SLOTS * ENTRY.size), dtype=ENTRY.dtype
    )
    used = raw.view(np.uint8).reshape(len(raw), ENTRY.size).any(axis=1)  # free slots: zeros
    for slot in np.flatnonzero(used).tolist():
        phys = _slot_phys(lay, slot)
        try:
            e = _entry(raw[slot].tobytes(), phys)
        except CorruptObject as err:
            a.rejected.append(err)
            continue
        a.entries[e["unique"]] = e
    return a


def _entry(raw: bytes, phys: int) -> dict:
    d = ENTRY.decode(raw, 0, phys)
    if d["flags"] not in (STARTED, APPLIED):
        raise CorruptObject(ENTRY.kind, phys, "state", f"unknown state {d['flags']}")
    if d["reply_len"] > REPLY_BYTES:
        raise CorruptObject(ENTRY.kind, phys, "reply_len", f"{d['reply_len']} > {REPLY_BYTES}")
    if d["flags"] == APPLIED and not 0 <= d["error"] < 4096:
        raise CorruptObject(ENTRY.kind, phys, "error", f"errno {d['error']} out of range")
    d["state"] = d["flags"]
    d["reply"] = d["reply"][: d["reply_len"]]
    return d
