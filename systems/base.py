"""The recovery-scheme contract, its report, the report checker, and the registry.

Promises to the harness, the lab and the benchmarks: every scheme is a subclass of
``RecoveryScheme``, and everything they use of one is declared there — ``deploy`` boots its
kernels on a Host, ``inject`` puts a fault into its ``active`` partition, ``on_crash``
detects the failure, recovers (or not) and returns a ``RecoveryReport``, ``teardown`` leaves
nothing behind (also after a failed or no deploy); with ``defer_protection`` set,
``on_crash`` may return before the scheme is armed again and ``await_protection`` waits for
that; its ``capabilities`` (what it claims to
keep) and ``reservation`` (what it keeps from the workload) are data, and ``kernel_modules``
names the programs its kernel processes run; ``refresh`` brings a report's later counts
(pages reused after recovery) up to date. A report's phases carry measured start and end
times on CLOCK_MONOTONIC (seconds); a phase that is modeled hardware time (firmware, a
device) says so. ``check_report`` is the validating wrapper the tests apply to every scheme:
phases ordered, non-negative, inside the outage, counts consistent. ``registry()`` finds
the schemes through the ``crashbench.schemes`` entry points, so a scheme may live in
another package; ``none`` (systems/none.py) records the outage and recovers nothing — the
null scheme every harness test can use.
"""

from __future__ import annotations

import functools
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import ClassVar

SCHEME_GROUP = "crashbench.schemes"


@dataclass
class Phase:
    name: str
    start: float  # CLOCK_MONOTONIC seconds
    end: float
    modeled: bool = False  # modeled hardware time, waited for but not measured work

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class CacheCounts:
    pages_before: int = 0  # file pages cached by the crashed kernel (valid descriptors)
    dirty_pages_before: int = 0  # of which dirty (not yet on disk)
    pages_recovered: int = 0  # adopted by the recovering kernel
    dirty_pages_recovered: int = 0  # of which dirty: unsynced data saved
    pages_rejected: int = 0  # refused as corrupted; never written to disk
    # adopted dirty pages a request truncated (the file cut or removed) before their check:
    # dropped unread, their data replaced after the recovery — superseded, not lost
    dirty_pages_superseded: int = 0
    metadata_rejected: int = (
        0  # metadata blocks of a running transaction not committed as found (inconsistent)
    )
    # warmcache: disk blocks' copies the VMM held at the crash (file data and metadata, one
    # per block, also pages the kernel had evicted), and what became of them
    pages_preserved: int = 0  # copies the VMM found at the crash
    pages_inconsistent: int = (
        0  # refused: stored into before the crash, or the block was written since
    )
    pages_corrupted: int = 0  # refused: the content checksum did not match
    pages_reused: int = (
        0  # served to reads instead of the device (by the report's time; ``refresh``)
    )

    @property
    def dirty_pages_lost(self) -> int:
        return self.dirty_pages_before - self.dirty_pages_recovered - self.dirty_pages_superseded


FATES = ("preserved", "restarted", "lost")


@dataclass
class ProcessFate:
    """What became of one process of the crashed kernel, and why."""

    name: str
    pid: int | None  # None: not known (its process-table entry was rejected)
    fate: str  # one of FATES
    reason: str
    new_pid: int | None = None  # the restarted process


@dataclass
class RecoveryReport:
    scheme: str
    fault: str | None
    failed_at: float  # when the fault activated (the dying kernel's record), or injected
    detected_by: str = ""  # "dying message", "heartbeat", "process exit", ...
    phases: list[Phase] = field(default_factory=list)
    cache: CacheCounts = field(default_factory=CacheCounts)
    processes_before: int = 0
    processes_recovered: int = 0
    rejected: list[str] = field(default_factory=list)  # why each rejected object was refused
    recovered: bool = False
    service_at: float | None = None  # first service after the crash
    notes: list[str] = field(default_factory=list)
    processes: list[ProcessFate] = field(default_factory=list)  # a scheme that reports them
    figures: dict[str, int] = field(default_factory=dict)  # a scheme's own counts, by name

    def process_counts(self) -> dict[str, int]:
        """How many processes of the crashed kernel were preserved, restarted, lost."""
        return {f: sum(1 for p in self.processes if p.fate == f) for f in FATES}

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

    def phase(
        self, name: str, start: float, end: float | None = None, modeled: bool = False
    ) -> Phase:
        p = Phase(name, start, time.monotonic() if end is None else end, modeled)
        self.phases.append(p)
        return p

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryReport":
        r = cls(
            d["scheme"],
            d["fault"],
            d["failed_at"],
            d["detected_by"],
            [Phase(p["name"], p["start"], p["end"], p["modeled"]) for p in d["phases"]],
            CacheCounts(**{k: v for k, v in d["cache"].items() if k != "dirty_pages_lost"}),
            d["processes_before"],
            d["processes_recovered"],
            list(d["rejected"]),
            d["recovered"],
            d["service_at"],
            list(d["notes"]),
            [ProcessFate(**p) for p in d.get("processes", ())],
            dict(d.get("figures", {})),
        )
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
    for name in (
        "pages_before",
        "dirty_pages_before",
        "pages_recovered",
        "dirty_pages_recovered",
        "dirty_pages_superseded",
        "pages_rejected",
        "pages_preserved",
        "pages_inconsistent",
        "pages_corrupted",
        "pages_reused",
        "metadata_rejected",
    ):
        if getattr(c, name) < 0:
            raise ReportError(f"{r.scheme}: cache.{name} is negative")
    if c.dirty_pages_before > c.pages_before:
        raise ReportError(f"{r.scheme}: more dirty pages than pages before the crash")
    if c.dirty_pages_recovered > c.dirty_pages_before or c.pages_recovered > c.pages_before:
        raise ReportError(f"{r.scheme}: recovered more pages than there were")
    if c.dirty_pages_recovered + c.dirty_pages_superseded > c.dirty_pages_before:
        raise ReportError(f"{r.scheme}: recovered and superseded dirty pages exceed those before")
    if c.pages_recovered + c.pages_rejected > c.pages_before:
        raise ReportError(f"{r.scheme}: recovered and rejected pages exceed the pages before")
    if c.pages_inconsistent + c.pages_corrupted + c.pages_reused > c.pages_preserved:
        raise ReportError(
            f"{r.scheme}: preserved pages refused and reused exceed the pages preserved"
        )
    if r.processes_recovered > r.processes_before:
        raise ReportError(f"{r.scheme}: recovered more processes than there were")
    for p in r.processes:
        if p.fate not in FATES or not p.reason:
            raise ReportError(f"{r.scheme}: process {p.name}: fate {p.fate!r} needs a reason")
    for k, v in r.figures.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ReportError(f"{r.scheme}: figure {k!r} is {v!r}, not a count")
    if r.recovered and r.service_at is None:
        raise ReportError(f"{r.scheme}: recovered, but no time of first service")
    return r


@dataclass(frozen=True)
class Capabilities:
    """What a scheme claims to survive; the conformance suite holds it to each claim."""

    recovers: bool = True  # service comes back after a crash
    keeps_cache: bool = False  # clean file pages of the dead kernel are recovered (or kept warm)
    keeps_dirty_cache: bool = False  # its dirty (never written back) pages are recovered
    keeps_processes: bool = False  # runtime-aware processes keep their state
    keeps_unmodified_processes: bool = False  # unmodified processes keep running, same pid
    migrates_cache: bool = False  # adopts the cache in a "cache migration" phase of the outage
    # a kernel death (panic, kill, hang) inside a request: that request rolled back, then the
    # cache kept and the unmodified processes kept running, same pid (a death outside any
    # request is recovered as the fields above say)
    keeps_processes_in_request: bool = False
    partitions_needed: int = 1  # partitions of the machine it deploys on (a standby's too)


@dataclass(frozen=True)
class Reservation:
    """What a scheme keeps from the workload while nothing fails (overhead accounting)."""

    cores: int = 0
    cpus: tuple[int, ...] = ()
    memory_bytes: int | None = 0  # None: measured per deploy (``reserved_bytes``)
    what: str = "nothing (a heartbeat thread in the kernel, a watcher on the host)"


class RecoveryScheme(ABC):
    """The contract between a scheme and the harness, the lab and the benchmarks."""

    name: ClassVar[str]
    description: ClassVar[str] = ""  # `crashbench list`'s line; "": its module docstring's first
    capabilities: ClassVar[Capabilities] = Capabilities()
    kernel_modules: ClassVar[tuple[str, ...]] = ("kernel.core.kernel",)  # what its kernels run
    options: ClassVar[tuple[str, ...]] = ()  # keyword options `run` and `up` may set (modes)
    host = None  # the Host it deployed on; None before deploy
    active: int = 0  # the partition whose kernel serves (faults go there)
    net_tag: str | None = None  # the network a scheme that moves the NIC takes over
    # True: ``on_crash`` may return before the scheme is armed against a next crash (a
    # standby still booting); whoever sets it calls ``await_protection`` before the next
    # fault (a campaign's fast faults). False: ``on_crash`` returns protected again.
    defer_protection: bool = False

    @abstractmethod
    def deploy(self, host, apps=()) -> None: ...

    @abstractmethod
    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport: ...

    def await_protection(self) -> None:
        """Return once the scheme survives a next crash again (orthros: the backup booted in
        the freed partition stands by), within a bound of its own; at once for a scheme
        that re-arms inside ``on_crash``. Raises when it cannot be protected again (the
        message says why)."""

    def inject(self, fault: str, **where) -> dict:
        """Put ``fault`` into the active kernel; its control socket's reply."""
        return self.host.control(self.active, {"cmd": "inject", "fault": fault, **where})

    def teardown(self) -> None:
        """Stop and remove everything deploy made; safe after a failed or no deploy, and
        when called again (``host`` is None once torn down)."""
        host, self.host = self.host, None
        if host is not None:
            host.close()

    @classmethod
    def reservation(cls, machine) -> Reservation:
        return Reservation()

    def vmm_region(self) -> str | None:
        """The file of a VMM beneath the active kernel, whose CPU time counts as the VMM's."""
        return None

    def reserved_bytes(self) -> int | None:
        """Memory this deployment keeps beyond the partitions, measured (None: none)."""
        return None

    def refresh(self, report: RecoveryReport) -> RecoveryReport:
        """``report`` with the counts that go on changing after service is back brought up
        to date (warmcache: pages reused); the driver calls it once the load after
        recovery has run. Most schemes have none."""
        return report


class RegistryError(RuntimeError):
    """A registered scheme or workload could not be loaded; the message names it."""


def load_group(group: str, base: type) -> dict[str, type]:
    """{name: class} of the entry points of ``group``, each checked to be a ``base`` and to
    carry its own name."""
    out: dict[str, type] = {}
    for ep in entry_points(group=group):
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - any import error of a plug-in, named
            raise RegistryError(
                f"{group} entry point {ep.name!r} ({ep.value}) failed to load: "
                f"{type(e).__name__}: {e}"
            ) from None
        if getattr(cls, "name", None) != ep.name:
            raise RegistryError(
                f"{group} entry point {ep.name!r} ({ep.value}) is named "
                f"{getattr(cls, 'name', None)!r}, not {ep.name!r}"
            )
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(f"{group} entry point {ep.name!r} is not a {base.__name__}")
        out[ep.name] = cls
    if not out:
        raise RegistryError(f"no {group} entry points: install the project (pip install -e .)")
    return out


def registry() -> dict[str, type[RecoveryScheme]]:
    return load_group(SCHEME_GROUP, RecoveryScheme)


@functools.cache
def kernel_modules() -> frozenset[str]:
    """The programs any registered scheme's kernel processes run (the lab's liveness test)."""
    return frozenset(m for cls in registry().values() for m in cls.kernel_modules)
