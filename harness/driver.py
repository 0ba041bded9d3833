"""The driver: one trial is the same ordered phases for every scheme.

Promises to the CLI and to whoever reads a run: a trial is deploy → warm up → steady state
→ inject → observe recovery → verify → teardown (and, for a scheme told to defer its
protection after a crash, ``defer_protection``, an "await protection" phase between warm-up
and steady state: no steady state, and so no fault, before the machine survives a crash
again), each phase's start and end recorded on
CLOCK_MONOTONIC; the warm-up goes on until the active kernel's page cache holds the
workload's working set (its own counter, bounded in time: ``cache_fill``), and the
scheme's report is refreshed after the load that follows recovery (pages reused then); the
seed and every parameter are recorded; teardown always runs (also on
an error, Ctrl-C or SIGTERM), leaving no kernel, mount, namespace or client process behind.
The machine is a harness/testbed.py ``Testbed`` (recorded in harness/owners.py from before
it exists until its teardown has succeeded, so what a killed run leaves is found by the next
command). ``Trial.run`` is the one pipeline of every trial: deploy, the kind's ``measure``,
teardown, ``record``; the overhead benchmark's steady-state trials are kinds of it. The
driver measures nothing itself beyond phase boundaries: figures come from the clients'
history (harness/checkers), the scheme's RecoveryReport and the kernel's own counters,
sampled into the history (harness/kcounters.py) except from the injection to the
scheme's report. Waiting through warm-up and
steady state is load running, not a stand-in for a result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import history, prepared
from harness.checkers.writes import CORRUPTED, writes
from harness.kcounters import CounterSampler
from harness.testbed import Testbed
from harness.workloads import Service
from harness.workloads import registry as workloads
from kernel.hw.physmem import partition_layout
from systems.base import check_report
from systems.base import registry as schemes

DEFAULTS = {
    "warmup_s": 2.0,
    "steady_s": 5.0,
    "post_s": 10.0,  # a cold cache on the default disk takes more than 5 s to refill
    "recovery_timeout_s": 30.0,
    "ready_timeout_s": 30.0,
    "bin_s": 1.0,
    "cache_timeout_s": 120.0,
}
# The warm-up's cache is full once the kernel caches the workload's working set, or this
# share of the partition's frames when the working set is larger (clean pages are
# reclaimed before the frames run out, so the page count never reaches every frame).
CACHE_FULL_FRACTION = 0.9


class DriverError(RuntimeError):
    """A trial could not be carried out (the message says which phase and why)."""


@dataclass
class TrialSpec:
    scheme: str
    workload: str
    fault: str
    trial: int
    seed: int
    timing: dict = field(default_factory=lambda: dict(DEFAULTS))
    workload_params: dict = field(default_factory=dict)
    machine_file: str | None = None
    fault_args: dict = field(default_factory=dict)  # where the fault goes: target, site, seed
    scheme_options: dict = field(default_factory=dict)  # given to the schemes declaring them
    data_seed: int | None = None  # the data set's, the same for a run's trials (None: seed)

    @property
    def id(self) -> str:
        return f"{self.scheme}-{self.workload}-{self.fault}-{self.trial}"


class Trial:
    """One trial's state: the phases run in order by ``run``."""

    data_store: Path | None = None  # where the run's prepared data set is kept (prepared.py)
    data_seed: int | None = None  # the seed it is made with (None: the spec's data seed)
    data_set: str | None = None  # "made" or "copied" for this trial's machine

    def __init__(self, spec: TrialSpec, out: Path, say=lambda msg: None):
        self.spec, self.out, self.say = spec, out, say
        self.phases: list[dict] = []
        self.workload = workloads()[spec.workload](**spec.workload_params)
        self.scheme = self.make_scheme(spec.scheme)
        self.bed = self.host = self.net = self.svc = self.clients = self.report = None
        self.sampler = None
        self.events: list[dict] = []
        self.evidence: dict[str, dict] = {}
        self.crash_at: float | None = None
        self.cache_fill: dict | None = None

    def make_scheme(self, name: str):
        cls = schemes()[name]
        return cls(**{k: v for k, v in self.spec.scheme_options.items() if k in cls.options})

    def phase(self, name: str):
        return _Phase(self, name)

    def run(self) -> dict:
        """The one pipeline of every trial: deploy, the kind's own measured phases, teardown
        (always), then the trial's record."""
        try:
            with self.phase("deploy"):
                self.deploy()
            self.measure()
        finally:
            with self.phase("teardown"):
                self.teardown()
        return self.record()

    def measure(self) -> None:
        """A crash trial: load, a fault, the recovery, and what the clients saw."""
        t = self.spec.timing
        until = (
            time.monotonic()
            + t["ready_timeout_s"]
            + t["warmup_s"]
            + t["steady_s"]
            + _cache_timeout(t)
            + t["recovery_timeout_s"]
            + t["post_s"]
            + _modeled_reboot_s(self.host.machine)
            + 10
        )
        with self.phase("warm up"):
            self.sampler = CounterSampler(
                self.host, self.scheme, self.svc.history_dir() / "kernel-counters.jsonl"
            ).start()
            self.warm_up(until)
        if self.scheme.defer_protection:  # the steady state is of a protected machine
            with self.phase("await protection"):
                self.scheme.await_protection()
        with self.phase("steady state"):
            self.hold(t["steady_s"])
        with self.phase("inject"):
            reply = self.inject()
        with self.phase("observe recovery"):
            self.observe(reply)
        with self.phase("verify"):
            self.events = self.verify()
            self.evidence = self.explain()

    def record(self) -> dict:
        from harness.trial import record

        return record(self, self.events)

    @classmethod
    def failed_record(cls, spec: TrialSpec, trial: "Trial | None", error: str) -> dict:
        from harness.trial import failed

        return failed(spec, trial.phases if trial else [], trial.crash_at if trial else None, error)

    # --- phases ----------------------------------------------------------------------------
    def deploy(self) -> None:
        bed = Testbed(
            kind="run",
            machine_file=self.spec.machine_file,
            network=True,
            keep_logs=self.out / f"logs-{self.spec.id}",
        )
        bed.up()
        self.bed, self.host, self.net = bed, bed.host, bed.net
        wd = bed.workdir
        self.svc = Service(
            mount=str(self.host.mountpoint(0)),
            ip=self.net.service_ip if self.net else "127.0.0.1",
            client_netns=self.net.client_netns() if self.net else None,
            workdir=wd,
            seed=self.spec.seed,
            data_seed=self.spec.data_seed,
        )
        if self.workload.prepares:
            self.prepare_data()
        self.bed.deploy(self.scheme, apps=self.workload.apps(self.svc))
        self.workload.wait_ready(self.svc, self.spec.timing["ready_timeout_s"])

    def prepare_data(self) -> None:
        """The workload's data set: copied from ``data_store`` where an earlier trial of
        the run (or machine of the campaign) left it (harness/prepared.py), else made."""
        if self.data_store is None:
            self.make_data()
            return
        seed = self.svc.dataset_seed if self.data_seed is None else self.data_seed
        self.data_set = prepared.restore(self, self.data_store, seed)

    def make_data(self) -> None:
        """The data set written through a kernel booted only for it and shut down cleanly."""
        self.host.boot(0, mount=self.svc.mount)
        self.workload.prepare(self.svc)
        self.host.stop(0)

    def warm_up(self, until: float) -> None:
        """The load until steady: clients started (running until ``until``), every one
        answered once, ``warmup_s`` of load, then on until the cache is full."""
        self.clients = self.workload.start_clients(self.svc, until)
        self.await_first_answers()
        self.hold(self.spec.timing["warmup_s"])
        self.fill_cache()

    def fill_cache(self) -> None:
        """Hold the load until the active kernel caches the workload's working set
        (``Workload.cache_pages``; at most CACHE_FULL_FRACTION of the partition's frames),
        as its own page-cache counter says, for at most ``cache_timeout_s``. What was
        reached is ``cache_fill``; a cache not full by then is recorded, not an error."""
        want = self.cache_target()
        if not want:
            return
        t0 = time.monotonic()
        deadline = t0 + _cache_timeout(self.spec.timing)
        pages = self.cached_pages()
        while pages < want and time.monotonic() < deadline:
            self.hold(0.2)
            pages = self.cached_pages()
        self.cache_fill = {
            "target_pages": want,
            "pages": pages,
            "full": pages >= want,
            "waited_s": time.monotonic() - t0,
        }
        if pages < want:
            self.say(
                f"{self.spec.id}: the cache held {pages} of {want} pages after "
                f"{self.cache_fill['waited_s']:.0f} s of warm-up"
            )

    def cache_target(self) -> int | None:
        """Pages the warm-up waits for: the working set, at most CACHE_FULL_FRACTION of
        the active partition's frames (None: the workload names no working set)."""
        target = self.workload.cache_pages(self.svc)
        if not target:
            return None
        p = self.host.machine.partition(self.scheme.active)
        return min(
            target, int(CACHE_FULL_FRACTION * partition_layout(p.id, p.base, p.size).nframes)
        )

    def cached_pages(self) -> int:
        """Pages in the active kernel's page cache (its status reply)."""
        return int(self.host.control(self.scheme.active, {"cmd": "status"})["pages"])

    def await_first_answers(self) -> None:
        """Warm-up counts from the moment every client has been answered once: starting
        an interpreter with its libraries takes a while on a loaded machine."""
        t0 = time.monotonic()
        deadline = t0 + self.spec.timing["ready_timeout_s"]
        while not self.clients.all_ok_after(t0 - 1e-6):
            if time.monotonic() > deadline:
                raise DriverError(
                    f"{self.spec.id}: not every client was answered within "
                    f"{self.spec.timing['ready_timeout_s']:.0f} s of starting"
                )
            self.hold(0.02)

    def hold(self, seconds: float) -> None:
        """Let the load run; a client that dies early is an error of the trial."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
            dead = self.clients.failed()
            if dead:
                raise DriverError(f"{self.spec.id}: {dead[0]}; see its log")

    def inject(self) -> dict:
        self.sampler.pause()  # no request to a kernel while it dies and is recovered
        with history.Recorder(self.svc.history_dir() / "nemesis.jsonl", history.NEMESIS) as rec:
            op = rec.invoke(
                "crash",
                value={
                    "fault": self.spec.fault,
                    "partition": self.scheme.active,
                    **self.spec.fault_args,
                },
            )
            self.crash_at = op["time"]
            sent_ns = time.monotonic_ns()
            try:
                reply = self.scheme.inject(self.spec.fault, **self.spec.fault_args)
            except ConnectionError as e:
                reply = self.reply_from_mailbox(sent_ns, e)
            rec.complete("info", op, value={"fault": self.spec.fault, "reply": reply})
        return reply

    def reply_from_mailbox(self, sent_ns: int, e: ConnectionError) -> dict:
        """The inject's reply, lost because the fault killed the kernel before its control
        thread could send it (a request reached the armed site first: on a loaded host the
        window is wide): the kernel put the armed fault in its mailbox before arming it, so
        a fault of this kind armed after the request was sent is this one. A kernel gone
        before that is a harness error, and the mailbox says how it was left."""
        m = self.host.mail(self.scheme.active)
        if m.fault == self.spec.fault and m.injected_ns >= sent_ns:
            return {
                "ok": True,
                "fault": m.fault,
                "target": m.fault_target or None,
                "site": m.fault_site,
                "injected_ns": m.injected_ns,
                "detail": None,
                "reply_lost": str(e),
            }
        raise DriverError(
            f"{self.spec.id}: the kernel was gone before the fault was armed ({e}); "
            + self.kernel_said(m)
        )

    def kernel_said(self, m=None) -> str:
        """The active partition's mailbox in a few words: why its kernel stopped answering
        (a panic's reason, a silence the standby judged a hang), for a harness error."""
        try:
            m = m or self.host.mail(self.scheme.active)
        except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the error itself
            return f"its mailbox could not be read ({e})"
        return f"its mailbox: {m.state_name}, last beat {m.age_s():.2f} s old" + (
            f", {m.reason!r} at {m.site}" if m.reason else ""
        )

    def observe(self, reply: dict) -> None:
        t = self.spec.timing
        try:
            self.report = check_report(self.scheme.on_crash(reply, timeout=t["recovery_timeout_s"]))
        except TimeoutError as e:
            self.say(f"{self.spec.id}: {e}")
            return
        self.nemesis_record()
        self.sampler.resume()
        if self.report.recovered:
            deadline = time.monotonic() + t["recovery_timeout_s"]
            took_effect = max(
                self.crash_at,
                self.report.failed_at,  # as checkers.crash_times
                reply.get("injected_ns", 0) / 1e9,
            )
            while not self.clients.all_ok_after(took_effect) and time.monotonic() < deadline:
                time.sleep(0.01)
            start = self.post_load_from(took_effect)
        else:
            start = time.monotonic()
        # load after recovery: the return to full throughput
        self.hold(max(0.0, start + t["post_s"] - time.monotonic()))
        self.report = check_report(self.scheme.refresh(self.report))  # what that load reused

    def post_load_from(self, took_effect: float) -> float:
        """Where the ``post_s`` seconds of load after a recovery count from: now, once the
        scheme has reported and every client was answered again (a campaign counts from
        the clients' answers themselves: harness/campaign/task.py)."""
        return time.monotonic()

    def nemesis_record(self) -> None:
        """When the fault took effect (the dying kernel's own record, which the injection
        request precedes by a control round trip) and when the scheme says service is back."""
        r = self.report
        with history.Recorder(self.svc.history_dir() / "nemesis.jsonl", history.NEMESIS) as rec:
            rec.write(
                history.event(
                    "info",
                    history.NEMESIS,
                    "activated",
                    time_s=r.failed_at,
                    value={"fault": r.fault, "detected_by": r.detected_by},
                )
            )
            if r.recovered:
                rec.write(
                    history.event(
                        "info",
                        history.NEMESIS,
                        "recovered",
                        time_s=r.service_at,
                        value={"outage_s": r.outage_s},
                    )
                )

    def verify(self) -> list[dict]:
        self.sampler.stop()
        self.clients.stop()
        hd = self.svc.history_dir()
        events = history.merge(sorted(hd.glob("*.jsonl")), self.svc.workdir / "merged.jsonl")
        if self.report is not None and self.report.recovered:
            self.workload.verify(self.svc, events)
        return history.merge(sorted(hd.glob("*.jsonl")), self.out / f"history-{self.spec.id}.jsonl")

    def explain(self) -> dict[str, dict]:
        """The workload's account of each key read back corrupted, taken while the
        recovered machine still serves it (``Workload.explain``); {} when none was."""
        if self.report is None or not self.report.recovered:
            return {}
        try:
            keys = [k["key"] for k in writes(self.events)["keys"] if k["status"] == CORRUPTED]
        except history.HistoryError:
            return {}  # the record names the history's fault
        return self.workload.explain(self.svc, keys, self.events) if keys else {}

    def teardown(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        try:
            if self.clients is not None:
                self.clients.stop()
        finally:
            if self.bed is not None:
                self.bed.down(examine=self.examine)

    def examine(self) -> None:
        """The stopped machine, before its work directory goes: what a subclass checks
        there (a campaign runs fsck on the disk image). Nothing here."""


class _Phase:
    def __init__(self, trial: Trial, name: str):
        self.trial, self.name = trial, name

    def __enter__(self):
        self.start = time.monotonic()
        self.trial.say(f"{self.trial.spec.id}: {self.name}")

    def __exit__(self, exc_type, exc, tb):
        self.trial.phases.append(
            {
                "name": self.name,
                "start": self.start,
                "end": time.monotonic(),
                **({"error": f"{exc_type.__name__}: {exc}"} if exc else {}),
            }
        )


def _cache_timeout(timing: dict) -> float:
    return timing.get("cache_timeout_s", DEFAULTS["cache_timeout_s"])


def _modeled_reboot_s(m) -> float:
    """The longest a scheme may spend in modeled reboot time: the clients outlast it."""
    return 0.0 if m.reboot is None else m.reboot.firmware_s + m.reboot.kernel_boot_s


def warmup_for(workload: str, warmup_s: float | None, default_s: float) -> float:
    """Seconds of load before the steady state: ``warmup_s`` when given, else the
    workload's own (the time its caches take to fill), else ``default_s``."""
    own = workloads()[workload].warmup_s
    return warmup_s if warmup_s is not None else own if own is not None else default_s


def plan(
    schemes_: list[str],
    workload: str,
    fault: str,
    trials: int,
    seed: int,
    timing: dict,
    workload_params: dict,
    machine_file: str | None,
    scheme_options: dict | None = None,
) -> list[TrialSpec]:
    """Trials interleaved across schemes (trial 0 of each, then trial 1, ...), so drift of
    a shared machine hits every scheme alike; trial i has the same seed under every scheme,
    and every trial serves the data set made with the run's ``seed`` (its corpus and which
    files are popular), so the trials repeat one workload and vary only its load."""
    return [
        TrialSpec(
            s,
            workload,
            fault,
            i,
            seed + i,
            dict(timing),
            dict(workload_params),
            machine_file,
            scheme_options=dict(scheme_options or {}),
            data_seed=seed,
        )
        for i in range(trials)
        for s in schemes_
    ]


def sharing_data(store: Path, kind: type[Trial] = Trial) -> type[Trial]:
    """``kind``, its trials taking the run's data set from ``store``: the first makes it
    there, the others copy it (every trial of a run has the same data set: ``plan``)."""
    return type(kind.__name__, (kind,), {"data_store": store})


def run_one(spec: TrialSpec, out: Path, say=lambda msg: None, kind: type[Trial] = Trial) -> dict:
    """A trial's record; an error inside the trial becomes a failed record, not a crash of
    the run (Ctrl-C still stops the run, after the trial's teardown). ``kind``: the Trial
    subclass that runs it (a steady-state trial, a campaign's fault)."""
    trial = None
    try:
        trial = kind(spec, out, say)
        return trial.run()
    except Exception as e:  # noqa: BLE001 - recorded in the trial, named in the run
        return kind.failed_record(spec, trial, f"{type(e).__name__}: {e}")
