"""Scheme `warmcache`: a reboot beneath a VMM that keeps the page cache warm (Kourai, VEE'11).

Promises: at deploy the VMM's region is made (kernel/hw/vmm.py) and the kernel of partition 0
boots beneath the VMM, which from then on tracks which frame holds which disk block at
which write generation and invalidates a frame when the kernel stores into it. On a
failure it goes as `reboot` does — detect, fence (nothing of the dead kernel runs), the
machine profile's kernel boot time (modeled; not its firmware/POST time: the VMM reboots
its guest, the machine does not restart), a fresh kernel in the same partition, mount + journal replay,
applications started afresh — with one more phase before the boot, the **cache check**: the
VMM checks every frame it tracked (entry seal, block generation, content checksum) and keeps
the consistent ones, reading through mappings made while the dead kernel was being fenced
(page-table work only: kernel/hw/vmm.py ``map_ahead``). The new kernel boots beneath the
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
import time

import numpy as np

from kernel import param
from kernel.hw import vmm
from kernel.hw.physmem import PhysMem, partition_layout
from systems.base import Capabilities, RecoveryReport, Reservation
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
        return self.host.boot(0, apps=self.apps, extra=("--vmm", self.region_path))

    def _fence(self) -> None:
        """The VMM starts mapping the frames it will check while the dead kernel is fenced."""
        self._close_guest()  # a mapping left by a crash that never reached its check
        self._guest = PhysMem(self.host.physmem, readonly=True)
        self._ahead = vmm.map_ahead(self.region, self._guest, self.lay)
        super()._fence()

    def _before_boot(self, r: RecoveryReport) -> None:
        """The cache check: the dead kernel is fenced; keep what still matches the disk."""
        t = time.monotonic()
        mem = self._guest
        try:
            self._ahead.join()
            got = vmm.preserve(self.region, mem, self.lay)
            files = vmm.file_pages(mem, self.lay)
            r.cache.pages_recovered = int(np.count_nonzero(files[got["kept_frames"]]))
            r.cache.pages_rejected = int(np.count_nonzero(files[got["corrupted_frames"]]))
        finally:
            self._close_guest()
        r.phase("cache check", t)
        self._checked = got

    def _close_guest(self) -> None:
        if self._ahead is not None:
            self._ahead.join()  # it maps through self._guest
            self._ahead = None
        if self._guest is not None:
            self._guest.close()
            self._guest = None

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        r = super().on_crash(fault, timeout)
        self.refresh(r)
        g = self._checked
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
