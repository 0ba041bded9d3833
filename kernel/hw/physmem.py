"""Physical memory: one shared file, mmap'd by every kernel of the machine.

Promises to every kernel layer and to any process that reads a (possibly dead) kernel:

* ``PhysMem`` maps the whole machine's memory; the file it creates is its owner's only
  (param.OWNER_ONLY_MODE, set explicitly: every page of every file lives there).
  ``write()`` is the ONE accessor through which every write to a kernel object or a page
  frame goes: watchers registered on it (the warm-cache VMM, the TxIPC undo log, the fault
  injector) see every store that touches ``watch_span`` (the whole memory unless narrowed:
  the VMM watches only the page frames) before it lands. A watcher may narrow it further
  to the pages it write-protects, as a VMM does with the MMU: ``watch_pages``, one byte
  per page of the span, 1 where a store must reach the watchers (None: every page).
* Kernel objects are fixed binary layouts (``Layout``) addressed by physical offset; a
  pointer is a physical offset and 0 means null. Every object carries a magic, a version and
  a checksum (xxh3-64 of all bytes before it), so a foreign kernel can reject what is
  corrupted: ``Layout.decode`` raises ``CorruptObject`` naming the object, its address, the
  field and why.
* ``partition_layout()`` carves a partition into its fixed areas (diagram below); the same
  numbers are written into the partition header, so a reader can check them.

Partition layout (offsets from the partition's base; every area page-aligned)::

    +0        partition header   1 page   magic PART, geometry, area offsets
    +4K       heartbeat mailbox  1 page   (kernel/core/kernel.py)
    +8K       kernel superblock  1 page   dirty-inode list head, journal state (128 B);
                                         at +8K+INFLIGHT_OFFSET the in-flight request table
                                         (kernel/core/inflight.py)
    +12K      crash-kernel area  CRASHK_BYTES  reserved: a loaded crash kernel's image record
                                         (kernel/core/crashimage.py; zeros when none is loaded)
    ...       process table      PROC_SLOTS x PROC_ENTRY_BYTES
    ...       state segments     STATE_SLOTS x PROC_STATE_BYTES (runtime-aware processes)
    ...       in-core inodes     ICORE_SLOTS x 128 B  (slot 0: the block device's inode)
    ...       page descriptors   nframes x 64 B
    ...       page frames        nframes x 4 KiB
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np
import xxhash

from kernel import param

PAGE = param.PAGE_SIZE
_SHIFT = PAGE.bit_length() - 1
_csum = xxhash.xxh3_64_intdigest


class CorruptObject(Exception):
    """A kernel object read from raw memory failed validation."""

    def __init__(self, kind: str, phys: int, field: str, why: str):
        self.kind, self.phys, self.field, self.why = kind, phys, field, why
        super().__init__(f"{kind} at {phys:#x}: {field}: {why}")


def magic_of(tag: str) -> int:
    return int.from_bytes(tag.encode("ascii"), "little")


_NP = {
    "B": "u1",
    "H": "<u2",
    "I": "<u4",
    "Q": "<u8",
    "b": "i1",
    "h": "<i2",
    "i": "<i4",
    "q": "<i8",
    "d": "<f8",
}


def _np_code(code: str) -> str:
    return f"S{code[:-1]}" if code.endswith("s") else _NP[code]


class Layout:
    """A fixed binary layout: little-endian fields, magic first, checksum (u64) last.

    Fields are (name, struct code). The first three fields are always magic (I), version (H)
    and flags (H); the last is csum (Q), computed over every byte before it.
    """

    def __init__(self, kind: str, tag: str, version: int, fields: list[tuple[str, str]], size: int):
        self.kind, self.magic, self.version = kind, magic_of(tag), version
        names = ["magic", "version", "flags"] + [n for n, _ in fields]
        codes = ["I", "H", "H"] + [c for _, c in fields]
        fmt = "<" + "".join(codes)
        body = struct.calcsize(fmt)
        pad = size - body - 8
        if pad < 0:
            raise ValueError(f"{kind}: fields need {body + 8} bytes, layout has {size}")
        self.size = size
        self.names = names
        self._body = struct.Struct(f"{fmt}{pad}x")
        self._csum_at = size - 8
        self.index = {n: i for i, n in enumerate(names)}
        offsets = [struct.calcsize("<" + "".join(codes[:i])) for i in range(len(codes))]
        self.dtype = np.dtype(
            {
                "names": names + ["csum"],
                "formats": [_np_code(c) for c in codes] + ["<u8"],
                "offsets": offsets + [self._csum_at],
                "itemsize": size,
            }
        )

    def encode(self, flags: int = 0, **values) -> bytes:
        vals = [self.magic, self.version, flags] + [values.get(n, 0) for n in self.names[3:]]
        body = self._body.pack(*vals)
        return body + _csum(body).to_bytes(8, "little")

    def encode_tuple(self, values: tuple) -> bytes:
        """Encode from a full tuple in field order (magic, version, flags, ...): the fast path."""
        body = self._body.pack(*values)
        return body + _csum(body).to_bytes(8, "little")

    def unpack(self, buf, off: int = 0) -> tuple:
        return self._body.unpack_from(buf, off)

    def decode(self, buf, off: int, phys: int | None = None) -> dict:
        """Validate and decode one object; raise CorruptObject on bad magic/version/checksum."""
        where = off if phys is None else phys
        raw = bytes(buf[off : off + self.size])
        if len(raw) < self.size:
            raise CorruptObject(self.kind, where, "bounds", "object runs past the end of memory")
        vals = self._body.unpack_from(raw)
        if vals[0] != self.magic:
            raise CorruptObject(
                self.kind,
                where,
                "magic",
                f"bad magic {vals[0]:#010x} (expected {self.magic:#010x})",
            )
        if vals[1] != self.version:
            raise CorruptObject(
                self.kind,
                where,
                "version",
                f"unsupported version {vals[1]} (expected {self.version})",
            )
        stored = int.from_bytes(raw[self._csum_at :], "little")
        if stored != _csum(raw[: self._csum_at]):
            raise CorruptObject(
                self.kind,
                where,
                "checksum",
                f"bad checksum {stored:#018x} (object was modified or torn)",
            )
        return dict(zip(self.names, vals))


# --- the partition's fixed objects -------------------------------------------------------

PART_HEADER = Layout(
    "partition header",
    "PART",
    2,
    [
        ("part_id", "I"),
        ("pad", "I"),
        ("base", "Q"),
        ("size", "Q"),
        ("mailbox", "Q"),
        ("ksuper", "Q"),
        ("proc", "Q"),
        ("icore", "Q"),
        ("desc", "Q"),
        ("frames", "Q"),
        ("n_proc", "Q"),
        ("n_icore", "Q"),
        ("nframes", "Q"),
        ("state", "Q"),
        ("n_state", "Q"),
        ("crashk", "Q"),
    ],
    144,
)

KSUPER = Layout(
    "kernel superblock",
    "KSUP",
    2,
    [
        ("part_id", "I"),
        ("handles_open", "I"),
        ("dirty_inode_head", "Q"),
        ("n_dirty_inodes", "Q"),
        ("running_tid", "Q"),
        ("committed_tid", "Q"),
        ("nblocks", "Q"),
        ("mount_gen", "Q"),
        ("update_gen", "Q"),
        # outermost file-system operations begun: with handles_open, which one a crash
        # interrupted (kernel/core/inflight.py tells a request undone from one completed)
        ("op_gen", "Q"),
    ],
    128,
)

ICORE = Layout(
    "in-core inode",
    "ICOR",
    1,
    [
        ("ino", "Q"),
        ("mode", "I"),
        ("uid", "I"),
        ("gid", "I"),
        ("nlink", "I"),
        ("size", "Q"),
        ("atime_ns", "Q"),
        ("mtime_ns", "Q"),
        ("ctime_ns", "Q"),
        ("dirty_pages_head", "Q"),
        ("n_dirty", "Q"),
        ("next_dirty", "Q"),
        ("prev_dirty", "Q"),
        ("dirtied_ns", "Q"),
        ("gen", "Q"),
    ],
    128,
)

PAGE_DESC = Layout(
    "page descriptor",
    "PGDS",
    1,
    [
        ("ino", "Q"),
        ("index", "Q"),
        ("gen", "Q"),
        ("content_csum", "Q"),
        ("next_dirty", "Q"),
        ("dirtied_ns", "Q"),
    ],
    64,
)

# icore flags
I_USED, I_DIRTY_META, I_ON_DIRTY_LIST = 1, 2, 4
# page descriptor flags
PG_VALID, PG_DIRTY, PG_META, PG_UPTODATE = 1, 2, 4, 8


def page_csum(data) -> int:
    return _csum(data)


@dataclass(frozen=True)
class PartLayout:
    part_id: int
    base: int
    size: int
    mailbox: int
    ksuper: int
    proc: int
    state: int
    n_state: int
    icore: int
    desc: int
    frames: int
    n_proc: int
    n_icore: int
    nframes: int
    crashk: int  # the reserved crash-kernel area (param.CRASHK_BYTES)

    def frame_phys(self, frame: int) -> int:
        return self.frames + frame * PAGE

    def desc_phys(self, frame: int) -> int:
        return self.desc + frame * PAGE_DESC.size

    def state_phys(self, slot: int) -> int:
        return self.state + slot * param.PROC_STATE_BYTES

    @property
    def inflight(self) -> int:
        """The in-flight request table, in the kernel superblock's page after the superblock."""
        return self.ksuper + param.INFLIGHT_OFFSET

    def icore_phys(self, slot: int) -> int:
        return self.icore + slot * ICORE.size

    def header_bytes(self) -> bytes:
        return PART_HEADER.encode(
            **{k: getattr(self, k) for k in PART_HEADER.names[3:] if k != "pad"}
        )


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def partition_layout(
    part_id: int,
    base: int,
    size: int,
    n_icore: int = param.ICORE_SLOTS,
    n_proc: int = param.PROC_SLOTS,
) -> PartLayout:
    mailbox, ksuper, crashk = base + PAGE, base + 2 * PAGE, base + 3 * PAGE
    proc = _align(crashk + param.CRASHK_BYTES)
    state = _align(proc + n_proc * param.PROC_ENTRY_BYTES)
    n_state = param.STATE_SLOTS
    icore = _align(state + n_state * param.PROC_STATE_BYTES)
    desc = _align(icore + n_icore * ICORE.size)
    room = base + size - desc
    nframes = room // (PAGE + PAGE_DESC.size)
    frames = _align(desc + nframes * PAGE_DESC.size)
    while frames + nframes * PAGE > base + size:
        nframes -= 1
        frames = _align(desc + nframes * PAGE_DESC.size)
    if nframes < param.MIN_FRAMES:
        raise ValueError(f"partition {part_id}: {size} bytes leave only {nframes} page frames")
    return PartLayout(
        part_id,
        base,
        size,
        mailbox,
        ksuper,
        proc,
        state,
        n_state,
        icore,
        desc,
        frames,
        n_proc,
        n_icore,
        nframes,
        crashk,
    )


Watcher = Callable[[int, bytes], None]


_MADV_POPULATE_READ = 22  # Linux 5.14 on


@functools.cache
def _madvise():
    """libc's madvise, through ctypes (which releases the interpreter lock for the call);
    looked up on first use: every kernel imports this module, few populate."""
    f = ctypes.CDLL(None, use_errno=True).madvise
    f.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return f


class PhysMem:
    """The machine's physical memory: a file in /dev/shm, mapped shared."""

    def __init__(
        self, path: str, size: int | None = None, create: bool = False, readonly: bool = False
    ):
        self.path, self.readonly = path, readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(path, flags, param.OWNER_ONLY_MODE)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: no physical-memory file (is the machine up?)"
            ) from None
        try:
            if create:
                os.fchmod(fd, param.OWNER_ONLY_MODE)  # explicit, not left to the umask
                os.ftruncate(fd, size)
            self.size = os.fstat(fd).st_size
            if size is not None and self.size != size:
                raise ValueError(f"{path}: physical memory is {self.size} bytes, expected {size}")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.view = memoryview(self.mm)
        self.watchers: list[Watcher] = []
        self.watch_span = (0, self.size)  # [lo, hi): stores outside it call no watcher
        self.watch_pages: bytearray | None = None  # per page of the span: 0 = not protected

    # The one write accessor.  Watchers see (phys, data) before the store lands.
    def write(self, phys: int, data) -> None:
        n = len(data)
        if phys < 0 or phys + n > self.size:
            raise ValueError(f"physmem write {phys:#x}+{n} outside memory of {self.size:#x} bytes")
        if self.watchers:
            lo, hi = self.watch_span
            wp = self.watch_pages
            # inline, not a helper: it runs for every store beneath a VMM
            if (
                phys < hi
                and phys + n > lo
                and (
                    wp is None
                    or wp.find(
                        1, max(phys - lo, 0) >> _SHIFT, ((min(phys + n, hi) - lo - 1) >> _SHIFT) + 1
                    )
                    >= 0
                )
            ):
                for w in self.watchers:
                    w(phys, data)
        self.mm[phys : phys + n] = data

    def read(self, phys: int, n: int) -> bytes:
        return self.mm[phys : phys + n]

    def array(self, dtype: np.dtype, phys: int, count: int) -> np.ndarray:
        """A read-only numpy view for bulk scans (never written through)."""
        a = np.frombuffer(self.mm, dtype=dtype, count=count, offset=phys)
        a.flags.writeable = False
        return a

    def populate(self, starts: np.ndarray, lengths: np.ndarray) -> bool:
        """Map ranges of this memory into this process's page tables now, ahead of a bulk
        read of them (Linux's MADV_POPULATE_READ, one system call a range, each releasing
        the interpreter lock): a reader that knows what it will read takes its page faults
        here, in the background of other work, not one by one as it reads. Only a hint:
        False where the kernel cannot (the read then faults as usual)."""
        starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        if len(starts) and (starts.min() < 0 or (starts + lengths).max() > self.size):
            raise ValueError(f"populate: a range lies outside memory of {self.size:#x} bytes")
        base = np.frombuffer(self.mm, np.uint8).ctypes.data  # the view goes on return
        lead, madvise = starts % PAGE, _madvise()  # the call wants a page-aligned start
        for s, n in zip((starts - lead).tolist(), (lengths + lead).tolist()):
            if madvise(ctypes.c_void_p(base + s), n, _MADV_POPULATE_READ):
                return False
        return True

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a numpy view is still alive; the mapping goes with the process

    @staticmethod
    def unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
