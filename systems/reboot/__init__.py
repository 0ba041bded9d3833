"""Scheme `reboot`: the crashed partition reboots — what a plain machine does.

Promises: after a failure is detected (watchdog doorbell or heartbeat), the dead kernel is
fenced (its whole process group and every other process of the partition's process set —
its apps and their children — killed, and its FUSE connection aborted: nothing of it runs
when its disk is taken again), the machine's modeled reboot time passes where real
hardware spends it — firmware/POST (phase ``firmware``), then a real kernel's boot up to
its mount (phase ``kernel boot``), both labelled modeled, from the machine description's
``[reboot]`` profile (kernel/hw/machine.py; none: no modeled time) — a fresh kernel boots in
the same partition with a cold page cache, mounts the disk and replays the journal;
service is back when the mount answers. Only what reached the disk survives: the dirty
pages the dead kernel held are counted as lost. ``firmware_s`` given to the constructor
replaces the profile's firmware time. A variant whose reboot does not pass through the
machine's firmware (``through_firmware`` False: a guest rebooted by its VMM) spends only
the kernel boot.
"""

from __future__ import annotations

import os
import time
from typing import ClassVar

from kernel.hw import fusedev
from kernel.hw.physmem import PhysMem
from kernel.hw.procset import fence_partition
from systems.base import RecoveryReport, RecoveryScheme
from systems.detect import Watcher
from systems.survey import survey


class Reboot(RecoveryScheme):
    name = "reboot"
    watcher = None
    through_firmware: ClassVar[bool] = True  # a machine reboot: firmware/POST runs first

    def __init__(self, firmware_s: float | None = None):
        if firmware_s is not None and firmware_s < 0:
            raise ValueError(f"firmware_s: must not be negative, got {firmware_s}")
        self.firmware_s = firmware_s
        self.kernel_boot_s = 0.0

    def deploy(self, host, apps=()) -> None:
        self.host, self.apps = host, list(apps)
        profile = host.machine.reboot
        if self.firmware_s is None:
            self.firmware_s = profile.firmware_s if profile and self.through_firmware else 0.0
        self.kernel_boot_s = profile.kernel_boot_s if profile else 0.0
        self._boot()
        self.watcher = Watcher(host, 0)

    def _boot(self):
        """A kernel in partition 0, with the partition's apps (a variant adds its layers)."""
        return self.host.boot(0, apps=self.apps)

    def _before_boot(self, r: RecoveryReport) -> None:
        """After the fence, before the new kernel boots: a variant's own phase."""

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        f = self.watcher.wait(timeout)
        return self._reboot(RecoveryReport.after(self.name, f, fault))

    def _reboot(self, r: RecoveryReport) -> RecoveryReport:
        """Fence, the modeled firmware and kernel boot, a fresh kernel: into ``r``."""
        host = self.host
        t = time.monotonic()
        self._fence()
        r.phase("fence", t)
        r.cache, _ = survey(
            host.physmem, host.machine, 0
        )  # before the new kernel reuses the memory
        self._modeled(r, "firmware", self.firmware_s)
        before = _count_processes(host)
        self._before_boot(r)
        self._modeled(r, "kernel boot", self.kernel_boot_s)
        t = time.monotonic()
        kp = self._boot()  # a rebooted kernel starts its apps afresh
        mail = host.mail(0)
        mount_start = mail.mount_start_ns / 1e9
        mount_end = mount_start + mail.mount_ns / 1e9
        r.phase("boot", t, mount_start)
        r.phase("mount + replay", mount_start, mount_end)
        os.listdir(kp.mount)  # the mount answers: service is back
        r.service_at = time.monotonic()
        r.phase("first service", mount_end, r.service_at)
        r.processes_before, r.processes_recovered = before, min(before, len(self.apps))
        if self.apps:
            r.notes.append(
                f"{len(self.apps)} applications restarted from scratch; "
                "no process state survives a reboot"
            )
        r.recovered = True
        r.notes.append(f"{r.cache.dirty_pages_lost} dirty pages of the crashed kernel were lost")
        return r

    @staticmethod
    def _modeled(r: RecoveryReport, name: str, seconds: float) -> None:
        """Modeled hardware time, waited for here, where the hardware would spend it."""
        if seconds:
            t = time.monotonic()
            _wait_until(t + seconds)
            r.phase(name, t, modeled=True)

    def _fence(self) -> None:
        """Make sure the dead kernel is gone before its disk is taken again."""
        host = self.host
        kp = host.kernels.get(0)
        if kp is not None:
            host.crash(0)  # SIGKILL to its whole process group, then wait for it
            fence_partition(host.tag, 0)  # its apps, before the new kernel starts its own
            if fusedev.is_mounted(kp.mount):
                fusedev.abort_and_unmount(kp.mount)

    def teardown(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        super().teardown()


def _count_processes(host) -> int:
    """Processes in the dead kernel's table (before the new kernel clears it)."""
    from kernel.core.proc import read_proc_table
    from kernel.hw.physmem import partition_layout

    p = host.machine.partition(0)
    mem = PhysMem(host.physmem, readonly=True)
    try:
        entries, bad = read_proc_table(mem, partition_layout(0, p.base, p.size))
    finally:
        mem.close()
    return len(entries) + len(bad)


def _wait_until(deadline: float) -> None:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)
