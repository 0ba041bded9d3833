"""Times a kernel's page reads beneath the warm-cache VMM (kernel/hw/vmm.py), warm and cold.

Promises to whoever measures the read path (docs/PERFORMANCE.md): one emulated kernel in
this process (no mount, no FUSE) with ``--files`` files of ``--pages`` pages written back
to a disk image; each round reads every file whole through the kernel's page cache
(``VFS.read``: a miss reads its readahead window in one request) in three ways, alternating
their order round by round, and times the reading thread's CPU per page read:

* "warm": beneath the VMM, after a crash whose frames the VMM preserved: every page comes
  from a preserved frame (``VmmDisk.read``), none from the device. The files were cached
  in the other order, so the new kernel's frames mostly hold preserved copies of blocks
  not read yet, which the VMM moves aside into its spare pages first (as after a real
  crash, where the new kernel allocates its frames from the same low end); "warm, in
  cached order" reads them in the order they were cached, so that nothing is moved aside;
* "cold, VMM": beneath the VMM with nothing preserved: every page from the device;
* "cold, plain": the plain device, no VMM.

The device model is ``--model`` (default "none": no modeled delay, so the figures are the
CPU of the read path alone; a modeled wait spins its last ``SPIN_S``, which counts as CPU).
Every read is compared with what was written and the warm variant must reuse every page,
or the script fails. With ``--before DIR`` (a checkout of an older commit) that tree's
kernel/hw/vmm.py serves a fourth variant, "warm, before", in the same process. Its files
live in /dev/shm and are removed on exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_warm_check import older_vmm  # noqa: E402  (this script's folder is on the path)

from kernel.core.vfs import VFS  # noqa: E402
from kernel.hw import vmm  # noqa: E402
from kernel.hw.blockdev import BlockDevice  # noqa: E402
from kernel.hw.physmem import PhysMem, partition_layout  # noqa: E402
from kernel.tools.mkfs import mkfs  # noqa: E402

PAGE = vmm.PAGE


class Machine:
    """A disk with the files on it, a guest's memory, and the VMM's region beside it."""

    def __init__(self, where: str, files: int, pages: int, model: str):
        self.img, self.model = f"{where}/disk.img", model
        need = files * pages * PAGE
        mkfs(self.img, max(64 << 20, 2 * need + (32 << 20)), inodes=max(1024, 2 * files))
        mem = max(64 << 20, 2 * need + (32 << 20))
        self.mem = PhysMem(f"{where}/physmem", mem, create=True)
        self.lay = partition_layout(0, 0, mem)
        self.mem.write(0, self.lay.header_bytes())
        dev = BlockDevice(self.img, "none", delay=False)
        self.rpath = f"{where}/vmm"
        vmm.Region.create(self.rpath, self.lay, dev.nblocks).close()
        fs = VFS(self.mem, self.lay, dev)
        self.data = [os.urandom(pages * PAGE) for _ in range(files)]
        self.inos = []
        for k, d in enumerate(self.data):
            ino = fs.create(1, b"f%d" % k, 0o100644, 0, 0).ino
            fs.write(ino, 0, d)
            fs.fsync(ino)
            self.inos.append(ino)
        dev.close()
        self.dev = None

    def boot(self, mod=None) -> tuple[VFS, object]:
        """A kernel on this machine, beneath the VMM of module ``mod`` (None: plain)."""
        self.mem.watchers[:] = []
        self.mem.watch_span, self.mem.watch_pages = (0, self.mem.size), None
        self.dev = BlockDevice(self.img, self.model, delay=True)
        if mod is None:
            return VFS(self.mem, self.lay, self.dev), None
        v = mod.Vmm(self.mem, self.lay, mod.Region(self.rpath))
        v.install()
        return VFS(self.mem, self.lay, mod.VmmDisk(self.dev, v)), v

    def crash(self, v, mod, keep: bool) -> None:
        """The kernel dies; with ``keep`` the VMM preserves its frames, else forgets them."""
        self.mem.watchers[:] = []
        self.dev.close()
        if keep:
            mod.preserve(v.r, self.mem, self.lay)
        else:
            v.r.ft[:] = 0
            v.r.st[:] = 0
        v.r.close()

    def read_all(self, fs: VFS, order: int = -1) -> float:
        """Read every file whole, last first unless ``order`` is 1; the thread's CPU
        seconds, after checking the contents."""
        got = []
        files = list(zip(self.inos, self.data))[::order]
        c = time.thread_time()
        for ino, d in files:
            got.append(fs.read(ino, 0, len(d)))
        cpu = time.thread_time() - c
        if got != [d for _, d in files]:
            raise SystemExit("a read returned other bytes than were written")
        return cpu

    def close(self) -> None:
        self.mem.watchers[:] = []
        if self.dev is not None and self.dev.fd >= 0:
            self.dev.close()
        self.mem.close()


def warm(m: Machine, mod, order: int = -1) -> float:
    """Read everything once cold beneath the VMM, crash, preserve; time the warm read
    (in the other order, unless ``order`` is 1)."""
    _, v = m.boot(mod)
    m.crash(v, mod, keep=False)
    fs, v = m.boot(mod)
    m.read_all(fs, 1)  # first first: the new kernel's frames then hold other blocks' copies
    m.crash(v, mod, keep=True)
    fs, v = m.boot(mod)
    r0 = v.r.stats()
    cpu = m.read_all(fs, order)
    r1 = v.r.stats()
    reused, dev = r1["reused"] - r0["reused"], r1["device_blocks"] - r0["device_blocks"]
    m.crash(v, mod, keep=False)
    want = sum(len(d) for d in m.data) // PAGE
    if reused < want:  # (metadata blocks are reused too)
        raise SystemExit(f"warm: {reused} pages reused, {want} read ({dev} from the device)")
    return cpu


def cold_vmm(m: Machine, mod) -> float:
    _, v = m.boot(mod)
    m.crash(v, mod, keep=False)
    fs, v = m.boot(mod)
    cpu = m.read_all(fs)
    m.crash(v, mod, keep=False)
    return cpu


def cold_plain(m: Machine, _mod) -> float:
    fs, _ = m.boot(None)
    cpu = m.read_all(fs)
    m.dev.close()
    return cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100, help="files read each round")
    ap.add_argument("--pages", type=int, default=40, help="pages a file")
    ap.add_argument("--rounds", type=int, default=9, help="rounds per variant")
    ap.add_argument("--model", default="none", help="device model (kernel/param.py)")
    ap.add_argument("--before", help="a checkout of an older commit: its VMM read warm too")
    a = ap.parse_args()
    if a.files < 1 or a.pages < 1 or a.rounds < 1:
        raise SystemExit("--files, --pages and --rounds must be positive")
    variants = {
        "warm": lambda m: warm(m, vmm),
        "warm, in cached order": lambda m: warm(m, vmm, 1),
        "cold, VMM": lambda m: cold_vmm(m, vmm),
        "cold, plain": lambda m: cold_plain(m, None),
    }
    if a.before:
        old = older_vmm(a.before)
        variants["warm, before"] = lambda m: warm(m, old)
    where = tempfile.mkdtemp(prefix="bench-warm-read-", dir="/dev/shm")
    try:
        m = Machine(where, a.files, a.pages, a.model)
        try:
            times = run(m, variants, a.rounds)
        finally:
            m.close()
    finally:
        shutil.rmtree(where)
    report(times, a)
    return 0


def run(m: Machine, variants: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(rounds):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:  # alternate the order
            times[name].append(variants[name](m))
    return times


def report(times: dict, a) -> None:
    n = a.files * a.pages
    print(
        f"{a.files} files x {a.pages} pages = {n} pages a round, device model {a.model!r}, "
        f"{a.rounds} rounds a variant, load {os.getloadavg()[0]:.1f}"
    )
    med = {}
    for name, t in times.items():
        us = [x / n * 1e6 for x in t]
        med[name] = statistics.median(us)
        print(f"{name:22s} CPU a page: median {med[name]:6.2f} us (min {min(us):6.2f})")
    print(f"warm / cold, VMM: {med['warm'] / med['cold, VMM']:.2f}x")
    print(f"warm / cold, plain: {med['warm'] / med['cold, plain']:.2f}x")
    if "warm, before" in med:
        print(f"warm, before / warm: {med['warm, before'] / med['warm']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
