"""The warm-cache VMM: a layer beneath a guest kernel that owns its memory and its disk.

Promises to the warm-cache scheme (systems/warmcache; Kourai, VEE'11):

* it learns which page frame of the guest holds which disk block at which write generation:
  from the block layer (what each read returned; which frames each write-back came from, as a
  paravirtual request's scatter list names them) and from the one physmem write accessor
  (where the data of a read landed);
* it invalidates a frame the moment the guest stores into it (write tracking): it
  write-protects every frame it holds a CLEAN or WARM copy in, so the first store into one
  reaches it; it then lifts the protection, as a VMM does through the MMU;
* its tables live in a region of its own (a file beside the machine's memory) that the guest
  partition does not own, so they outlive the guest; the file is its owner's only
  (param.OWNER_ONLY_MODE, also when an older region is overwritten): it holds guest pages;
* after the guest died, ``preserve()`` checks every frame it tracked — its entry's seal, its
  block's generation, its content checksum — and keeps the consistent ones WARM, one per block;
* beneath the next kernel, a read of a block with a WARM copy is served from memory without
  the device model's delay, checked again before it is used (same block, same generation,
  same content — the content in the very copy the reader gets, so what is checked is what
  is served); a copy that fails is refused, counted, and its block read from the disk;
  every other read goes to the disk. A WARM page whose frame the new kernel stores into is
  first moved aside into the region's spare pages (what a VMM does by swapping machine frames);
* it names the frames that hold WARM copies (``warm_frames``), and a kernel beneath it fills
  those frames last (kernel/core/kernel.py ``boot``, pagecache ``FreeFrames.hand_out_last``), so the
  spare pages — and the copies — are used up only once the new kernel needs those frames.

Cost: a kernel without this layer pays nothing (no watcher, the plain device). With it, a
store into a protected frame pays one call and a table look-up (every other store only
PhysMem's look-up in the protection map, the MMU's work, charged to the kernel), a landed
read two xxh3 hashes per page from the device and one per page served warm (its hash and
seal, checked when it was served, are reused: a warm page is hashed twice in all, once to
serve it and once as it lands), a write a generation bump per block and, per page written
back, one hash and one 32-byte entry. Those paths use struct and memoryview on the region,
not numpy scalars. Protection matters most: on a PostgreSQL-like loop in one process (an
8 KiB page write, a WAL append and its fsync per operation) the guest stored into frames 36
times per operation, 2 of them into frames with a copy; with protection, and a seal that
leaves the state out, the VMM's share of that loop's time went from 9.3 % to 5.4 %. Each
entry point (watch, read_done, write_begin, write_done, claim, check_served) adds its own
wall time to the counter ``busy_ns`` — two clock reads a call, counted in it — so the harness tells the VMM's
time from the kernel's without a profiler (harness/cpuuse.py).

Region layout (one file; areas page-aligned)::

    +0      header       1 page          magic VMMR, geometry, area offsets, xxh3 checksum
    +4K     counters     1 page          u64 statistics (never trusted for a decision)
    +8K     frame table  nframes x 32 B  one entry per guest frame
    ...     spare table  nspare x 32 B   one entry per spare page
    ...     generations  nblocks x u32   write generation of every disk block
    ...     spare pages  nspare x 4 KiB  WARM pages moved out of the new kernel's way

An entry::

    0 block u64 | 8 csum u64 (xxh3 of the page) | 16 gen u32 | 20 state u16 | 22 pad | 24 seal u64

The seal is a multiplicative mix of block, csum and gen, checkable in bulk with numpy: a torn
or stray entry is refused. The state is left out of it, so that invalidating a frame is one
2-byte store: a stray state cannot serve a wrong page, since only CLEAN and WARM copies are
ever used, and only after their content matches csum. States: FREE; CLEAN (the frame holds
the block as of gen); DIRTIED (it did, then the guest stored into it); WARM (kept across a
crash for the next kernel).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time

import numpy as np
import xxhash

from kernel import param
from kernel.hw.physmem import PAGE_DESC, PG_VALID, Layout, PartLayout, PhysMem

PAGE = param.PAGE_SIZE
_SHIFT = PAGE.bit_length() - 1
_csum = xxhash.xxh3_64_intdigest
FREE, CLEAN, DIRTIED, WARM = 0, 1, 2, 3

ENTRY = np.dtype(
    [
        ("block", "<u8"),
        ("csum", "<u8"),
        ("gen", "<u4"),
        ("state", "<u2"),
        ("pad", "<u2"),
        ("seal", "<u8"),
    ]
)
# a whole entry by struct, a state through a strided memoryview: on the paths that run for
# every write of a running kernel, a numpy scalar access costs more
_ENTRY = struct.Struct("<QQIHHQ")
_STATE_AT = 20
_ESIZE = _ENTRY.size
_BLOCK = struct.Struct("<Q")
_ZERO_ENTRY = bytes(_ESIZE)
HEADER = Layout(
    "VMM region header",
    "VMMR",
    2,
    [  # 2: the seal leaves the state out
        ("nframes", "Q"),
        ("frames_phys", "Q"),
        ("nblocks", "Q"),
        ("nspare", "Q"),
        ("ftab", "Q"),
        ("stab", "Q"),
        ("gens", "Q"),
        ("spare", "Q"),
        ("size", "Q"),
    ],
    128,
)
COUNTERS = (
    # live, beneath a running kernel
    "registered",
    "invalidated",
    "device_blocks",
    "reused",
    "refused_inconsistent",
    "refused_corrupted",
    "moved_aside",
    "dropped",
    "busy_ns",  # wall time inside the VMM's entry points beneath a running kernel
    # the last preserve(), after a crash
    "preserved",
    "inconsistent",
    "corrupted",
    "duplicates",
    "kept",
)
_C = {n: i for i, n in enumerate(COUNTERS)}
_BUSY, _REGISTERED, _INVALIDATED = _C["busy_ns"], _C["registered"], _C["invalidated"]
_MOVED, _DROPPED = _C["moved_aside"], _C["dropped"]
_clock = time.perf_counter_ns
_LIVE = COUNTERS.index("reused")  # counters from here on start afresh at every preserve()

_M = (1 << 64) - 1
_K = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)
_KU = tuple(np.uint64(k) for k in _K)


class VmmError(RuntimeError):
    """The VMM region is missing, corrupted or made for another machine."""


def seal(block: int, csum: int, gen: int) -> int:
    return ((block ^ _K[0]) * _K[1] + (csum ^ _K[2]) * _K[3] + (gen ^ _K[1]) * _K[0]) & _M


def seal_np(e: np.ndarray) -> np.ndarray:
    """The same mix over many entries (uint64 arithmetic wraps, as the & does above)."""
    return (
        (e["block"] ^ _KU[0]) * _KU[1]
        + (e["csum"] ^ _KU[2]) * _KU[3]
        + (e["gen"].astype(np.uint64) ^ _KU[1]) * _KU[0]
    )


def region_path(physmem_path: str) -> str:
    """The VMM's region lives beside the machine's memory, in a file of its own."""
    return physmem_path + "-vmm"


def _align(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


class Region:
    """The VMM's own memory, mapped shared: tables, generations, counters, spare pages."""

    def __init__(self, path: str):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise VmmError(
                f"{path}: no VMM region (is the machine deployed under warmcache?)"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size < 2 * PAGE:
                raise VmmError(f"{path}: VMM region of {size} bytes is too small")
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path = path
        try:
            self.hdr = HEADER.decode(self.mm, 0)
        except Exception as e:
            raise VmmError(f"{path}: {e}") from None
        h = self.hdr
        if h["size"] != size:
            raise VmmError(f"{path}: header says {h['size']} bytes, the region has {size}")
        self.nframes, self.nblocks, self.nspare = h["nframes"], h["nblocks"], h["nspare"]
        self.frames_phys = h["frames_phys"]
        self.counters = np.frombuffer(self.mm, np.uint64, len(COUNTERS), PAGE)
        self.ft = np.frombuffer(self.mm, ENTRY, self.nframes, h["ftab"])
        self.st = np.frombuffer(self.mm, ENTRY, self.nspare, h["stab"])
        self.gens = np.frombuffer(self.mm, np.uint32, self.nblocks, h["gens"])
        self.spare = np.frombuffer(self.mm, np.uint8, self.nspare * PAGE, h["spare"]).reshape(
            -1, PAGE
        )

    @classmethod
    def create(
        cls, path: str, lay: PartLayout, nblocks: int, nspare: int = param.VMM_SPARE_PAGES
    ) -> "Region":
        """A fresh region for the guest whose page frames ``lay`` describes (all FREE)."""
        ftab = 2 * PAGE
        stab = _align(ftab + lay.nframes * ENTRY.itemsize)
        gens = _align(stab + nspare * ENTRY.itemsize)
        spare = _align(gens + nblocks * 4)
        size = spare + nspare * PAGE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, param.OWNER_ONLY_MODE)
        try:
            os.fchmod(fd, param.OWNER_ONLY_MODE)  # a region left by an older run keeps its mode
            os.ftruncate(fd, size)  # sparse: untouched tables and spare pages cost nothing
            os.pwrite(
                fd,
                HEADER.encode(
                    nframes=lay.nframes,
                    frames_phys=lay.frames,
                    nblocks=nblocks,
                    nspare=nspare,
                    ftab=ftab,
                    stab=stab,
                    gens=gens,
                    spare=spare,
                    size=size,
                ),
                0,
            )
        finally:
            os.close(fd)
        return cls(path)

    def stats(self) -> dict[str, int]:
        return dict(zip(COUNTERS, self.counters.tolist()))

    def close(self) -> None:
        for a in ("counters", "ft", "st", "gens", "spare"):
            setattr(self, a, None)
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process

    @staticmethod
    def unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --- beneath a running kernel -------------------------------------------------------------


class Vmm:
    """Write tracking and warm reads for one guest partition (runs beneath its kernel)."""

    def __init__(self, mem: PhysMem, lay: PartLayout, region: Region):
        if (region.nframes, region.frames_phys) != (lay.nframes, lay.frames):
            raise VmmError(
                f"{region.path}: made for {region.nframes} frames at "
                f"{region.frames_phys:#x}, the guest has {lay.nframes} at {lay.frames:#x}"
            )
        self.mem, self.lay, self.r = mem, lay, region
        self.f0, self.flen, self.nframes = lay.frames, lay.nframes * PAGE, lay.nframes
        ft = region.ft
        mv = memoryview(region.mm)
        self._ctr = mv[PAGE : PAGE + 8 * len(COUNTERS)].cast("Q")  # region.counters, for scalars
        h = region.hdr
        self._gens = mv[h["gens"] : h["gens"] + 4 * region.nblocks].cast(
            "I"
        )  # region.gens, likewise
        self._mm, self._mv, self._ft = region.mm, mv, h["ftab"]
        self._st, self._spare = h["stab"], h["spare"]
        words = ENTRY.itemsize // 2
        self._state = mv[h["ftab"] : h["ftab"] + ENTRY.itemsize * region.nframes].cast("H")[
            _STATE_AT // 2 :: words
        ]
        # the last read, while its pages land: [first block, gens, data, next page, known]
        self.pending: list | None = None
        self.warm: dict[int, int] = {}  # block -> frame, or -(spare slot + 1)
        wf = np.flatnonzero(ft["state"] == WARM)
        ws = np.flatnonzero(region.st["state"] == WARM)
        self.warm.update(zip(ft["block"][wf].tolist(), wf.tolist()))
        self.warm.update(zip(region.st["block"][ws].tolist(), (-1 - ws).tolist()))
        self.free_spare = np.flatnonzero(region.st["state"] == FREE)[::-1].tolist()
        # write protection, one byte a frame: a store into a frame with a copy must reach watch()
        self.wp = bytearray(np.isin(ft["state"], (CLEAN, WARM)).astype(np.uint8).tobytes())

    def warm_frames(self) -> np.ndarray:
        """The guest frames holding a WARM copy: what a new kernel should fill last (each
        frame it fills first moves the copy to a spare page, or drops it when none is left)."""
        return np.flatnonzero(self.r.ft["state"] == WARM)

    def install(self) -> None:
        """Watch the guest's stores: those into a protected frame, or all while a read lands."""
        mem = self.mem
        mem.watchers.append(self.watch)
        mem.watch_span = (
            self.f0,
            self.f0 + self.flen,
        )  # descriptors, inodes: not the VMM's business
        mem.watch_pages = self.wp

    def _expect(self, pending: list | None) -> None:
        """A read's pages land in the next stores, wherever they go: watch every frame till then."""
        self.pending = pending
        self.mem.watch_pages = None if pending is not None else self.wp

    def _count(self, name: str, n: int = 1) -> None:
        self._ctr[_C[name]] += n

    def _timed(self, t0: int) -> None:
        """(watch, write_begin and write_done have this inline: they run for every write.)"""
        self._ctr[_BUSY] += _clock() - t0

    # --- the physmem watcher: sees every store into a protected frame before it lands ----
    def watch(self, phys: int, data) -> None:
        t0 = _clock()
        self._watch(phys, data)
        self._ctr[_BUSY] += _clock() - t0

    def _watch(self, phys: int, data) -> None:
        lo = phys - self.f0
        if lo < 0 or lo >= self.flen:
            return
        n = len(data)
        f = lo >> _SHIFT
        last = min((lo + n - 1) >> _SHIFT, self.nframes - 1)
        if f != last:
            self._stores(f, last + 1)
            return
        s = self._state[f]
        if s == WARM:
            self._move_aside(f)
            s = FREE
        if self.pending is not None:
            if n == PAGE and not lo & (PAGE - 1) and self._landed(f, data):
                return
            self._expect(None)  # a read's data lands in the very next frame stores, or never
        if s == CLEAN:
            self._invalidate(f)

    def _stores(self, lo: int, hi: int) -> None:
        """A store over several frames (a run of whole pages): invalidate them all. Runs are
        short (PostgreSQL writes 8 KiB pages), so per frame in Python, not numpy, whose
        calls cost more than two frames do."""
        if self.pending is not None:
            self._expect(None)
        states = self._state[lo:hi].tolist()
        if WARM in states or CLEAN in states:
            for f, s in enumerate(states, lo):
                if s == WARM:
                    self._move_aside(f)
                elif s == CLEAN:
                    self._invalidate(f)

    def _landed(self, f: int, data) -> bool:
        """Is this store the next page of the last read? Then the frame holds that block.
        A page served warm came with its checked hash and seal (``known``): one hash of the
        store then, and no seal to compute; a page from the device is hashed on both sides."""
        p = self.pending
        first, gens, got, k, known = p
        h = _csum(data)
        kn = known[k] if known is not None else None
        if kn is not None and kn[1] == gens[k]:
            if h != kn[0]:
                return False
            sl = kn[2]
        elif h != _csum(got[k * PAGE : (k + 1) * PAGE]):
            return False
        else:
            sl = None
        if k + 1 < len(gens):
            p[3] = k + 1
        else:
            self._expect(None)
        self._register(f, first + k, gens[k], h, sl)
        return True

    def _register(self, f: int, block: int, gen: int, h: int, sl: int | None = None) -> None:
        """The frame holds block as of gen, content hash h (sl: its seal, if known)."""
        if self._state[f] == WARM:
            self._move_aside(f)
        # one 32-byte store; a torn one (the kernel killed inside it) breaks the seal
        _ENTRY.pack_into(
            self._mm,
            self._ft + f * ENTRY.itemsize,
            block,
            h,
            gen,
            CLEAN,
            0,
            seal(block, h, gen) if sl is None else sl,
        )
        self.wp[f] = 1
        self._ctr[_REGISTERED] += 1

    def _invalidate(self, f: int) -> None:
        """The guest stored into a CLEAN frame: mark it DIRTIED and stop watching it."""
        self._state[f] = DIRTIED
        self.wp[f] = 0
        self._ctr[_INVALIDATED] += 1

    def _move_aside(self, f: int) -> None:
        """The new kernel reuses a frame holding a WARM page: keep the page elsewhere.
        (Bytes moved by slices of the region's mapping: this runs for most frames a new
        kernel fills, and numpy's structured-entry assignment costs several times more.
        What is left is mostly the first store's page fault in the spare area; mapping
        it ahead with MADV_POPULATE_WRITE cost as much per page, so it is not done.)"""
        mm, off, warm = self._mm, self._ft + f * _ESIZE, self.warm
        block = _BLOCK.unpack_from(mm, off)[0]
        if warm.get(block) == f:
            if self.free_spare:
                slot = self.free_spare.pop()
                p, sp, so = self.f0 + f * PAGE, self._spare + slot * PAGE, self._st + slot * _ESIZE
                self._mv[sp : sp + PAGE] = self.mem.view[p : p + PAGE]
                mm[so : so + _ESIZE] = mm[off : off + _ESIZE]
                warm[block] = -1 - slot
                self._ctr[_MOVED] += 1
            else:
                del warm[block]
                self._ctr[_DROPPED] += 1
        mm[off : off + _ESIZE] = _ZERO_ENTRY
        self.wp[f] = 0

    # --- the block layer ----------------------------------------------------------------
    def read_done(self, first: int, count: int, data, known: list | None = None) -> None:
        """A read returned: its pages may land in frames next (hashed only if they do).
        ``known``: per page, (hash, gen, seal) of a page served warm and checked, else None."""
        t0 = _clock()
        gens = self._gens[first : first + count].tolist()
        self._expect([first, gens, memoryview(data), 0, known])
        self._timed(t0)

    def write_begin(self, first: int, count: int) -> None:
        """Before a write lands: every copy of these blocks is out of date from now on."""
        t0 = _clock()
        if count <= 16:  # a numpy call costs more than a few blocks do
            g = self._gens
            for b in range(first, first + count):
                g[b] = (g[b] + 1) & 0xFFFF_FFFF  # wraps, as the numpy array does
        else:
            self.r.gens[first : first + count] += 1
        if self.warm:
            for b in range(first, first + count):
                loc = self.warm.pop(b, None)
                if loc is not None:
                    self._free(loc)
                    self._count("refused_inconsistent")
        self._ctr[_BUSY] += _clock() - t0

    def write_done(self, first: int, data, src: list[int]) -> None:
        """A write-back landed: each source frame holds its block as of the new generation."""
        t0 = _clock()
        if len(src) == 1:  # most write-backs of a database: one page, hashed whole
            self._register_src(src[0], first, data)
        else:
            mv = memoryview(data).cast("B")
            for k, p in enumerate(src):
                self._register_src(p, first + k, mv[k * PAGE : (k + 1) * PAGE])
        self._ctr[_BUSY] += _clock() - t0

    def _register_src(self, p: int, block: int, page) -> None:
        """The frame at physical address p (a write's source) holds block: register it."""
        lo = p - self.f0
        if 0 <= lo < self.flen and not lo & (PAGE - 1):
            self._register(lo >> _SHIFT, block, self._gens[block], _csum(page))

    def claim(self, first: int, count: int) -> list | None:
        """The WARM copies of blocks first.. as locations (None: no copy), taken out of the
        warm set whatever ``check_served`` finds; None if no block has one."""
        t0 = _clock()
        pop = self.warm.pop
        locs = [pop(b, None) for b in range(first, first + count)]
        if locs.count(None) == count:
            locs = None
        self._ctr[_BUSY] += _clock() - t0
        return locs

    def pages_at(self, locs: list) -> list[memoryview]:
        """The pages locations name (each a frame of the guest or a spare page), as views."""
        view, f0, mv, sp = self.mem.view, self.f0, self._mv, self._spare
        return [
            view[f0 + loc * PAGE : f0 + (loc + 1) * PAGE]
            if loc >= 0
            else mv[sp + (-1 - loc) * PAGE : sp - loc * PAGE]
            for loc in locs
        ]

    def check_served(self, first: int, locs: list, data: bytes) -> tuple[list, list[int]]:
        """Check the copies of claimed pages, as ``data`` (the read's bytes) holds them.

        The check runs on the copy the reader gets, not on the frame, so what it checks is
        what it serves: entry (state WARM, this block, seal), generation, content hash. Every
        location is freed. Returns, per page, (hash, gen, seal) of a page that passed (the
        landing then needs no second hash) or None, and the indexes of those refused."""
        t0 = _clock()
        mv, mm, unpack, gens = memoryview(data), self._mm, _ENTRY.unpack_from, self._gens
        known: list = [None] * len(locs)
        refused, corrupted = [], 0
        for k, loc in enumerate(locs):
            if loc is None:
                continue
            off = self._ft + loc * _ESIZE if loc >= 0 else self._st + (-1 - loc) * _ESIZE
            blk, h, gen, state, _, sl = unpack(mm, off)
            b = first + k
            if (
                state != WARM
                or blk != b
                or sl != seal(blk, h, gen)
                or _csum(mv[k * PAGE : (k + 1) * PAGE]) != h
            ):
                corrupted += 1
                refused.append(k)
            elif gen != gens[b]:
                refused.append(k)
            else:
                known[k] = (h, gen, sl)
            mm[off : off + _ESIZE] = _ZERO_ENTRY
            if loc >= 0:
                self.wp[loc] = 0
            else:
                self.free_spare.append(-1 - loc)
        ctr = self._ctr
        ctr[_C["reused"]] += len(locs) - locs.count(None) - len(refused)
        ctr[_C["refused_corrupted"]] += corrupted
        ctr[_C["refused_inconsistent"]] += len(refused) - corrupted
        ctr[_BUSY] += _clock() - t0
        return known, refused

    def _free(self, loc: int) -> None:
        if loc >= 0:
            self.r.ft[loc] = 0
            self.wp[loc] = 0
        else:
            self.r.st[-1 - loc] = 0
            self.free_spare.append(-1 - loc)


class VmmDisk:
    """The guest's disk as the VMM presents it: the real device, with warm reads and tracking."""

    def __init__(self, dev, vmm: Vmm):
        self.dev, self.vmm = dev, vmm

    def __getattr__(self, name):
        return getattr(self.dev, name)  # nblocks, flush, stats, close, path, ...

    def read(self, blockno: int, count: int = 1) -> bytes:
        v, locs = self.vmm, None
        if v.warm:
            self.dev._check(blockno, count)  # before any copy is claimed
            locs = v.claim(blockno, count)
        if locs is None:
            data, known = self.dev.read(blockno, count), None
            v._count("device_blocks", count)
        else:
            data, known = self._read_warm(blockno, count, locs)
        v.read_done(blockno, count, data, known)
        return data

    def _read_warm(self, blockno: int, count: int, locs: list) -> tuple[bytes, list]:
        """Warm pages from memory (no modeled delay), the runs in between from the device,
        copied once into the read's bytes; then the warm ones are checked in that copy and
        any refused is read again from the device."""
        if None not in locs:  # the common case: the whole request is warm
            parts = self.vmm.pages_at(locs)
            i = count
        else:
            parts, i = [], 0
        while i < count:
            j = i + 1
            if locs[i] is not None:
                parts += self.vmm.pages_at(locs[i:j])
            else:
                while j < count and locs[j] is None:
                    j += 1
                parts.append(self.dev.read(blockno + i, j - i))
                self.vmm._count("device_blocks", j - i)
            i = j
        data = b"".join(parts)
        del parts  # views of the guest's memory: not kept past the copy
        known, refused = self.vmm.check_served(blockno, locs, data)
        if refused:
            data = self._reread(blockno, data, refused)
        return data, known

    def _reread(self, blockno: int, data: bytes, refused: list[int]) -> bytes:
        buf = bytearray(data)
        for k in refused:
            buf[k * PAGE : (k + 1) * PAGE] = self.dev.read(blockno + k)
        self.vmm._count("device_blocks", len(refused))
        return bytes(buf)

    def write(self, blockno: int, data, src: list[int] | None = None) -> None:
        count = memoryview(data).nbytes // PAGE
        self.vmm.write_begin(blockno, count)
        self.dev.write(blockno, data, src)
        if src:
            self.vmm.write_done(blockno, data, src)


def attach(kernel, path: str) -> VmmDisk:
    """Put the VMM beneath a kernel before it boots: watch its stores, wrap its disk."""
    v = Vmm(kernel.mem, kernel.lay, Region(path))
    dev = kernel.open_disk()
    if dev.nblocks != v.r.nblocks:
        dev.close()
        raise VmmError(
            f"{path}: made for a disk of {v.r.nblocks} blocks, the guest's has {dev.nblocks}"
        )
    v.install()
    kernel.vmm = v
    return VmmDisk(dev, v)


# --- after the guest died ---------------------------------------------------------------


def preserve(region: Region, mem: PhysMem, lay: PartLayout) -> dict:
    """Check what the dead guest's frames still hold; keep the consistent pages WARM.

    Run with the guest fenced (nothing of it runs). An entry is *inconsistent* if its frame
    was stored into since (DIRTIED) or its block was written since (generation), *corrupted*
    if its seal or the page's content checksum does not match. Of several consistent copies
    of one block one is kept. Returns the counts and the frames kept and found corrupted.

    This runs inside the outage: table work is done on the entries as rows of four words
    (a fancy index over the structured table costs several times more), and the content
    checks are one xxh3 call per page with no Python frame per page (page_hashes)."""
    ft, st = region.ft, region.st
    fi = np.flatnonzero(ft["state"] != FREE)
    si = np.flatnonzero(st["state"] == WARM)
    pages = mem.array(np.uint8, lay.frames, lay.nframes * PAGE).reshape(-1, PAGE)
    fk, fbad, f_incons = _check(region, _entries(ft, fi), lambda w: page_hashes(pages, fi[w]))
    sk, sbad, s_incons = _check(
        region, _entries(st, si), lambda w: page_hashes(region.spare, si[w])
    )
    keep_f, keep_s = fi[fk], si[sk]
    blocks = np.concatenate([ft["block"][keep_f], st["block"][keep_s]])
    first = _first_copies(blocks, region.nblocks)
    dup = len(blocks) - int(np.count_nonzero(first))
    keep_f, keep_s = keep_f[first[: len(keep_f)]], keep_s[first[len(keep_f) :]]
    _keep_only(ft, fi, keep_f)
    _keep_only(st, si, keep_s)
    counts = {
        "preserved": len(fi) + len(si) - dup,
        "inconsistent": f_incons + s_incons,
        "corrupted": int(len(fbad) + len(sbad)),
        "duplicates": dup,
        "kept": len(keep_f) + len(keep_s),
    }
    region.counters[_LIVE:] = 0
    for k, n in counts.items():
        region.counters[_C[k]] = n
    return {**counts, "kept_frames": keep_f, "corrupted_frames": fi[fbad]}


def map_ahead(region: Region, mem: PhysMem, lay: PartLayout) -> threading.Thread:
    """Start mapping, in a thread, what preserve() over ``mem`` will read: the frames the
    VMM tracked and the page descriptors. Page-table work only — nothing read decides
    anything — so it may start while the dead guest is still being fenced; preserve()
    then reads through mappings already made (a fresh mapping's page faults were about
    half of its time). Join the thread before preserve() and before closing ``mem``."""
    fi = np.flatnonzero(region.ft["state"] != FREE)
    cut = np.flatnonzero(np.diff(fi) != 1) + 1
    lo, hi = np.r_[0, cut], np.r_[cut, len(fi)]
    starts = np.r_[lay.desc, lay.frames + fi[lo[lo < len(fi)]] * PAGE]
    lengths = np.r_[lay.nframes * PAGE_DESC.size, (hi - lo)[lo < len(fi)] * PAGE]
    t = threading.Thread(target=mem.populate, args=(starts, lengths), name="vmm map-ahead")
    t.start()
    return t


def _rows(tab: np.ndarray) -> np.ndarray:
    """A table of entries as rows of four u64 words (the same memory)."""
    return tab.view(np.uint64).reshape(-1, ENTRY.itemsize // 8)


def _entries(tab: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """A copy of entries ``idx`` of a table."""
    return _rows(tab)[idx].view(ENTRY).reshape(-1)


def _keep_only(tab: np.ndarray, idx: np.ndarray, keep: np.ndarray) -> None:
    """Of entries ``idx``, those in ``keep`` (a subset) become WARM, the others FREE."""
    gone = np.ones(len(tab), bool)
    gone[keep] = False
    _rows(tab)[idx[gone[idx]]] = 0
    tab["state"][keep] = WARM


def _first_copies(blocks: np.ndarray, nblocks: int) -> np.ndarray:
    """Mask of the first entry of each block (all, unless a block has several copies)."""
    if len(blocks) and np.bincount(blocks.astype(np.intp), minlength=nblocks).max() > 1:
        first = np.zeros(len(blocks), bool)
        first[np.unique(blocks, return_index=True)[1]] = True
        return first
    return np.ones(len(blocks), bool)


_RUN = 32  # rows from which a run is iterated as one slice (below, its per-run cost dominates)


def page_hashes(pages: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """xxh3 of rows ``idx`` (ascending) of ``pages``, one page a row. One call per page,
    made by map over row views: per run of adjacent rows (a dead kernel allocates frames in
    order) numpy's own iteration makes the views; lone rows are looked up one by one."""
    out = np.empty(len(idx), np.uint64)
    if not len(idx):
        return out
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    lo, hi = np.r_[0, cut], np.r_[cut, len(idx)]
    long = hi - lo >= _RUN
    for a, b, f in zip(lo[long].tolist(), hi[long].tolist(), idx[lo[long]].tolist()):
        out[a:b] = np.fromiter(map(_csum, pages[f : f + b - a]), np.uint64, b - a)
    if not long.all():
        short = np.repeat(~long, hi - lo)
        rows = idx[short].tolist()
        out[short] = np.fromiter(map(_csum, map(pages.__getitem__, rows)), np.uint64, len(rows))
    return out


def _check(region: Region, e: np.ndarray, hashes) -> tuple[np.ndarray, np.ndarray, int]:
    """(keep mask, indexes of corrupted, number inconsistent) for entries e; hashes(w) is
    the xxh3 of the pages of entries w, asked only for those whose everything else holds."""
    sealed = (seal_np(e) == e["seal"]) & (e["block"] < region.nblocks) & (e["state"] <= WARM)
    now = region.gens[np.minimum(e["block"], region.nblocks - 1)]
    fresh = sealed & (e["state"] != DIRTIED) & (e["gen"] == now)
    content = np.zeros(len(e), bool)
    which = np.flatnonzero(fresh)
    content[which] = hashes(which) == e["csum"][which]
    corrupted = np.flatnonzero(~sealed | (fresh & ~content))
    return fresh & content, corrupted, int(np.count_nonzero(sealed & ~fresh))


def file_pages(mem: PhysMem, lay: PartLayout) -> np.ndarray:
    """Frames the dead kernel's descriptors call file pages (for the report's file-cache counts)."""
    d = mem.array(PAGE_DESC.dtype, lay.desc, lay.nframes)
    return (d["magic"] == PAGE_DESC.magic) & ((d["flags"] & PG_VALID) != 0) & (d["ino"] != 0)
