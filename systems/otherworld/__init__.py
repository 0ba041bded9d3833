"""Scheme `otherworld`: a crash kernel loaded in advance takes over on the same partition.

After Depoutovitch & Stumm (EuroSys 2010). Promises: at deploy only the main kernel runs,
on partition 0; the crash kernel is *loaded*, not started — an image record (its
parameters and the sha256 of its code, checksummed; kernel/core/crashimage.py) written
into partition 0's reserved crash-kernel area. No standby process, no second core, no
watcher of its own: the machine's watchdog (systems/detect.py, as `reboot` has) is the only
observer. On a failure (a dying message, or the heartbeat stopped: a hang or a kill) the
watchdog checks the image (phase ``image check``), fences the dead kernel and its apps, and
starts the crash kernel from the image on the same partition and CPU (after the
machine profile's kernel boot time, modeled; not its firmware time: nothing resets the
machine)
(systems/otherworld/crashkernel.py): it walks the dead kernel's memory, adopts the file
cache in place, dirty pages included, mounts + replays, restarts the applications afresh
(process resurrection: not yet), loads a fresh image and serves as the main kernel, so a
second crash is survived the same way. A refused image (or a crash kernel that refuses to
run) is counted (``images_refused``), its reason reported, and the machine falls back to a
plain reboot (systems/reboot), after which a fresh image is loaded again.
"""

from __future__ import annotations

import json
import os
import time
from typing import ClassVar

from kernel import param
from kernel.core import crashimage
from kernel.hw.host import BootError
from kernel.hw.physmem import PhysMem, partition_layout
from systems.base import Capabilities, Phase, RecoveryReport, Reservation
from systems.reboot import Reboot, _count_processes

CRASH_KERNEL = "systems.otherworld.crashkernel"
# the code the image's digest covers: the crash kernel and what it adopts the cache with
CRASH_KERNEL_CODE = (
    CRASH_KERNEL,
    "kernel.core.kernel",
    "kernel.core.cachewalk",
    "kernel.core.pageadopt",
    "kernel.tools.txncomplete",
    "systems.adoption",
)
REPORT_TIMEOUT_S = 60.0  # for the crash kernel's counts, after first service


class Otherworld(Reboot):
    name = "otherworld"
    capabilities = Capabilities(keeps_cache=True, keeps_dirty_cache=True, migrates_cache=True)
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
        self._fence()
        r.phase("fence", t)
        before = _count_processes(self.host)
        # the crash kernel boots as a kernel does, without the firmware: the machine profile's
        # kernel boot time is spent where real hardware spends it (none without a profile)
        self._modeled(r, "kernel boot", self.kernel_boot_s)
        try:
            self._start_crash_kernel(r, image)
        except BootError as e:
            return self._fall_back(r, f"the crash kernel did not come up: {e}".splitlines()[0])
        r.processes_before, r.processes_recovered = before, min(before, len(self.apps))
        r.recovered = True
        return r

    def _report_path(self):
        return self.host.workdir / f"otherworld-recovery-{self.crashes}.json"

    def _start_crash_kernel(self, r: RecoveryReport, image: crashimage.Image) -> None:
        """Control passes to the loaded crash kernel; its own phases and counts join ``r``."""
        path = self._report_path()
        path.unlink(missing_ok=True)
        t = time.monotonic()
        kp = self.host.boot(
            0,
            module=image.params["module"],
            extra=("--report", str(path)),
            name="crashkernel",
            apps=self.apps,
        )
        os.listdir(kp.mount)  # the mount answers: service is back
        r.service_at = time.monotonic()
        d = self._wait_report(path, kp)
        # from its launch to its first step (the memory walk): the crash kernel's boot
        r.phase("crash kernel boot", t, d["phases"][0]["start"])
        r.phases += [Phase(p["name"], p["start"], p["end"], p["modeled"]) for p in d["phases"]]
        got = RecoveryReport.from_dict(d)
        r.cache, r.rejected, r.notes = got.cache, r.rejected + got.rejected, r.notes + got.notes

    def _wait_report(self, path, kp) -> dict:
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no report from the crash kernel within {REPORT_TIMEOUT_S} s")
            if not kp.alive():
                raise RuntimeError("the crash kernel died; see its log in the lab's logs/")
            time.sleep(0.002)
        return json.loads(path.read_text())

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
