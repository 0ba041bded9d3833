"""Scheme `warmcache`: a reboot beneath a VMM that keeps the page cache warm (Kourai, VEE'11).

Promises: at deploy the VMM's region is made (kernel/hw/vmm.py) and the kernel of partition 0
boots beneath the VMM, which from then on tracks which frame holds which disk block at
which write generation and invalidates a frame when the kernel stores into it. On a
failure it goes as `reboot` does — detect, fence (nothing of the dead kernel runs), the
machine profile's kernel boot time (modeled; not its firmware/POST time: the VMM reboots
its guest, the machine does not restart), a fresh kernel in the same partition, mount + journal replay,
applications started afresh — with one more phase, the **cache check**: the
VMM checks every frame it tracked (entry seal, block generation, content checksum) and keeps
the consistent ones, reading through mappings made while the dead kernel was being fenced
(page-table work only: kernel/hw/vmm.py ``map_ahead``). The check runs beside the new
kernel's boot (its interpreter and imports); the kernel waits for it (``--vmm-gate``) before
it touches the partition's memory, and boots only if it passed. The phases stay end to
end: "cache check" is the boot's stretch until the check ended, "boot" the rest. The new kernel boots beneath the
VMM too; its reads of a kept block are served from memory without the device model's
delay, every other read goes to the disk.
Frames stored into before the crash are refused as inconsistent, frames whose content no
longer matches its checksum as corrupted; dirty pages are lost, and counted.

The report's file-cache counts are those of every scheme (file pages of the dead kernel:
``pages_recovered`` = those kept warm, ``pages_rejected`` = those found corrupted); the
VMM's own counts (every block's copy, metadata too) are ``pages_preserved``,
``pages_inconsistent``, ``pages_corrupted`` and ``pages_reused`` — reads served from memory
by the time service was back. ``refresh(report)`` brings the last two up to date later;
``stats()`` gives the VMM's counters.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from kernel import param
from kernel.hw import vmm
from kernel.hw.physmem import PhysMem, partition_layout
from systems.base import Capabilities, Phase, RecoveryReport, Reservation
from systems.reboot import Reboot


class WarmCache(Reboot):
    name = "warmcache"
    capabilities = Capabilities(keeps_cache=True)
    region_path: str | None = None
    through_firmware = False  # the VMM reboots its guest: the machine's POST does not run

    def __init__(self, firmware_s: float | None = None, spare_pages: int = param.VMM_SPARE_PAGES):
        super().__init__(firmware_s)
        if spare_pages < 0:
            raise ValueError(f"spare_pages: must not be negative, got {spare_pages}")
        self.spare_pages = spare_pages
        self.region: vmm.Region | None = None
        self._guest: PhysMem | None = None  # the dead guest's memory, from fence to check
        self._ahead = None  # the thread mapping it meanwhile (vmm.map_ahead)
        self._pending: _CacheCheck | None = None  # the check the next boot waits for
        self._checked: _CacheCheck | None = None  # the last one, for on_crash's report

    def deploy(self, host, apps=()) -> None:
        p = host.machine.partition(0)
        self.lay = partition_layout(0, p.base, p.size)
        self.region_path = vmm.region_path(host.physmem)
        disks = [d for d in p.devices if d in {x.name for x in host.machine.disks}]
        if not disks:
            raise ValueError("warmcache: partition 0 owns no disk for the VMM to track")
        nblocks = os.path.getsize(host.disk_image(disks[0])) // param.BLOCK_SIZE
        self.region = vmm.Region.create(self.region_path, self.lay, nblocks, self.spare_pages)
        super().deploy(host, apps)

    def _boot(self):
        extra = ("--vmm", self.region_path)
        check = self._pending
        if check is None:  # the first boot: nothing to check
            return self.host.boot(0, apps=self.apps, extra=extra)
        self._pending = None
        try:
            kp = self.host.boot(
                0,
                apps=self.apps,
                extra=(*extra, "--vmm-gate", str(check.gate)),
                pass_fds=(check.gate,),
            )
        except Exception:
            check.result()  # a failed check is the cause: raise that
            raise
        check.join()  # it passed: the kernel waited for it
        return kp

    def _fence(self) -> None:
        """The VMM starts mapping the frames it will check while the dead kernel is fenced."""
        self._close_guest()  # a mapping left by a crash that never reached its check
        self._guest = PhysMem(self.host.physmem, readonly=True)
        self._ahead = vmm.map_ahead(self.region, self._guest, self.lay)
        super()._fence()

    def _before_boot(self, r: RecoveryReport) -> None:
        """The cache check starts: the dead kernel is fenced; keep what still matches the
        disk. It runs beside the new kernel's boot, which waits for it (``--vmm-gate``)
        before it touches the partition's memory: a VMM checks while its guest boots."""
        self._pending = _CacheCheck(self)

    def _check(self) -> dict:
        """The check itself (in the gate's thread): the frames, then the file pages among them."""
        mem = self._guest
        try:
            self._ahead.join()
            got = vmm.preserve(self.region, mem, self.lay)
            files = vmm.file_pages(mem, self.lay)
            got["recovered"] = int(np.count_nonzero(files[got["kept_frames"]]))
            got["rejected"] = int(np.count_nonzero(files[got["corrupted_frames"]]))
            return got
        finally:
            self._close_guest()

    def _close_guest(self) -> None:
        if self._ahead is not None:
            self._ahead.join()  # it maps through self._guest
            self._ahead = None
        if self._guest is not None:
            self._guest.close()
            self._guest = None

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        r = super().on_crash(fault, timeout)
        check, self._checked = self._checked, None
        g = check.result()
        r.cache.pages_recovered, r.cache.pages_rejected = g["recovered"], g["rejected"]
        _split_boot(r, check)
        self.refresh(r)
        r.notes.append(
            f"VMM: {g['preserved']} preserved pages at the crash, {g['kept']} kept warm, "
            f"{g['inconsistent']} refused as inconsistent, {g['corrupted']} as corrupted"
            + (f", {g['duplicates']} duplicate copies dropped" if g["duplicates"] else "")
        )
        return r

    def refresh(self, r: RecoveryReport) -> RecoveryReport:
        """The VMM's counts since the last cache check, into a report of this scheme."""
        s = self.stats()
        c = r.cache
        c.pages_preserved = s["preserved"]
        c.pages_inconsistent = s["inconsistent"] + s["refused_inconsistent"]
        c.pages_corrupted = s["corrupted"] + s["refused_corrupted"]
        c.pages_reused = s["reused"]
        return r

    @classmethod
    def reservation(cls, machine) -> Reservation:
        return Reservation(
            memory_bytes=None,
            what="VMM region beneath partition 0 (frame table, "
            "block generations, spare pages; allocated as used)",
        )

    def vmm_region(self) -> str | None:
        return self.region_path if self.region_path and os.path.exists(self.region_path) else None

    def reserved_bytes(self) -> int | None:
        path = self.vmm_region()
        return os.path.getsize(path) if path else None

    def stats(self) -> dict[str, int]:
        """The VMM's counters (kernel/hw/vmm.py COUNTERS)."""
        return self.region.stats()

    def teardown(self) -> None:
        try:
            self._close_guest()
            super().teardown()
        finally:
            if self.region is not None:
                self.region.close()
                self.region = None
            if self.region_path:
                vmm.Region.unlink(self.region_path)


class _CacheCheck:
    """The cache check in a thread of its own, and the gate the new kernel waits on: the
    pipe's write end gets b"1" when the check passed; closed without it, the kernel exits."""

    def __init__(self, scheme: WarmCache):
        self.gate, self._w = os.pipe()
        self.start = self.end = time.monotonic()
        self._got: dict | None = None
        self._error: BaseException | None = None
        scheme._checked = self
        self._thread = threading.Thread(target=self._run, args=(scheme,), daemon=True)
        self._thread.start()

    def _run(self, scheme: WarmCache) -> None:
        try:
            self._got = scheme._check()
            self.end = time.monotonic()
            os.write(self._w, b"1")
        except BaseException as e:  # re-raised by result(), in the recovery's thread
            self._error = e
        finally:
            os.close(self._w)

    def join(self) -> None:
        self._thread.join()
        if self.gate >= 0:
            os.close(self.gate)
            self.gate = -1

    def result(self) -> dict:
        self.join()
        if self._error is not None:
            raise self._error
        return self._got


def _split_boot(r: RecoveryReport, check: _CacheCheck) -> None:
    """Phases stay end to end: the boot's stretch until the check ended is the phase
    "cache check" (the boot ran beside it), the rest is "boot". A check that ended
    before the boot started (beside a modeled kernel boot) shows as 0 s."""
    i = next(i for i, p in enumerate(r.phases) if p.name == "boot")
    boot = r.phases[i]
    end = min(max(check.end, boot.start), boot.end)
    r.phases.insert(i, Phase("cache check", boot.start, end))
    boot.start = end
    r.notes.append(
        f"cache check: {(check.end - check.start) * 1e3:.0f} ms, beside the new kernel's boot "
        f"(its first {(end - r.phases[i].start) * 1e3:.0f} ms)"
    )
