"""Scheme `otherworld`: a crash kernel loaded in advance takes over on the same partition.

After Depoutovitch & Stumm (EuroSys 2010). Promises: at deploy only the main kernel runs,
on partition 0; the crash kernel is *loaded*, not started — an image record (its
parameters and the sha256 of its code, checksummed; kernel/core/crashimage.py) written
into partition 0's reserved crash-kernel area. No standby process, no second core, no
watcher of its own: the machine's watchdog (systems/detect.py, as `reboot` has) is the only
observer. The main kernel records its applications' open files (``--keep-apps``) and
the host holds a copy of its FUSE connection (kernel/hw/host.py ``hold_connection``), as
memory and devices outlive a kernel: when it dies the connection lives on, and the
applications' requests wait. On a failure (a dying message, or the heartbeat stopped: a
hang or a kill) the watchdog checks the image (phase ``image check``), fences the dead
kernel (its process only) and halts its applications where they are (systems/keep.py
``halt``), and starts the crash kernel from the image on the same partition and CPU
(after the machine profile's kernel boot time, modeled; not its firmware time: nothing
resets the machine) (systems/otherworld/crashkernel.py): it walks the dead kernel's
memory, adopts the file cache in place, dirty pages included, mounts + replays,
resurrects the processes — each whose process-table entry is valid goes on with the same
pid and its open files, a runtime-aware one after its crash procedure; one whose entry is
rejected is restarted, and counted — serves the same connection, loads a fresh image and
is the main kernel, so a second crash is survived the same way. A refused image (or a
crash kernel that refuses to run) is counted (``images_refused``), its reason reported,
and the machine falls back to a plain reboot (systems/reboot: the applications restarted),
after which a fresh image is loaded again.

Promises to another scheme whose kernel is succeeded in place (systems/txipc_sim/): the
same steps, shared — ``halt_in_place(host)`` fences the dead kernel and halts its
applications where they are; ``start_in_place(host, r, module, path, apps, name, boot)``
starts a kernel of ``module`` that takes over as the crash kernel does
(systems/otherworld/crashkernel.py ``take_over``) and joins its report to ``r``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import ClassVar

from kernel import param
from kernel.core import crashimage
from kernel.hw.host import BootError
from kernel.hw.physmem import PhysMem, partition_layout
from kernel.hw.procset import ProcError, fence_partition
from systems import keep
from systems.base import Capabilities, Phase, RecoveryReport, Reservation
from systems.reboot import Reboot

log = logging.getLogger("otherworld")

CRASH_KERNEL = "systems.otherworld.crashkernel"
# the code the image's digest covers: the crash kernel and what it adopts the cache with
CRASH_KERNEL_CODE = (
    CRASH_KERNEL,
    "kernel.core.kernel",
    "kernel.core.cachewalk",
    "kernel.core.pageadopt",
    "kernel.tools.txncomplete",
    "systems.adoption",
    "systems.keep",
)
REPORT_TIMEOUT_S = 60.0  # for the crash kernel's counts, after first service


class Otherworld(Reboot):
    name = "otherworld"
    capabilities = Capabilities(
        keeps_cache=True,
        keeps_dirty_cache=True,
        keeps_processes=True,
        keeps_unmodified_processes=True,
        migrates_cache=True,
    )
    kernel_modules: ClassVar[tuple[str, ...]] = ("kernel.core.kernel", CRASH_KERNEL)

    def __init__(self, firmware_s: float | None = None):
        super().__init__(firmware_s)
        self.crashes = 0
        self.images_refused = 0

    def deploy(self, host, apps=()) -> None:
        super().deploy(host, apps)
        p = host.machine.partition(0)
        self.lay = partition_layout(0, p.base, p.size)
        self._load_image(0)

    def _boot(self):
        """The main kernel, recording its apps' open files; the host holds its connection."""
        self.host.release_connection()  # a rebooted kernel's is a new one
        kp = self.host.boot(0, apps=self.apps, extra=("--keep-apps",))
        self.host.hold_connection(0)
        return kp

    def _load_image(self, generation: int) -> crashimage.Image:
        """What `kexec -p` does: the crash kernel's image into the reserved area."""
        params = {"module": CRASH_KERNEL, "modules": list(CRASH_KERNEL_CODE), "partition": 0}
        mem = PhysMem(self.host.physmem)
        try:
            return crashimage.load(mem, self.lay, params, generation)
        finally:
            mem.close()

    def _check_image(self) -> crashimage.Image:
        mem = PhysMem(self.host.physmem, readonly=True)
        try:
            return crashimage.check(mem, self.lay)
        finally:
            mem.close()

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        f = self.watcher.wait(timeout)
        r = RecoveryReport.after(self.name, f, fault)
        self.crashes += 1
        t = time.monotonic()
        try:
            image = self._check_image()
        except crashimage.ImageRefused as e:
            r.phase("image check", t)
            return self._fall_back(r, str(e))
        r.phase("image check", t)
        t = time.monotonic()
        self._halt()
        r.phase("fence", t)
        # the crash kernel boots as a kernel does, without the firmware: the machine profile's
        # kernel boot time is spent where real hardware spends it (none without a profile)
        self._modeled(r, "kernel boot", self.kernel_boot_s)
        try:
            self._start_crash_kernel(r, image)
        except BootError as e:
            return self._fall_back(r, f"the crash kernel did not come up: {e}".splitlines()[0])
        r.recovered = True
        return r

    def _halt(self) -> None:
        halt_in_place(self.host)

    def _report_path(self):
        return self.host.workdir / f"otherworld-recovery-{self.crashes}.json"

    def _start_crash_kernel(self, r: RecoveryReport, image: crashimage.Image) -> None:
        """Control passes to the loaded crash kernel; its own phases and counts join ``r``."""
        start_in_place(
            self.host,
            r,
            image.params["module"],
            self._report_path(),
            self.apps,
            "crashkernel",
            "crash kernel boot",
        )

    def _fall_back(self, r: RecoveryReport, why: str) -> RecoveryReport:
        """A refused crash kernel never runs: the machine reboots, and loads a fresh one."""
        self.images_refused += 1
        r.rejected.append(why)
        r.notes.append(
            f"crash kernel refused ({why}; {self.images_refused} so far): the machine fell "
            "back to a plain reboot"
        )
        r = self._reboot(r)
        self._load_image(0)
        r.notes.append("a fresh crash-kernel image was loaded into the reserved area")
        return r

    @classmethod
    def reservation(cls, machine) -> Reservation:
        p = machine.partition(0)
        return Reservation(
            memory_bytes=param.CRASHK_BYTES,
            what=f"crash-kernel area in partition 0 ({p.cmdline()}): the loaded image record "
            f"({param.CRASHK_BYTES // 1024} KiB); nothing runs until a crash",
        )


# ------------------------------------- shared by the schemes that take over in place


def halt_in_place(host) -> None:
    """The dead kernel killed (its process group: the applications have sessions of
    their own), its applications stopped where they are; the connection stays."""
    host.crash(0)
    try:
        keep.halt(host.tag, 0)
    except ProcError as e:  # no cgroup set to stop them in: they cannot be kept
        log.warning("applications fenced, not kept: %s", e)
        fence_partition(host.tag, 0)


def start_in_place(host, r: RecoveryReport, module: str, path, apps, name: str, boot: str) -> dict:
    """A kernel of ``module`` (systems/otherworld/crashkernel.py ``take_over``) started on
    partition 0 to take the dead kernel's place, serving the connection the host holds;
    service is back when the mount answers. Its report (``path``) joins ``r``: the phase
    ``boot`` from its launch to its first step, then its own phases, cache counts, refusals,
    notes and processes' fates. Returns that report."""
    path.unlink(missing_ok=True)
    t = time.monotonic()
    pid, fd = host.hold_connection(0)
    kp = host.boot(
        0,
        host.kernels[0].mount,  # the same mount: its connection lives on
        module=module,
        extra=("--report", str(path), "--hold-pid", str(pid), "--hold-fd", str(fd)),
        name=name,
        apps=apps,
    )
    os.listdir(kp.mount)  # the mount answers: service is back
    r.service_at = time.monotonic()
    d = _wait_report(path, kp)
    r.phase(boot, t, d["phases"][0]["start"])
    r.phases += [Phase(p["name"], p["start"], p["end"], p["modeled"]) for p in d["phases"]]
    got = RecoveryReport.from_dict(d)
    r.cache, r.rejected, r.notes = got.cache, r.rejected + got.rejected, r.notes + got.notes
    r.processes, r.processes_before = got.processes, got.processes_before
    r.processes_recovered = got.processes_recovered
    host.release_connection()  # the next crash's: the one resumed, or a new mount's
    host.hold_connection(0)
    return d


def _wait_report(path, kp) -> dict:
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no report from the new kernel within {REPORT_TIMEOUT_S} s")
        if not kp.alive():
            raise RuntimeError("the new kernel died; see its log in the lab's logs/")
        time.sleep(0.002)
    return json.loads(path.read_text())
