"""Scheme `orthros`: two OSes on one machine; a standby backup OS takes over on a crash.

Promises (Kato et al., "Faster Recovery from OS Failure and File Cache Missing"): at deploy
the active kernel boots on partition 0 and a backup kernel waits on partition 1 (its own
CPU and memory, systems/orthros/backup.py). When the active kernel dies or hangs, the
backup fences it, takes its disk and NIC, adopts its file cache — clean and dirty pages,
validated, in place — and serves the same mount; the report it writes is this scheme's
RecoveryReport. Then a new backup boots in the freed partition (re-pairing), so a second
crash is survived too; ``on_crash`` returns once it stands by, or, with
``defer_protection``, once it is launched (``await_protection`` waits for it: the recovered
service runs meanwhile, the backup's start-up at idle priority).

By default it also keeps the dead kernel's processes, unmodified and with the same pid: the
host holds a copy of the FUSE connection (kernel/hw/host.py ``hold_connection``), so the
kernel's death does not end it and the applications' requests wait; the backup resumes the
same connection and continues the processes (systems/keep.py). The report says what became
of each one (``processes``). When the backup refuses the dead kernel's running transaction
(its superblock or a metadata page of it failed its check), nothing is kept: the processes
are killed, the connection aborted and the apps started again on a new mount, because what
they were told since the last commit is undone (systems/orthros/backup.py ``not_kept``). Keeping needs cgroup process sets (freeze, move): on a host
without them the default falls back to restarting the apps (``keep`` says which, once
deployed), and ``keep_processes=True`` is refused there. ``keep_processes=False`` restarts
the apps on the backup as a reboot would (the comparison without keeping).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from kernel import param
from systems.base import Capabilities, RecoveryReport, RecoveryScheme, Reservation


class Orthros(RecoveryScheme):
    name = "orthros"
    capabilities = Capabilities(
        keeps_cache=True,
        keeps_dirty_cache=True,
        keeps_processes=True,
        keeps_unmodified_processes=True,  # by default, where the host has cgroup process sets
        migrates_cache=True,
        partitions_needed=2,
    )
    kernel_modules = ("kernel.core.kernel", "systems.orthros.backup")
    options = ("keep_processes",)

    def __init__(
        self,
        net_tag: str | None = None,
        missed_beats: int = param.HEARTBEAT_MISSED_BEATS,
        *,
        keep_processes: bool | None = None,
    ):
        self.net_tag, self.missed = net_tag, missed_beats
        self.crashes = 0
        self.asked = keep_processes  # None: keep where the host can
        self._keeping(keep_processes is not False)

    def _keeping(self, keep: bool) -> None:
        self.keep = keep
        self.capabilities = replace(Orthros.capabilities, keeps_unmodified_processes=keep)

    def _decide_keeping(self, host) -> None:
        """Keep where the host's process sets can freeze and move processes (cgroups)."""
        from kernel.hw.procset import ProcError, ProcessSet

        if self.asked is False:
            return
        try:
            can = ProcessSet(host.tag, 0).mode != "pids"
        except ProcError:
            can = False
        if self.asked and not can:
            raise RuntimeError("keeping processes needs cgroup process sets (run as root)")
        self._keeping(can)

    def _keep_args(self) -> tuple[str, ...]:
        if not self.keep:
            return ()
        # the active kernel's connection: the one its takeover resumed, or the new mount's
        # when it could not keep the processes (systems/orthros/backup.py ``not_kept``)
        self.host.release_connection()
        pid, fd = self.host.hold_connection(self.active)
        return ("--keep-apps", "--hold-pid", str(pid), "--hold-fd", str(fd))

    def deploy(self, host, apps=()) -> None:
        self.host, self.apps = host, list(apps)
        self._decide_keeping(host)
        net = host.net
        if self.net_tag is None and net is not None and net.mode == "netns":
            self.net_tag = net.tag  # the backup takes the NIC over at takeover
        kp = host.boot(0, apps=self.apps, extra=("--keep-apps",) if self.keep else ())
        self.mount = kp.mount
        self.active = 0
        self._boot_backup(1, watch=0)

    def _report_path(self) -> Path:
        return self.host.workdir / f"orthros-takeover-{self.crashes + 1}.json"

    def _boot_backup(self, part: int, watch: int, wait: bool = True) -> None:
        path = self._report_path()
        path.unlink(missing_ok=True)
        extra = ["--watch", str(watch), "--report", str(path), "--missed", str(self.missed)]
        extra += self._keep_args()
        if self.net_tag:
            extra += ["--net-tag", self.net_tag]
        self.host.boot(
            part,
            mount=self.mount,
            module="systems.orthros.backup",
            extra=tuple(extra),
            name="backup",
            apps=self.apps,
            idle=True,
            wait=wait,
        )
        self.backup = part

    def await_protection(self) -> None:
        """The re-paired backup's readiness (kernel/hw/host.py ``await_ready``, bounded by
        the boot timeout)."""
        kp = self.host.kernels.get(self.backup)
        if kp is None:
            raise RuntimeError(f"no backup kernel in partition {self.backup}: not protected")
        self.host.await_ready(kp)

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        path = self._report_path()
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no takeover by the backup within {timeout} s")
            if not self.host.kernels[self.backup].alive():
                raise RuntimeError("the backup kernel died; see its log in the lab's logs/")
            time.sleep(0.001)
        d = json.loads(path.read_text())
        report = RecoveryReport.from_dict(d)
        if fault and fault.get("fault"):
            report.fault = fault["fault"]
        old = self.active
        dead = self.host.kernels.pop(old)
        dead.proc.wait()  # fenced by the backup; reap it
        self.active, self.crashes = d["partition"], self.crashes + 1
        # re-pairing in the freed partition
        self._boot_backup(old, watch=self.active, wait=not self.defer_protection)
        return report

    @classmethod
    def reservation(cls, machine) -> Reservation:
        ps = [p for p in machine.partitions if p.role == "backup"]
        return Reservation(
            cores=sum(len(p.cpus) for p in ps),
            cpus=tuple(sorted(c for p in ps for c in p.cpus)),
            memory_bytes=sum(p.size for p in ps),
            what="standby backup kernel: "
            + ", ".join(f"partition {p.id} ({p.cmdline()})" for p in ps),
        )
