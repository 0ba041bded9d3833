"""The kernel daemon: one emulated OS kernel running a partition of the machine.

Promises to the host side (kernel/hw/host.py) and to recovery schemes: ``python -m
kernel.core.kernel`` boots a partition — attach physical memory, write the partition header,
mailbox and kernel superblock, take the partition's disk (exclusively), mount the file
system (journal replay), start the flusher, the heartbeat and the control socket, serve
the file system through FUSE — and writes ``ready`` on the fd it was given once the mount
is serving. The measured boot time is recorded in the mailbox.

* SIGTERM or SIGINT is a clean shutdown: everything dirty is written back, the file system
  is unmounted clean, the FUSE mount goes.
* ``panic(reason, site)`` writes a dying message into the mailbox, rings the doorbell of
  every partition listening, and the process dies (SIGKILL to itself): nothing is written
  back, physical memory keeps the dead kernel's state for whoever reads it next.
* The control socket's ``status`` reply carries the page cache's hit and miss counters
  (``cache``), which the harness samples during a trial (harness/kcounters.py), and the
  garbage collector's (``gc``: kernel/core/heap.py), full collections timed from boot on.
* Serving, the FUSE server records its requests in flight in an ``InflightTable``
  (kernel/core/inflight.py) beside the kernel superblock; ``resume(..., answers=)`` serves a
  dead kernel's connection answering what it had applied from its table, and hands out
  open-file ids above those it gave.
* The heartbeat beats every HEARTBEAT_INTERVAL_S under ``cpu_lock``, which only a hung
  kernel holds: a hang really stops it. Its thread is named HEARTBEAT_THREAD in /proc, so
  the CPU it costs is measured apart from the kernel's (harness/cpuuse.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from kernel import param
from kernel.core.faults import FaultInjector
from kernel.core.heap import GcClock, settle_heap
from kernel.core.vfs import VFS
from kernel.hw import control, mailbox
from kernel.hw import machine as machine_mod
from kernel.hw.blockdev import BlockDevice
from kernel.hw.physmem import PhysMem, partition_layout

log = logging.getLogger("kernel")


HEARTBEAT_THREAD = "heartbeat"


class Kernel:
    def __init__(
        self,
        mach: machine_mod.Machine,
        part_id: int,
        physmem_path: str,
        workdir: str,
        *,
        delay: bool = True,
        heartbeat_s: float = param.HEARTBEAT_INTERVAL_S,
        seed: int = 0,
        zone: int | None = None,
    ):
        """``zone``: the partition whose memory areas hold the storage stack (page cache,
        in-core inodes, kernel superblock) — its own, unless it took over another's."""
        self.machine, self.part = mach, mach.partition(part_id)
        self.workdir = workdir
        self.mem = PhysMem(physmem_path, mach.memory)
        self.mlay = partition_layout(part_id, self.part.base, self.part.size)
        z = mach.partition(part_id if zone is None else zone)
        self.lay = partition_layout(z.id, z.base, z.size)
        self.delay, self.heartbeat_s, self.seed = delay, heartbeat_s, seed
        self.dev: BlockDevice | None = None
        self.vmm = None  # the warm-cache VMM beneath this kernel (kernel/hw/vmm.py attach)
        self.vfs: VFS | None = None
        self.mailbox: mailbox.Mailbox | None = None
        self.cpu_lock = threading.Lock()
        self._stop = threading.Event()
        self.ctl: control.ControlServer | None = None
        self.boot_s = 0.0
        self.pset = None
        self.procs = None
        self.apps: list = []
        self.beating = True  # False: no heartbeat thread (the overhead benchmark's vanilla)
        self.gc_clock = GcClock()
        self.settle_s = 0.0  # of boot_s, freezing the boot heap
        self.keep_apps = False  # apps outlive this process; opens go to the process table
        self.inflight = None  # the FUSE server's in-flight request table, once it serves
        self.around = None  # wraps the FUSE request handlers (kernel/core/fuse.py ``around``)

    def join_partition(self, tag: str | None) -> None:
        """Join the partition's process set (kernel/hw/procset.py), so that fencing the
        partition takes this kernel and every app of it; and take the process table."""
        from kernel.core.proc import ProcessSet, ProcTable

        if tag:
            self.pset = ProcessSet(tag, self.part.id)
            self.pset.add(os.getpid())
        self.procs = ProcTable(self.mem, self.mlay, keep_apps=self.keep_apps)

    def start_apps(self, specs: list[dict], netns: str | None = None) -> None:
        """Launch the partition's applications (real processes; they die with this kernel)."""
        from kernel.core.proc import AppSpec
        from kernel.hw.net import enter_netns

        if not specs:
            return
        if self.pset is None:
            raise SystemExit("apps need the partition's process set: start the kernel with --tag")
        for d in specs:
            spec = AppSpec(**d)
            self.apps.append(
                self.procs.launch(
                    spec, self.pset, cpus=self.part.cpus, netns_enter=enter_netns(netns)
                )
            )
            log.info("started %s (pid %d)", spec.name, self.apps[-1].pid)

    def disk_path(self, disk: machine_mod.Disk) -> str:
        return os.path.join(self.workdir, disk.image)

    # --- life -----------------------------------------------------------------------------
    def start_mailbox(self, role: int | None = None) -> None:
        """Partition header, mailbox and heartbeat: the first thing a kernel has."""
        self.mem.write(self.mlay.base, self.mlay.header_bytes())
        if role is None:
            role = mailbox.ROLE_ACTIVE if self.part.role == "active" else mailbox.ROLE_BACKUP
        self.mailbox = mailbox.Mailbox(self.mem, self.mlay, role, self.heartbeat_s)
        if self.beating:
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()

    def open_disk(self) -> BlockDevice:
        disks = [
            self.machine.disk(d)
            for d in self.part.devices
            if d in {x.name for x in self.machine.disks}
        ]
        if not disks:
            raise SystemExit(f"partition {self.part.id} owns no disk: nothing to mount")
        return BlockDevice(
            self.disk_path(disks[0]), disks[0].model, delay=self.delay, timing=disks[0].timing
        )

    def boot(
        self,
        dev: BlockDevice | None = None,
        adopt=None,
        devices: str | None = None,
        *,
        settle: bool = True,
    ) -> VFS:
        """Mount and start serving; ``settle``: freeze what boot made out of later garbage
        collections (a takeover that runs with collections off freezes later, itself)."""
        t0 = time.monotonic_ns()
        if self.mailbox is None:
            self.start_mailbox()
        self.dev = dev or self.open_disk()
        owned = devices if devices is not None else ",".join(self.part.devices)
        t_mount = time.monotonic_ns()
        self.vfs = VFS(self.mem, self.lay, self.dev, adopt)  # mount: superblock, journal replay
        if self.vmm is not None:  # frames holding a warm copy are handed out last: they stay warm
            self.vfs.pc.free.hand_out_last(self.vmm.warm_frames())
        self.mailbox.set(
            mount_start_ns=t_mount,
            mount_ns=time.monotonic_ns() - t_mount,
            devices=owned.encode()[:48],
            zone=self.lay.part_id,
        )
        self.faults = FaultInjector(self, self.seed)
        self.vfs.faults = self.faults
        self.vfs.writeback.start()
        self.ctl = control.ControlServer(
            control.ctl_path(self.workdir, self.part.id), self._control
        )
        if settle:
            # A full collection holds the interpreter lock while it walks every object not
            # frozen, so the heartbeat thread cannot beat meanwhile: 28-109 ms a collection
            # in `crashbench bench detect --false-runs`, 10 missed 10 ms beats being a death.
            # What boot made (the page cache's per-frame tables above all) lives as long as
            # the kernel: frozen, it is never walked again (docs/PERFORMANCE.md).
            t = time.monotonic_ns()
            settle_heap()
            self.settle_s = (time.monotonic_ns() - t) / 1e9
        self.gc_clock.install()
        self.boot_s = (time.monotonic_ns() - t0) / 1e9
        self.mailbox.set(
            state=mailbox.RUNNING, role=mailbox.ROLE_ACTIVE, boot_ns=time.monotonic_ns() - t0
        )
        return self.vfs

    def _heartbeat(self) -> None:
        from kernel.core.proc import name_thread

        name_thread(HEARTBEAT_THREAD)
        nxt = time.monotonic()
        while not self._stop.is_set():
            with self.cpu_lock:
                self.mailbox.beat()
            nxt += self.heartbeat_s
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()  # fell behind (scheduling): beat now, do not burst

    def serve(self, mount: str, ready) -> None:
        """Serve the file system on ``mount`` until SIGTERM/SIGINT, then shut down cleanly."""
        from kernel.core import fuse

        def serving() -> None:
            if self.keep_apps:
                self._publish_connection(*fuse.connection())
            ready()

        self._serve_with(
            fuse.serve,
            self.vfs,
            mount,
            fsname=f"crashbench-p{self.part.id}",
            ready=serving,
            files=self._files(),
            inflight=self._inflight(),
            around=self.around,
        )

    def resume(self, fd: int, params, ready, answers=None) -> None:
        """Serve the connection a dead kernel served (``fd``: a descriptor of it), the
        requests it read and never answered first — answered from its in-flight table
        ``answers`` (kernel/core/inflight.py ``read_inflight``) when it had applied them;
        then as ``serve``."""
        from kernel.core import fuse

        self._serve_with(
            fuse.resume,
            fd,
            params,
            self.vfs,
            ready=ready,
            resend=True,
            files=self._files(),
            inflight=self._inflight(answers),
            answers=answers,
            around=self.around,
        )

    def _inflight(self, answers=None):
        """This kernel's in-flight request table, next to its superblock; its open ids go
        on above those the dead kernel of ``answers`` gave out. Its header rejected, they
        go on from the microsecond clock: above the dead kernel's unless it opened more than
        a file per microsecond on average (their 2^32 wrap after 71 minutes aside)."""
        from kernel.core.inflight import InflightTable

        first = 1
        if answers is not None:
            first = answers.open_id_limit or time.time_ns() // 1000
        self.inflight = InflightTable(self.mem, self.lay, first_open_id=first % (1 << 32) or 1)
        return self.inflight

    def _files(self):
        return self.procs if self.keep_apps else None

    def _serve_with(self, fn, *args, **kw) -> None:
        from kernel.core import fuse

        signal.signal(signal.SIGTERM, lambda *_: fuse.request_stop())
        signal.signal(signal.SIGINT, lambda *_: fuse.request_stop())
        try:
            fn(*args, **kw)
        finally:
            self.shutdown()
            log.info("clean shutdown")

    def _publish_connection(self, fd: int, params) -> None:
        """What a kernel that takes this connection over needs besides a descriptor of it:
        the parameters agreed at INIT, in the work directory (they never change)."""
        path = connection_file(self.workdir)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(params.as_dict(), f)
        os.replace(tmp, path)

    def shutdown(self) -> None:
        if self.mailbox is not None:  # first: a watcher must not take a shutdown for a crash
            self.mailbox.set(state=mailbox.SHUTDOWN)
        self._stop.set()
        if self.ctl is not None:
            self.ctl.close()
        if self.vfs is not None:
            self.vfs.writeback.stop()
            self.vfs.writeback.sync_all()
            self.vfs.free_orphans()
            self.vfs.fs.unmount()
        if self.dev is not None:
            self.dev.close()

    # --- death ----------------------------------------------------------------------------
    def panic(self, reason: str, site: str) -> None:
        """Dying message, doorbells, death. Never returns."""
        if self.vfs is not None:  # stop serving first, as panic() stops the other CPUs
            self.vfs.lock.acquire(timeout=param.PANIC_STOP_WAIT_S)
        self.stop_apps()
        log.error("panic at %s: %s", site, reason)
        self.mailbox.dying_message(reason, site)
        for p in [q.id for q in self.machine.partitions if q.id != self.part.id] + [
            mailbox.WATCHDOG
        ]:
            mailbox.ring(self.workdir, p, f"panic {self.part.id}".encode())
        self.die()

    def stop_apps(self) -> None:
        """SIGSTOP every other process of the partition: with the CPUs halted its apps
        run no more, so none can send a client a reply it had already read from the
        socket (or a read answered from its own buffers) after the kernel died. The
        fence kills them later; SIGKILL needs no SIGCONT."""
        if self.pset is None:
            return
        try:
            pids = self.pset.pids()
        except OSError as e:
            log.error("panic: cannot list the partition's processes to stop them: %s", e)
            return
        me = os.getpid()
        for pid in pids:
            if pid != me:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()  # SIGKILL is not instant; nothing more may run here

    def request_exception(self, site: str) -> None:
        """An error inside a request: on this kernel, an oops is a panic."""
        self.panic(f"Oops: exception in request at {site}", site)

    # --- control ------------------------------------------------------------------------------
    def _control(self, req: dict):
        cmd = req.get("cmd")
        if cmd == "status":
            return {
                "ok": True,
                "pid": os.getpid(),
                "partition": self.part.id,
                "boot_s": self.boot_s,
                "dirty_pages": self.vfs.pc.ndirty,
                "pages": len(self.vfs.pc.index),
                "cache": dict(self.vfs.pc.stats),
                "armed": bool(self.faults.armed),
                "refused_peers": self.ctl.refused,
                "gc": {**self.gc_clock.status(), "settle_s": self.settle_s},
            }
        if cmd == "sync":
            self.vfs.writeback.sync_all()
            return {"ok": True}
        if cmd == "inject":
            f = self.faults.inject(
                req["fault"], req.get("target"), req.get("site"), seed=req.get("seed")
            )
            reply = {
                "ok": True,
                "fault": f.kind,
                "target": f.target,
                "site": f.site,
                "injected_ns": f.injected_ns,
                "detail": f.detail,
            }
            if f.site == "now":
                return reply, lambda: self.faults.at("now")
            return reply
        return {"ok": False, "error": f"unknown command {cmd!r}"}


def connection_file(workdir: str) -> str:
    """Where a kernel that keeps its apps publishes its FUSE connection's parameters."""
    return os.path.join(workdir, "fuse-connection.json")


def kernel_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line every kernel-side program takes from kernel/hw/host.py."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--machine", help="machine description (TOML); default: the shipped one")
    ap.add_argument("--partition", type=int, default=0)
    ap.add_argument("--physmem", required=True, help="physical-memory file")
    ap.add_argument("--workdir", required=True, help="where the disk images are")
    ap.add_argument("--mount", required=True, help="mount point to serve the file system on")
    ap.add_argument("--ready-fd", type=int, help="write 'ready' here once ready")
    ap.add_argument(
        "--no-delay", action="store_true", help="account modeled device time, do not wait"
    )
    ap.add_argument("--tag", help="the machine's tag: names the partitions' process sets")
    ap.add_argument(
        "--apps", help="JSON file: the partition's applications (kernel.core.proc.AppSpec fields)"
    )
    ap.add_argument("--netns", help="network namespace of the partition's applications")
    ap.add_argument(
        "--keep-apps",
        action="store_true",
        help="apps outlive the kernel process, and it records their open files, "
        "for a scheme that keeps processes across a crash",
    )
    return ap


def notify_ready(fd: int | None) -> None:
    """Tell whoever launched this process (kernel/hw/host.py) that it is ready."""
    if fd is not None:
        os.write(fd, b"ready\n")
        os.close(fd)


def wait_for_vmm(fd: int) -> bool:
    """Block until the VMM has checked the dead kernel's frames (systems/warmcache): the
    boot so far (the interpreter, the imports) ran beside that check; the memory it checks
    is touched only after it. True if it passed."""
    with os.fdopen(fd, "rb", buffering=0) as f:
        return f.read(1) == b"1"


def main(argv: list[str] | None = None) -> int:
    ap = kernel_arguments("python -m kernel.core.kernel", __doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault injector's choices")
    ap.add_argument("--vmm", help="VMM region: boot beneath the warm-cache VMM (kernel/hw/vmm.py)")
    ap.add_argument(
        "--vmm-gate",
        type=int,
        help="descriptor to wait on before touching the partition's memory: the VMM's cache "
        "check runs beside this boot and writes b'1' when it is done (anything else: exit)",
    )
    ap.add_argument(
        "--no-heartbeat",
        action="store_true",
        help="no heartbeat: a kernel no scheme watches (crashbench overhead's vanilla)",
    )
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kernel[%(process)d] %(message)s")
    from kernel.core import fuse  # noqa: F401  (loaded with the kernel: part of boot, not of service)

    mach = machine_mod.load(a.machine, shape_checked=True)  # checked by whoever started it
    if a.vmm_gate is not None and not wait_for_vmm(a.vmm_gate):
        log.error("the VMM's cache check failed: not booting")
        return 1
    k = Kernel(mach, a.partition, a.physmem, a.workdir, delay=not a.no_delay, seed=a.seed)
    k.beating = not a.no_heartbeat
    k.keep_apps = a.keep_apps
    if k.part.cpus:
        os.sched_setaffinity(0, k.part.cpus)
    k.join_partition(a.tag)
    dev = None
    if a.vmm:  # without it, no watcher and the plain device: the VMM costs nothing
        from kernel.hw import vmm

        dev = vmm.attach(k, a.vmm)
    k.boot(dev)
    log.info("booted partition %d (%s) in %.3f s", k.part.id, k.part.cmdline(), k.boot_s)

    return serve_and_start_apps(k, a)


def serve_and_start_apps(k: Kernel, a) -> int:
    """Serve the mount of ``a`` (the parsed ``kernel_arguments``); once it answers, start
    the deployment's applications and tell the host this kernel is ready."""
    apps = json.loads(open(a.apps).read()) if a.apps else []

    def ready() -> None:
        k.start_apps(apps, a.netns)
        notify_ready(a.ready_fd)

    k.serve(a.mount, ready=ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
