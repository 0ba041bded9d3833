"""Runtime-aware processes: the library an app imports to keep its state in physical memory.

Promises to a runtime-aware app (it imports this module), to its kernel (kernel/core/proc.py
``ProcTable``) and to a recovery scheme resurrecting the app in another partition:

* The kernel gives the app a state segment of the partition's physical memory and says
  where in the environment: ``CRASHBENCH_PHYSMEM`` (the file), ``CRASHBENCH_STATE_PHYS``
  (offset, page aligned), ``CRASHBENCH_STATE_LEN`` (bytes), and ``CRASHBENCH_PHYSMEM_FD``
  (an inherited descriptor of the file, used first: an app running as another user may
  not be able to open it). The app maps only its segment: it is the app's own memory, so
  its stores do not go through the kernel's write accessor.
* ``save(payload)`` stores the payload so that a crash at any byte of the save never
  yields a torn state that validates: the segment holds two records (halves); a save
  writes the payload into the half that does not hold the newest valid record, then that
  half's header (magic, version, sequence number, payload length, xxh3-64 of the payload,
  and the header's own checksum). Until the header is complete, the half fails validation
  (or still validly holds an *older* record) and the other half's record is the newest.
* ``load()`` returns the newest valid payload, or None when no save ever completed.
* ``read_state(mem, phys, length)`` reads a (possibly dead) process's segment from raw
  memory: the newest valid payload; None when the segment is empty (both headers zero);
  ``CorruptObject`` when something is there but no half validates. ``scan_state`` also
  returns the halves it rejected (a half torn by a crash mid-save is one of them).
* Kernel side: ``clear_state`` empties a segment (through ``mem.write``), ``write_state``
  stores a payload as a valid record (resurrection into a new segment).
* Crash procedure (Otherworld's term): ``on_crash(fn)`` registers ``fn`` as the app's
  crash procedure, the handler of ``CRASH_SIGNAL`` (a real-time signal, sent only to a
  process that catches it). A kernel that resurrects the process after its kernel's crash in place
  (systems/keep.py ``resurrect``) sees the registration as the kernel sees any handler
  (``catches_crash_signal``: the caught-signal mask in /proc) and queues the signal while
  the process is still stopped, so the procedure is the first thing it handles when it
  goes on. ``fn`` runs in the main thread, between two Python instructions, as any
  Python signal handler; an app that must not be interrupted there defers its work
  (the editor, kernel/apps/rtaware_editor.py, does it in its main loop).

Segment of length L (L/2 per half, header 64 bytes, capacity L/2 - 64 bytes)::

    +0      header A  magic "RTST" u32 | version u16 | flags u16 | seq u64 | length u64
                      | payload_csum u64 | pad | csum u64
    +64     payload A
    +L/2    header B
    +L/2+64 payload B
"""

from __future__ import annotations

import mmap
import os
import signal
from dataclasses import dataclass, field

import xxhash

from kernel.hw.physmem import CorruptObject, Layout, PhysMem

ENV_PHYSMEM = "CRASHBENCH_PHYSMEM"
ENV_PHYSMEM_FD = "CRASHBENCH_PHYSMEM_FD"
ENV_STATE_PHYS = "CRASHBENCH_STATE_PHYS"
ENV_STATE_LEN = "CRASHBENCH_STATE_LEN"
CRASH_SIGNAL = signal.SIGRTMIN + 3  # a crash procedure's call (its default action kills)

STATE_HEADER = Layout(
    "state record", "RTST", 1, [("seq", "Q"), ("length", "Q"), ("payload_csum", "Q")], 64
)
_HDR = STATE_HEADER.size
_ZERO_HDR = bytes(_HDR)
_csum = xxhash.xxh3_64_intdigest


def capacity(length: int) -> int:
    """The largest payload a segment of `length` bytes holds."""
    return length // 2 - _HDR


def _check_geometry(phys: int, length: int) -> None:
    if phys < 0 or length <= 0 or length % 2 or capacity(length) < 1:
        raise ValueError(
            f"state segment {phys:#x}+{length}: bad geometry (length must be even "
            f"and above {2 * _HDR} bytes)"
        )


@dataclass
class StateScan:
    """What a segment holds: the newest valid record, and the halves that failed."""

    payload: bytes | None = None
    seq: int = 0
    half: int | None = None
    empty: bool = True  # both headers zero: no save ever completed
    rejected: list[CorruptObject] = field(default_factory=list)


def _scan(buf, base: int, length: int, phys: int) -> StateScan:
    half = length // 2
    cap = capacity(length)
    scan = StateScan()
    for h in (0, 1):
        off, where = base + h * half, phys + h * half
        hdr = bytes(buf[off : off + _HDR])
        if hdr == _ZERO_HDR:
            continue
        scan.empty = False
        try:
            d = STATE_HEADER.decode(hdr, 0, where)
            if d["length"] > cap:
                raise CorruptObject(
                    STATE_HEADER.kind,
                    where,
                    "length",
                    f"payload length {d['length']} beyond the half's {cap} bytes",
                )
            payload = bytes(buf[off + _HDR : off + _HDR + d["length"]])
            if _csum(payload) != d["payload_csum"]:
                raise CorruptObject(
                    STATE_HEADER.kind,
                    where,
                    "payload",
                    f"payload checksum mismatch (seq {d['seq']}, {d['length']} bytes): "
                    "torn by a crash mid-save, or corrupted",
                )
        except CorruptObject as e:
            scan.rejected.append(e)
            continue
        if scan.half is None or d["seq"] > scan.seq:
            scan.payload, scan.seq, scan.half = payload, d["seq"], h
    return scan


def _plan(scan: StateScan, length: int, payload: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """The stores of one save, in order, as (offset in the segment, bytes)."""
    cap = capacity(length)
    if len(payload) > cap:
        raise ValueError(f"state payload of {len(payload)} bytes exceeds the segment's {cap}")
    seq = scan.seq + 1
    h = 0 if scan.half is None else 1 - scan.half
    off = h * (length // 2)
    header = STATE_HEADER.encode(seq=seq, length=len(payload), payload_csum=_csum(payload))
    return seq, [(off + _HDR, payload), (off, header)]


# ---------------------------------------------------------------- foreign readers, kernel side


def scan_state(mem: PhysMem, phys: int, length: int) -> StateScan:
    _check_geometry(phys, length)
    if phys + length > mem.size:
        raise CorruptObject(
            STATE_HEADER.kind, phys, "bounds", "segment runs past the end of memory"
        )
    return _scan(mem.mm, phys, length, phys)


def read_state(mem: PhysMem, phys: int, length: int) -> bytes | None:
    """The newest valid payload of a segment; None if it is empty; CorruptObject if
    something is there but nothing validates (the first rejection is raised)."""
    scan = scan_state(mem, phys, length)
    if scan.half is not None:
        return scan.payload
    if scan.rejected:
        raise scan.rejected[0]
    return None


def clear_state(mem: PhysMem, phys: int, length: int) -> None:
    _check_geometry(phys, length)
    mem.write(phys, _ZERO_HDR)
    mem.write(phys + length // 2, _ZERO_HDR)


def write_state(mem: PhysMem, phys: int, length: int, payload: bytes) -> int:
    """Store `payload` as the newest record (through the write accessor); its seq."""
    seq, stores = _plan(scan_state(mem, phys, length), length, bytes(payload))
    for off, data in stores:
        mem.write(phys + off, data)
    return seq


# ---------------------------------------------------------------- the app's side


def _same_file(fd: str, path: str | None) -> bool:
    """Is descriptor `fd` (inherited, or a stale number in a child's environment) really
    the physical-memory file? Mapping anything else would write state into it."""
    try:
        st = os.fstat(int(fd))
        if path is None:
            return False
        ps = os.stat(path)
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (ps.st_dev, ps.st_ino)


class StateSegment:
    """The app's own mapping of its state segment."""

    def __init__(self, phys: int, length: int, *, path: str | None = None, fd: int | None = None):
        _check_geometry(phys, length)
        if phys % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"state segment {phys:#x}: not page aligned")
        if fd is None:
            if path is None:
                raise ValueError("StateSegment: give the physical-memory path or a descriptor")
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            own = True
        else:
            own = False
        try:
            self.mm = mmap.mmap(
                fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=phys
            )
        finally:
            if own:
                os.close(fd)
        self.phys, self.length = phys, length
        self.capacity = capacity(length)
        self.last_scan: StateScan | None = None

    @classmethod
    def from_env(cls, environ=None) -> "StateSegment | None":
        """The segment the kernel gave this process; None when it gave none."""
        env = os.environ if environ is None else environ
        if ENV_STATE_PHYS not in env:
            return None
        try:
            phys, length = int(env[ENV_STATE_PHYS]), int(env[ENV_STATE_LEN])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ENV_STATE_PHYS}/{ENV_STATE_LEN}: bad value ({e})") from None
        path = env.get(ENV_PHYSMEM)
        fd = env.get(ENV_PHYSMEM_FD)
        if fd is not None and _same_file(fd, path):
            return cls(phys, length, fd=int(fd))
        if path is None:
            raise ValueError(f"{ENV_PHYSMEM}: not set")
        return cls(phys, length, path=path)

    def scan(self) -> StateScan:
        self.last_scan = _scan(self.mm, 0, self.length, self.phys)
        return self.last_scan

    def plan(self, payload: bytes) -> tuple[int, list[tuple[int, bytes]]]:
        """The stores save() would make, in order (tests replay a prefix: a torn save)."""
        return _plan(self.scan(), self.length, bytes(payload))

    def save(self, payload: bytes) -> int:
        """Store `payload` as the newest state; returns its sequence number."""
        seq, stores = self.plan(payload)
        for off, data in stores:
            self.mm[off : off + len(data)] = data
        return seq

    def load(self) -> bytes | None:
        """The newest valid payload, None when no save completed (see ``last_scan``)."""
        return self.scan().payload

    def close(self) -> None:
        self.mm.close()


_default: StateSegment | None = None


def attach() -> StateSegment:
    """This process's state segment (from the environment); RuntimeError when the kernel
    launched it without one (not runtime-aware)."""
    global _default
    if _default is None:
        seg = StateSegment.from_env()
        if seg is None:
            raise RuntimeError(
                f"no state segment: {ENV_STATE_PHYS} is not set "
                "(was the app launched as runtime-aware?)"
            )
        _default = seg
    return _default


def save(payload: bytes) -> int:
    return attach().save(payload)


def load() -> bytes | None:
    return attach().load()


# ---------------------------------------------------------------- crash procedure


def on_crash(fn) -> None:
    """Register ``fn()`` as this process's crash procedure (see the module's promises)."""
    signal.signal(CRASH_SIGNAL, lambda *_: fn())


def catches_crash_signal(pid: int) -> bool:
    """Has process ``pid`` registered a crash procedure (a handler of CRASH_SIGNAL)?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (CRASH_SIGNAL - 1) & 1)
    except (OSError, ValueError):
        pass
    return False
