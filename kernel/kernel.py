"""The kernel daemon: one emulated OS kernel running a partition of the machine.

Promises to the host side (kernel/host.py) and to recovery schemes: ``python -m
kernel.kernel`` boots a partition — attach physical memory, write the partition header and
kernel superblock, take the partition's disk (exclusively), mount the file system (journal
replay), start the flusher, serve the file system through FUSE — and writes ``ready`` on
the fd it was given once the mount is serving. SIGTERM or SIGINT is a clean shutdown:
everything dirty is written back, the file system is unmounted clean, the FUSE mount goes.
SIGKILL is a crash: nothing is written back, the physical memory keeps the dead kernel's
state for whoever reads it next.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from kernel import machine as machine_mod
from kernel.blockdev import BlockDevice
from kernel.physmem import PhysMem, partition_layout
from kernel.vfs import VFS

log = logging.getLogger("kernel")


class Kernel:
    def __init__(self, mach: machine_mod.Machine, part_id: int, physmem_path: str, workdir: str,
                 *, delay: bool = True):
        self.machine, self.part = mach, mach.partition(part_id)
        self.workdir = workdir
        self.mem = PhysMem(physmem_path, mach.memory)
        self.lay = partition_layout(part_id, self.part.base, self.part.size)
        self.delay = delay
        self.dev: BlockDevice | None = None
        self.vfs: VFS | None = None
        self.boot_s = 0.0

    def disk_path(self, disk: machine_mod.Disk) -> str:
        return os.path.join(self.workdir, disk.image)

    def boot(self) -> VFS:
        t0 = time.monotonic()
        self.mem.write(self.lay.base, self.lay.header_bytes())
        disks = [self.machine.disk(d) for d in self.part.devices
                 if d in {x.name for x in self.machine.disks}]
        if not disks:
            raise SystemExit(f"partition {self.part.id} owns no disk: nothing to mount")
        disk = disks[0]
        self.dev = BlockDevice(self.disk_path(disk), disk.model, delay=self.delay)
        self.vfs = VFS(self.mem, self.lay, self.dev)
        self.vfs.writeback.start()
        self.boot_s = time.monotonic() - t0
        return self.vfs

    def shutdown(self) -> None:
        if self.vfs is not None:
            self.vfs.writeback.stop()
            self.vfs.writeback.sync_all()
            self.vfs.free_orphans()
            self.vfs.fs.unmount()
        if self.dev is not None:
            self.dev.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernel.kernel", description=__doc__.splitlines()[0])
    ap.add_argument("--machine", help="machine description (TOML); default: the shipped one")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--physmem", required=True, help="physical-memory file")
    ap.add_argument("--workdir", required=True, help="where the disk images are")
    ap.add_argument("--mount", required=True, help="mount point to serve the file system on")
    ap.add_argument("--ready-fd", type=int, help="write 'ready' here once serving")
    ap.add_argument("--no-delay", action="store_true", help="account modeled device time, do not wait")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kernel[%(process)d] %(message)s")
    from kernel import fuse
    mach = machine_mod.load(a.machine)
    k = Kernel(mach, a.partition, a.physmem, a.workdir, delay=not a.no_delay)
    if k.part.cpus:
        os.sched_setaffinity(0, k.part.cpus)
    vfs = k.boot()
    log.info("booted partition %d (%s) in %.3f s", k.part.id, k.part.cmdline(), k.boot_s)

    def ready() -> None:
        if a.ready_fd is not None:
            os.write(a.ready_fd, b"ready\n")
            os.close(a.ready_fd)

    signal.signal(signal.SIGTERM, lambda *_: fuse.request_stop())
    signal.signal(signal.SIGINT, lambda *_: fuse.request_stop())
    try:
        fuse.serve(vfs, a.mount, fsname=f"crashbench-p{k.part.id}", ready=ready)
    finally:
        k.shutdown()
        log.info("clean shutdown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
