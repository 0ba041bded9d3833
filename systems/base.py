"""The recovery-scheme protocol, its report, the report checker, and the registry.

Promises to the harness and the lab: every scheme is a ``RecoveryScheme`` — ``deploy``
boots its kernels on a Host, ``on_crash`` detects the failure, recovers (or not) and returns
a ``RecoveryReport``, ``teardown`` leaves nothing behind. A report's phases carry measured
start and end times on CLOCK_MONOTONIC (seconds); a phase that is modeled hardware time
(firmware, a device) says so. ``check_report`` is the validating wrapper the tests apply to
every scheme: phases ordered, non-negative, inside the outage, counts consistent.
``SCHEMES`` names every scheme; ``NoRecovery`` ("none") records the outage and recovers
nothing — the null scheme every harness test can use.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

PHASE_ORDER = ["detect", "fence", "firmware", "cache check", "device takeover", "boot", "mount + replay",
               "cache migration", "process migration", "app restart", "IP takeover",
               "first service"]


@dataclass
class Phase:
    name: str
    start: float          # CLOCK_MONOTONIC seconds
    end: float
    modeled: bool = False  # modeled hardware time, waited for but not measured work

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class CacheCounts:
    pages_before: int = 0           # file pages cached by the crashed kernel (valid descriptors)
    dirty_pages_before: int = 0     # of which dirty (not yet on disk)
    pages_recovered: int = 0        # adopted by the recovering kernel
    dirty_pages_recovered: int = 0  # of which dirty: unsynced data saved
    pages_rejected: int = 0         # refused as corrupted; never written to disk
    metadata_rejected: int = 0      # metadata blocks of a running transaction not committed as found (inconsistent)
    # warmcache: disk blocks' copies the VMM held at the crash (file data and metadata, one
    # per block, also pages the kernel had evicted), and what became of them
    pages_preserved: int = 0        # copies the VMM found at the crash
    pages_inconsistent: int = 0     # refused: stored into before the crash, or the block was written since
    pages_corrupted: int = 0        # refused: the content checksum did not match
    pages_reused: int = 0           # served to reads instead of the device (by the report's time)

    @property
    def dirty_pages_lost(self) -> int:
        return self.dirty_pages_before - self.dirty_pages_recovered


@dataclass
class RecoveryReport:
    scheme: str
    fault: str | None
    failed_at: float                 # when the fault activated (the dying kernel's record), or injected
    detected_by: str = ""            # "dying message", "heartbeat", "process exit", ...
    phases: list[Phase] = field(default_factory=list)
    cache: CacheCounts = field(default_factory=CacheCounts)
    processes_before: int = 0
    processes_recovered: int = 0
    rejected: list[str] = field(default_factory=list)  # why each rejected object was refused
    recovered: bool = False
    service_at: float | None = None  # first service after the crash
    notes: list[str] = field(default_factory=list)

    @property
    def outage_s(self) -> float | None:
        return None if self.service_at is None else self.service_at - self.failed_at

    @property
    def modeled_s(self) -> float:
        return sum(p.seconds for p in self.phases if p.modeled)

    @property
    def verdict(self) -> str:
        if not self.recovered:
            return "not recovered"
        c = self.cache
        lost = c.dirty_pages_lost > 0 or c.pages_rejected > 0 or c.metadata_rejected > 0
        return "recovered with loss" if lost else "recovered"

    @classmethod
    def after(cls, scheme: str, failure, fault: dict | None = None) -> "RecoveryReport":
        """A report opened by a detected failure, with its detection phase."""
        name = (fault or {}).get("fault") or (failure.mail.fault if failure.mail else None) or None
        r = cls(scheme, name, failure.failed_at, detected_by=failure.how)
        r.phase("detect", failure.failed_at, failure.detected_at)
        return r

    def phase(self, name: str, start: float, end: float | None = None, modeled: bool = False) -> Phase:
        p = Phase(name, start, time.monotonic() if end is None else end, modeled)
        self.phases.append(p)
        return p

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryReport":
        r = cls(d["scheme"], d["fault"], d["failed_at"], d["detected_by"],
                [Phase(p["name"], p["start"], p["end"], p["modeled"]) for p in d["phases"]],
                CacheCounts(**{k: v for k, v in d["cache"].items() if k != "dirty_pages_lost"}),
                d["processes_before"], d["processes_recovered"], list(d["rejected"]),
                d["recovered"], d["service_at"], list(d["notes"]))
        return r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cache"]["dirty_pages_lost"] = self.cache.dirty_pages_lost
        d.update(outage_s=self.outage_s, modeled_s=self.modeled_s, verdict=self.verdict)
        for p in d["phases"]:
            p["seconds"] = p["end"] - p["start"]
        return d


class ReportError(AssertionError):
    """A scheme returned a report that breaks the protocol."""


def check_report(r: RecoveryReport) -> RecoveryReport:
    """The validating wrapper: raise ReportError naming the first broken rule."""
    end = r.service_at if r.service_at is not None else float("inf")
    prev_start = r.failed_at - 1e-3  # detection may begin a hair before the kernel's own record
    for p in r.phases:
        if p.seconds < 0:
            raise ReportError(f"{r.scheme}: phase {p.name!r} ends before it starts")
        if p.start < prev_start:
            raise ReportError(f"{r.scheme}: phase {p.name!r} starts before the phase before it")
        if p.start < r.failed_at - 1e-3:
            raise ReportError(f"{r.scheme}: phase {p.name!r} starts before the failure")
        if p.end > end + 1e-3:
            raise ReportError(f"{r.scheme}: phase {p.name!r} ends after service was back")
        prev_start = p.start
    c = r.cache
    for name in ("pages_before", "dirty_pages_before", "pages_recovered",
                 "dirty_pages_recovered", "pages_rejected", "pages_preserved",
                 "pages_inconsistent", "pages_corrupted", "pages_reused", "metadata_rejected"):
        if getattr(c, name) < 0:
            raise ReportError(f"{r.scheme}: cache.{name} is negative")
    if c.dirty_pages_before > c.pages_before:
        raise ReportError(f"{r.scheme}: more dirty pages than pages before the crash")
    if c.dirty_pages_recovered > c.dirty_pages_before or c.pages_recovered > c.pages_before:
        raise ReportError(f"{r.scheme}: recovered more pages than there were")
    if c.pages_recovered + c.pages_rejected > c.pages_before:
        raise ReportError(f"{r.scheme}: recovered and rejected pages exceed the pages before")
    if c.pages_inconsistent + c.pages_corrupted + c.pages_reused > c.pages_preserved:
        raise ReportError(f"{r.scheme}: preserved pages refused and reused exceed the pages preserved")
    if r.processes_recovered > r.processes_before:
        raise ReportError(f"{r.scheme}: recovered more processes than there were")
    if r.recovered and r.service_at is None:
        raise ReportError(f"{r.scheme}: recovered, but no time of first service")
    return r


class RecoveryScheme(Protocol):
    name: str

    def deploy(self, host, apps=()) -> None: ...
    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport: ...
    def teardown(self) -> None: ...


def registry() -> dict[str, type]:
    from systems.none import NoRecovery
    from systems.orthros import Orthros
    from systems.reboot import Reboot
    from systems.warmcache import WarmCache
    return {"none": NoRecovery, "reboot": Reboot, "orthros": Orthros, "warmcache": WarmCache}
