"""The host side of the emulated machine: memory file, disk images, kernel processes.

Promises to the harness, the lab commands and the tests: ``Host`` creates the machine's
physical-memory file in /dev/shm and its disk images (formatted on first use), launches
kernel daemons as real processes (own session, so a crash can take their whole process
group), waits until they serve (at launch, or later: ``boot(wait=False)`` then
``await_ready``), crashes them (SIGKILL) or stops them cleanly, holds a copy of their FUSE
connection for a scheme that keeps processes (``hold_connection``; released with
``release_connection``), and ``close()`` removes every mount, process and memory file it made — also after a failure.

What holds the machine's data is its owner's only (param.OWNER_ONLY_MODE, set explicitly
whatever the umask): the memory file, the disk images (also those formatted before), the
VMM's region, the control and doorbell sockets. The work directory it makes stays
traversable (param.WORKDIR_MODE, ``make_workdir``), because the partitions' servers run as
other users on the mount beneath it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kernel import param
from kernel.hw import machine as machine_mod
from kernel.hw import priority
from kernel.hw.physmem import PhysMem

READY_TIMEOUT_S = 30.0


class BootError(RuntimeError):
    """A kernel process did not come up; the message carries the end of its log."""


@dataclass
class KernelProc:
    part_id: int
    proc: subprocess.Popen
    mount: str
    log_path: str
    boot_wall_s: float = 0.0
    started: float = 0.0  # CLOCK_MONOTONIC at launch
    ready_fd: int | None = None  # the read end of its ready pipe, until it is awaited

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def make_workdir(path: str | Path) -> Path:
    """The work directory and its logs; those made here get WORKDIR_MODE, not the umask's."""
    path = Path(path)
    for d in (path, path / "logs"):
        if not d.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, param.WORKDIR_MODE)
    return path.resolve()


def physmem_path_for(workdir: str | Path) -> str:
    tag = hashlib.sha1(str(Path(workdir).resolve()).encode()).hexdigest()[:12]
    return f"/dev/shm/crashbench-{tag}"


@dataclass
class Host:
    workdir: Path
    machine: machine_mod.Machine
    delay: bool = True
    machine_file: str | None = None  # None: the shipped default machine
    kernels: dict[int, KernelProc] = field(default_factory=dict)
    net: object | None = None  # the machine's kernel.hw.net.Network, when it has one up
    fuse_fd: int | None = None  # this process's copy of the kernels' FUSE connection

    def __post_init__(self):
        self.workdir = make_workdir(self.workdir)
        self.physmem = physmem_path_for(self.workdir)

    # --- resources -----------------------------------------------------------------------
    def create_memory(self) -> None:
        PhysMem.unlink(self.physmem)
        PhysMem(self.physmem, self.machine.memory, create=True).close()

    def disk_image(self, name: str = "disk0") -> Path:
        return self.workdir / self.machine.disk(name).image

    def mountpoint(self, part_id: int) -> Path:
        from kernel.hw import fusedev

        p = self.workdir / f"mnt-p{part_id}"
        if fusedev.is_mounted(str(p)):
            fusedev.abort_and_unmount(str(p))  # a dead kernel's connection: never touch it
        p.mkdir(exist_ok=True)
        return p

    # --- kernels -------------------------------------------------------------------------
    @property
    def tag(self) -> str:
        """Short name of this machine for its process sets (and a lab's network)."""
        return hashlib.sha1(str(self.workdir).encode()).hexdigest()[:6]

    def boot(
        self,
        part_id: int = 0,
        mount: str | Path | None = None,
        *,
        module: str = "kernel.core.kernel",
        extra: tuple[str, ...] = (),
        name: str | None = None,
        apps: list[dict] | None = None,
        netns: str | None = None,
        idle: bool = False,
        pass_fds: tuple[int, ...] = (),
        wait: bool = True,
    ) -> KernelProc:
        """Launch a kernel process (or another kernel-side program, e.g. a standby backup
        kernel) for a partition, and return once it says it is ready. ``pass_fds``: more
        descriptors the program inherits (the VMM's gate). ``idle``: start it
        behind everything else (kernel/hw/priority.py ``start_idle``), so its start-up yields
        to the service and the load; the program must raise its threads and its group back
        itself (systems/orthros/backup.py does, once in standby). ``wait``
        False: return once launched; ``await_ready`` then waits for it."""
        from kernel.hw import fusedev

        mnt = str(mount or self.mountpoint(part_id))
        if module == "kernel.core.kernel" and fusedev.is_mounted(mnt):
            fusedev.abort_and_unmount(mnt)  # a dead kernel's connection: never mount over it
        log_path = str(self.workdir / "logs" / f"{name or 'kernel'}-p{part_id}.log")
        r, w = os.pipe()
        cmd = [
            sys.executable,
            "-m",
            module,
            "--partition",
            str(part_id),
            "--physmem",
            self.physmem,
            "--workdir",
            str(self.workdir),
            "--mount",
            mnt,
            "--ready-fd",
            str(w),
            "--tag",
            self.tag,
            *extra,
        ]
        if apps:
            spec = self.workdir / f"apps-{name or 'kernel'}-p{part_id}.json"
            spec.write_text(json.dumps(apps))
            cmd += ["--apps", str(spec)]
        if netns is None and self.net is not None:
            netns = self.net.netns(part_id)  # the partition's apps live beside its NIC
        if netns:
            cmd += ["--netns", netns]
        if self.machine_file:
            cmd += ["--machine", str(self.machine_file)]
        if not self.delay:
            cmd.append("--no-delay")
        t0 = time.monotonic()
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdout=logf,
                stderr=subprocess.STDOUT,
                pass_fds=(w, *pass_fds),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                preexec_fn=priority.start_idle if idle else None,
            )
        os.close(w)
        kp = KernelProc(part_id, proc, mnt, log_path, started=t0, ready_fd=r)
        self.kernels[part_id] = kp
        if wait:
            self.await_ready(kp)
        return kp

    def await_ready(self, kp: KernelProc) -> None:
        """Return once a launched kernel says it is ready (at once if it already was);
        BootError, with the end of its log, if it died or took longer than READY_TIMEOUT_S."""
        if kp.ready_fd is None:
            return
        try:
            self._wait_ready(kp.ready_fd, kp)
        finally:
            os.close(kp.ready_fd)
            kp.ready_fd = None
        kp.boot_wall_s = time.monotonic() - kp.started

    def _wait_ready(self, fd: int, kp: KernelProc) -> None:
        import select

        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            rl, _, _ = select.select([fd], [], [], 0.1)
            if rl:
                if os.read(fd, 64).startswith(b"ready"):
                    return
                break  # EOF: the kernel died before it served
        kp.proc.kill()
        kp.proc.wait()
        tail = Path(kp.log_path).read_text(errors="replace")[-2000:]
        raise BootError(f"kernel of partition {kp.part_id} did not come up; its log ends:\n{tail}")

    def hold_connection(self, part_id: int) -> tuple[int, int]:
        """Keep a copy of the FUSE connection the partition's kernel serves, as hardware
        outlives a kernel: while it is open the connection survives the kernel's death and
        the programs' requests wait. Returns (this process's pid, the descriptor), which a
        kernel that takes over copies in turn (kernel/hw/fusedev.py ``duplicate``)."""
        from kernel.hw import fusedev

        if self.fuse_fd is None:
            kp = self.kernels[part_id]
            fd = fusedev.fuse_fd_of(kp.pid)
            if fd is None:
                raise BootError(f"kernel of partition {part_id} holds no FUSE connection")
            self.fuse_fd = fusedev.duplicate(kp.pid, fd)
        return os.getpid(), self.fuse_fd

    def release_connection(self) -> None:
        """Close the copy ``hold_connection`` keeps (a rebooted kernel's connection is a new
        one, to be held in turn); nothing when none is held."""
        if self.fuse_fd is not None:
            os.close(self.fuse_fd)
            self.fuse_fd = None

    def control(self, part_id: int, req: dict, timeout: float = 10.0) -> dict:
        """One request to a running kernel's control socket (kernel/hw/control.py)."""
        from kernel.hw.control import ctl_path, request

        return request(ctl_path(str(self.workdir), part_id), req, timeout)

    def mail(self, part_id: int):
        """The partition's heartbeat mailbox, read from physical memory."""
        from kernel.hw.mailbox import read_mail
        from kernel.hw.physmem import partition_layout

        p = self.machine.partition(part_id)
        mem = PhysMem(self.physmem, readonly=True)
        try:
            return read_mail(mem, partition_layout(part_id, p.base, p.size))
        finally:
            mem.close()

    def crash(self, part_id: int = 0) -> None:
        """SIGKILL the kernel and its whole process group, as a real crash takes everything."""
        kp = self.kernels[part_id]
        try:
            os.killpg(kp.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        kp.proc.wait()

    def stop(self, part_id: int = 0, timeout: float = 60.0) -> int:
        """Clean shutdown; returns the kernel's exit status."""
        from kernel.hw import fusedev

        kp = self.kernels.pop(part_id)
        if kp.ready_fd is not None:  # launched, never awaited
            os.close(kp.ready_fd)
            kp.ready_fd = None
        if kp.alive():
            kp.proc.send_signal(signal.SIGTERM)
            try:
                kp.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(kp.proc.pid, signal.SIGKILL)
                kp.proc.wait()
        if fusedev.is_mounted(kp.mount):
            fusedev.abort_and_unmount(kp.mount)
        return kp.proc.returncode

    def close(self) -> None:
        """Tear everything down: kernels, their process groups, mounts, the memory file."""
        from kernel.hw import fusedev

        kps = [self.kernels.pop(p) for p in list(self.kernels)]
        # every kernel before waiting for any: an active kernel's exit can take longer than
        # a heartbeat verdict, and a standby still alive then takes over during the teardown
        for kp in kps:
            try:
                os.killpg(kp.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for kp in kps:
            kp.proc.wait()
            if kp.ready_fd is not None:  # launched, never awaited
                os.close(kp.ready_fd)
                kp.ready_fd = None
        self.release_connection()
        for m in self.workdir.glob("mnt-p*"):
            if fusedev.is_mounted(str(m)):
                fusedev.abort_and_unmount(str(m))
        from kernel.hw.procset import cleanup_stale

        cleanup_stale(self.tag)  # every app of every partition, and the sets themselves
        PhysMem.unlink(self.physmem)
