"""Fault injection at named sites, in the SWIFI / lkdtm vocabulary.

Promises to the lab commands, the harness and the recovery schemes:

* ``FAULTS``: panic (BUG/oops), hang (a lock never released: the heartbeat really stops),
  kill (SIGKILL, no dying message), wild-write and bit-flip (into a chosen ``TARGETS``
  object, or a random one; or into an open-file record of the process table, in a kernel
  that records them, or into the in-flight request entry of the request in hand when the
  fault activates: ``PROCESS_TARGETS``), fs-corrupt (a bad block pointer written into file-system
  metadata), exception-in-request (an error in the middle of a file operation, after part
  of its updates);
* a fault is *injected* (armed, and for memory faults the corruption done) and later
  *activated* when execution reaches its site (``SITES``; "now" activates at once); both
  times and the site are written into the kernel's mailbox, which outlives the kernel;
* corruption goes through PhysMem.write like any store, but around the kernel's
  bookkeeping: checksums are NOT updated, exactly as a wild pointer would leave them;
* ``NoFaults`` is the no-op injector every kernel has until a fault is armed;
* ``found_corruption(site, reason)``: the kernel's own check found its state corrupted where
  going on would write it to disk (``CHECK_SITES``): a running kernel panics there, with that
  reason, and an armed fault that corrupts is activated by it (the kernel tripped on it); a
  storage stack without a kernel (``NoFaults``) raises ``KernelPanic`` instead.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from kernel.core.icache import BDEV_INO
from kernel.hw.physmem import ICORE, PG_DIRTY

ICORE_LINKS = ICORE.dtype.fields["next_dirty"][1]

FAULTS = {
    "panic": "BUG/oops: the kernel writes a dying message and dies",
    "hang": "a lock is never released: requests and the heartbeat stop, the process lives",
    "kill": "the kernel process is killed (SIGKILL): no dying message",
    "wild-write": "64 random bytes written into a kernel object or page, then an oops",
    "bit-flip": "one bit flipped in a kernel object or page, then an oops",
    "fs-corrupt": "a bad block pointer written into file-system metadata; the kernel trips on it",
    "exception-in-request": "an error in the middle of a file operation, after part of its updates",
}
TARGETS = {
    "dirty-page": "the frame of a dirty file page",
    "clean-page": "the frame of a clean file page",
    "page-descriptor": "the descriptor of a dirty file page",
    "dirty-inode-list": "the link of an in-core inode on the dirty-inode list",
    "inode": "an in-core inode's fields",
    "superblock": "the kernel superblock",
    "crash-kernel": "the crash-kernel image loaded in the partition's reserved area",
}
# Targets in what a kernel keeps of its processes: only a kernel that records its apps'
# open files (one whose processes are kept, kernel/core/proc.py) has them, so a campaign's
# cells and a random target are drawn from OBJECT_TARGETS alone.
PROCESS_TARGETS = {
    "open-file": "an open-file record in the process table (the holder's entry fails its check)",
    "in-flight": "the in-flight table's entry of the request in hand when the fault activates "
    "(at site fuse.reply: a request applied, its reply not sent)",
}
ALL_TARGETS = TARGETS | PROCESS_TARGETS
# the kernel's own objects: what a wild write with no target may hit and a campaign covers
# (a seed's choice stays what it was before the crash-kernel target, which a partition
# without a loaded crash kernel does not have)
OBJECT_TARGETS = [t for t in TARGETS if t != "crash-kernel"]
SITES = {
    "now": "at once, from the control thread",
    "vfs.lookup": "inside a lookup request, after the inode was loaded in core",
    "vfs.create": "inside a create request, after the name was added",
    "vfs.mkdir": "inside a mkdir request, after the directory was made",
    "vfs.write": "inside a write request, after its first page was stored",
    "vfs.rename": "inside a rename request, after the names moved",
    "vfs.unlink": "inside an unlink or rmdir request, after the name was removed",
    "vfs.truncate": "inside a truncate, after the cached pages were cut",
    "vfs.setattr": "inside a setattr request, after the on-disk inode changed",
    "fs.journal-start": "inside a file-system operation, just after it joined the transaction",
    "fs.dir-update": "inside a directory update, after the entry was added or removed",
    "fs.inode-alloc": "inside an inode allocation, after the number was taken",
    "fs.block-alloc": "inside a block allocation (write-back, a directory or indirect block)",
    "writeback": "inside write-back, after the data blocks were written",
    "fuse.reply": "after a request's change was applied and recorded in flight, before its reply",
}
# where the kernel checks its own state before it writes it to disk: not a site a fault is
# armed at, but where a corruption it made is found (the dying message names it)
CHECK_SITES = {
    "pagecache": "a cached page fails its checksum before a partial store or its write-back",
    "fs.check": "an inode of the transaction about to commit points outside the data area",
}
CORRUPTING = ("wild-write", "bit-flip", "fs-corrupt")
# the sites only request handling reaches (fs.journal-start and fs.block-alloc are also
# reached by write-back, which runs outside any request)
REQUEST_SITES = tuple(s for s in SITES if s.startswith("vfs.")) + (
    "fs.dir-update",
    "fs.inode-alloc",
)


class FaultError(ValueError):
    """A fault request names an unknown fault, target or site, or cannot be carried out."""


@dataclass
class Fault:
    kind: str
    target: str | None
    site: str
    injected_ns: int = 0
    activated_ns: int = 0
    detail: str = ""


def validate(kind: str, target: str | None, site: str | None, seed=None) -> None:
    if kind not in FAULTS:
        raise FaultError(f"unknown fault {kind!r} (known: {', '.join(FAULTS)})")
    if target is not None and target not in ALL_TARGETS:
        raise FaultError(f"unknown target {target!r} (known: {', '.join(ALL_TARGETS)})")
    if target is not None and kind not in ("wild-write", "bit-flip"):
        raise FaultError(f"fault {kind!r} takes no target")
    if site is not None and site not in SITES:
        raise FaultError(f"unknown site {site!r} (known: {', '.join(SITES)})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise FaultError(f"seed {seed!r}: must be a non-negative integer")


class KernelPanic(Exception):
    """Corruption a storage stack with no kernel around it found in its own state: going on
    would write it to disk, so nothing may carry on (kernel/core/fuse.py lets it through)."""

    def __init__(self, site: str, reason: str):
        super().__init__(f"panic at {site}: {reason}")
        self.site, self.reason = site, reason


class NoFaults:
    armed = None

    def at(self, site: str) -> None:
        pass

    def found_corruption(self, site: str, reason: str) -> None:
        raise KernelPanic(site, reason)


class FaultInjector(NoFaults):
    """Arms one fault at a time in a running kernel (see kernel/core/kernel.py)."""

    def __init__(self, kernel, seed: int = 0):
        self.k = kernel
        self.rng = random.Random(seed)
        self.armed: Fault | None = None
        self.history: list[Fault] = []

    def inject(
        self, kind: str, target: str | None = None, site: str | None = None, seed: int | None = None
    ) -> Fault:
        """Arm a fault (and do its corruption). A fault at site "now" is activated by the
        caller with ``at("now")``, after it has answered whoever asked for it."""
        validate(kind, target, site, seed)
        if seed is not None:
            self.rng = random.Random(seed)
        default_site = "vfs.write" if kind == "exception-in-request" else "now"
        f = Fault(kind, target, site or default_site, injected_ns=time.monotonic_ns())
        if kind in ("wild-write", "bit-flip"):
            f.target = target or self.rng.choice(OBJECT_TARGETS)
            if f.target != "in-flight" or f.site == "now":  # else: when it activates
                f.detail = self._corrupt(f)
        elif kind == "fs-corrupt":
            f.detail = self._corrupt_fs()
        self.history.append(f)
        self.k.mailbox.set(
            fault=kind.encode(),
            fault_target=(f.target or "").encode(),
            fault_site=f.site.encode(),
            injected_ns=f.injected_ns,
        )
        self.armed = f
        return f

    def at(self, site: str) -> None:
        f = self.armed
        if f is None or f.site != site:
            return
        self.armed = None
        if f.target == "in-flight" and not f.detail:
            f.detail = self._corrupt(f)  # the entry of the request in hand, as it is now
        f.activated_ns = time.monotonic_ns()
        self.k.mailbox.set(activated_ns=f.activated_ns)
        self._activate(f, site)

    def found_corruption(self, site: str, reason: str) -> None:
        """A panic at ``site``: the kernel found its own state corrupted. Never returns."""
        f = self.armed
        if f is not None and f.kind in CORRUPTING:  # the kernel tripped on it here
            self.armed = None
            f.activated_ns = time.monotonic_ns()
            self.k.mailbox.set(activated_ns=f.activated_ns)
        self.k.panic(reason, site)

    def _activate(self, f: Fault, site: str) -> None:
        if f.kind == "kill":
            self.k.die()
        elif f.kind == "hang":
            self._hang()
        elif f.kind == "exception-in-request":
            self.k.request_exception(site)
        else:
            what = {
                "panic": "BUG: injected panic",
                "fs-corrupt": f"fs: {f.detail}",
            }.get(f.kind, f"Oops: {f.kind} into {f.target} ({f.detail})")
            self.k.panic(what, site)

    def _hang(self) -> None:
        # Take the big kernel lock and the heartbeat's lock, and never let go: every request
        # and the heartbeat block behind them, as on a real lock-up.
        self.k.vfs.lock.acquire()
        self.k.cpu_lock.acquire()
        threading.Event().wait()

    # --- corruption, around the kernel's bookkeeping ---------------------------------------
    def _bytes(self, f: Fault, phys: int, length: int) -> str:
        """Corrupt [phys, phys+length): 64 random bytes (fewer if the span is smaller) or a bit."""
        mem = self.k.mem
        if f.kind == "wild-write":
            n = min(64, length)
            off = phys + self.rng.randrange(length - n + 1)
            mem.write(off, self.rng.randbytes(n))
            return f"{n} bytes at {off:#x}"
        off = phys + self.rng.randrange(length)
        old = mem.read(off, 1)[0]
        mem.write(off, bytes([old ^ (1 << self.rng.randrange(8))]))
        return f"one bit at {off:#x}"

    def _corrupt(self, f: Fault) -> str:
        if f.target == "open-file":
            return self._corrupt_open_file(f)
        if f.target == "in-flight":
            return self._corrupt_inflight(f)
        if f.target == "crash-kernel":
            return self._corrupt_crash_image(f)
        vfs, lay = self.k.vfs, self.k.lay
        with vfs.lock:
            pc = vfs.pc
            if f.target in ("dirty-page", "clean-page", "page-descriptor"):
                want_dirty = f.target != "clean-page"
                frames = [
                    fr
                    for (ino, _), fr in pc.index.items()
                    if ino != BDEV_INO and bool(pc.flags[fr] & PG_DIRTY) == want_dirty
                ]
                if not frames:
                    raise FaultError(
                        f"no {'dirty' if want_dirty else 'clean'} file page to corrupt"
                    )
                fr = self.rng.choice(frames)
                ino, idx = pc.key[fr]
                if f.target == "page-descriptor":
                    where = self._bytes(f, lay.desc_phys(fr) + 8, 48)
                else:
                    where = self._bytes(f, lay.frame_phys(fr), 4096)
                return f"inode {ino} page {idx}: {where}"
            if f.target in ("dirty-inode-list", "inode"):
                inos = (
                    [i for i in vfs.ic.dirty_inodes() if i != BDEV_INO]
                    if f.target == "dirty-inode-list"
                    else [i for i in vfs.ic.slot if i != BDEV_INO]
                )
                if not inos:
                    raise FaultError(f"no in-core inode to corrupt for target {f.target}")
                ino = self.rng.choice(inos)
                # the list links (next_dirty, prev_dirty), or the inode's fields
                start, length = (ICORE_LINKS, 16) if f.target == "dirty-inode-list" else (8, 112)
                return f"inode {ino}: {self._bytes(f, vfs.ic.phys(ino) + start, length)}"
            return f"kernel superblock: {self._bytes(f, lay.ksuper + 8, 112)}"

    def _corrupt_open_file(self, f: Fault) -> str:
        records = self.k.procs.open_file_records() if self.k.procs is not None else []
        if not records:
            raise FaultError("no open-file record to corrupt (no app holds a file open)")
        pid, name, phys = self.rng.choice(records)
        return f"open file of process {pid} ({name}): {self._bytes(f, phys, 16)}"

    def _corrupt_inflight(self, f: Fault) -> str:
        if self.k.inflight is None:
            raise FaultError("no in-flight request table (the kernel does not serve)")
        phys, length = self.k.inflight.slot_span(0)
        return f"in-flight request entry: {self._bytes(f, phys, length)}"

    def _corrupt_crash_image(self, f: Fault) -> str:
        from kernel.core import crashimage

        try:
            phys, length = crashimage.record_span(self.k.mem, self.k.mlay)
        except ValueError as e:
            raise FaultError(str(e)) from None
        return f"crash-kernel image: {self._bytes(f, phys, length)}"

    def _corrupt_fs(self) -> str:
        vfs = self.k.vfs
        with vfs.lock:
            return vfs.fs.inject_bad_pointer(self.rng)
