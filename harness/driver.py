"""The driver: one trial is the same ordered phases for every scheme.

Promises to the CLI and to whoever reads a run: a trial is deploy → warm up → steady state
→ inject → observe recovery → verify → teardown, each phase's start and end recorded on
CLOCK_MONOTONIC; the warm-up goes on until the active kernel's page cache holds the
workload's working set (its own counter, bounded in time: ``cache_fill``), and the
scheme's report is refreshed after the load that follows recovery (pages reused then); the seed and every parameter are recorded; teardown always runs (also on
an error or Ctrl-C), leaving no kernel, mount, namespace or client process behind; each
trial's machine is recorded in harness/owners.py from before it exists until its teardown
has succeeded, so what a killed run leaves is found by the next command. The
driver measures nothing itself beyond phase boundaries: figures come from the clients'
history (harness/checkers) and the scheme's RecoveryReport. Waiting through warm-up and
steady state is load running, not a stand-in for a result.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import history, owners
from harness.workloads import Service, registry as workloads
from kernel import machine as machine_mod
from kernel.host import Host
from kernel.physmem import partition_layout
from systems.base import check_report, registry as schemes

DEFAULTS = {"warmup_s": 2.0, "steady_s": 5.0, "post_s": 5.0, "recovery_timeout_s": 30.0,
            "ready_timeout_s": 30.0, "bin_s": 1.0, "cache_timeout_s": 120.0}
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

    @property
    def id(self) -> str:
        return f"{self.scheme}-{self.workload}-{self.fault}-{self.trial}"


class Trial:
    """One trial's state: the phases run in order by ``run``."""

    def __init__(self, spec: TrialSpec, out: Path, say=lambda msg: None):
        self.spec, self.out, self.say = spec, out, say
        self.phases: list[dict] = []
        self.workload = workloads()[spec.workload](**spec.workload_params)
        self.scheme = self.make_scheme(spec.scheme)
        self.host = self.net = self.svc = self.clients = self.report = None
        self.crash_at: float | None = None
        self.cache_fill: dict | None = None

    def make_scheme(self, name: str):
        return schemes()[name]()

    def phase(self, name: str):
        return _Phase(self, name)

    def run(self) -> dict:
        t = self.spec.timing
        try:
            with self.phase("deploy"):
                self.deploy()
            until = (time.monotonic() + t["ready_timeout_s"] + t["warmup_s"] + t["steady_s"]
                     + _cache_timeout(t) + t["recovery_timeout_s"] + t["post_s"]
                     + _modeled_reboot_s(self.host.machine) + 10)
            with self.phase("warm up"):
                self.warm_up(until)
            with self.phase("steady state"):
                self.hold(t["steady_s"])
            with self.phase("inject"):
                reply = self.inject()
            with self.phase("observe recovery"):
                self.observe(reply)
            with self.phase("verify"):
                events = self.verify()
        finally:
            with self.phase("teardown"):
                self.teardown()
        from harness.trial import record
        return record(self, events)

    # --- phases ----------------------------------------------------------------------------
    def deploy(self) -> None:
        wd = Path(tempfile.mkdtemp(prefix="crashbench-trial-"))
        os.chmod(wd, 0o755)       # servers on the mount may run as other users
        m = machine_mod.load(self.spec.machine_file)
        self.host = Host(wd, m, machine_file=self.spec.machine_file)
        owners.claim("run", wd, self.host.tag, self.host.physmem, workdir_made=True)
        self.host.create_memory()
        self.host.format_disks()
        self.net = _network_up(self.host)
        self.svc = Service(mount=str(self.host.mountpoint(0)),
                           ip=self.net.service_ip if self.net else "127.0.0.1",
                           client_netns=self.net.client_netns() if self.net else None,
                           workdir=wd, seed=self.spec.seed)
        if self.workload.prepares:
            self.host.boot(0, mount=self.svc.mount)
            self.workload.prepare(self.svc)
            self.host.stop(0)
        self.scheme.deploy(self.host, apps=self.workload.apps(self.svc))
        self.workload.wait_ready(self.svc, self.spec.timing["ready_timeout_s"])

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
        target = self.workload.cache_pages(self.svc)
        if not target:
            return
        p = self.host.machine.partition(self.scheme.active)
        frames = partition_layout(p.id, p.base, p.size).nframes
        want = min(target, int(CACHE_FULL_FRACTION * frames))
        t0 = time.monotonic()
        deadline = t0 + _cache_timeout(self.spec.timing)
        pages = self.cached_pages()
        while pages < want and time.monotonic() < deadline:
            self.hold(0.2)
            pages = self.cached_pages()
        self.cache_fill = {"target_pages": want, "pages": pages, "full": pages >= want,
                           "waited_s": time.monotonic() - t0}
        if pages < want:
            self.say(f"{self.spec.id}: the cache held {pages} of {want} pages after "
                     f"{self.cache_fill['waited_s']:.0f} s of warm-up")

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
                raise DriverError(f"{self.spec.id}: not every client was answered within "
                                  f"{self.spec.timing['ready_timeout_s']:.0f} s of starting")
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
        with history.Recorder(self.svc.history_dir() / "nemesis.jsonl", history.NEMESIS) as rec:
            op = rec.invoke("crash", value={"fault": self.spec.fault, "partition": self.scheme.active})
            self.crash_at = op["time"]
            reply = self.scheme.inject(self.spec.fault)
            rec.complete("info", op, value={"fault": self.spec.fault, "reply": reply})
        return reply

    def observe(self, reply: dict) -> None:
        t = self.spec.timing
        try:
            self.report = check_report(self.scheme.on_crash(reply, timeout=t["recovery_timeout_s"]))
        except TimeoutError as e:
            self.say(f"{self.spec.id}: {e}")
            return
        self.nemesis_record()
        if self.report.recovered:
            deadline = time.monotonic() + t["recovery_timeout_s"]
            took_effect = max(self.crash_at, self.report.failed_at,   # as checkers.crash_times
                              reply.get("injected_ns", 0) / 1e9)
            while not self.clients.all_ok_after(took_effect) and time.monotonic() < deadline:
                time.sleep(0.01)
        self.hold(t["post_s"])      # load after recovery: the return to full throughput
        self.report = check_report(self.scheme.refresh(self.report))   # what that load reused

    def nemesis_record(self) -> None:
        """When the fault took effect (the dying kernel's own record, which the injection
        request precedes by a control round trip) and when the scheme says service is back."""
        r = self.report
        with history.Recorder(self.svc.history_dir() / "nemesis.jsonl", history.NEMESIS) as rec:
            rec.write(history.event("info", history.NEMESIS, "activated", time_s=r.failed_at,
                                    value={"fault": r.fault, "detected_by": r.detected_by}))
            if r.recovered:
                rec.write(history.event("info", history.NEMESIS, "recovered", time_s=r.service_at,
                                        value={"outage_s": r.outage_s}))

    def verify(self) -> list[dict]:
        self.clients.stop()
        hd = self.svc.history_dir()
        events = history.merge(sorted(hd.glob("*.jsonl")), self.svc.workdir / "merged.jsonl")
        if self.report is not None and self.report.recovered:
            self.workload.verify(self.svc, events)
        return history.merge(sorted(hd.glob("*.jsonl")), self.out / f"history-{self.spec.id}.jsonl")

    def teardown(self) -> None:
        try:
            if self.clients is not None:
                self.clients.stop()
        finally:
            try:
                if self.host is not None:   # a scheme not (fully) deployed leaves the host to us
                    self.scheme.teardown() if self.scheme.host is not None else self.host.close()
            finally:
                if self.net is not None:
                    self.net.down()
                if self.host is not None:
                    _keep_logs(self.host.workdir, self.out / f"logs-{self.spec.id}")
                    shutil.rmtree(self.host.workdir, ignore_errors=True)
        if self.host is not None:     # only a machine fully torn down is forgotten
            owners.release(self.host.tag)


class _Phase:
    def __init__(self, trial: Trial, name: str):
        self.trial, self.name = trial, name

    def __enter__(self):
        self.start = time.monotonic()
        self.trial.say(f"{self.trial.spec.id}: {self.name}")

    def __exit__(self, exc_type, exc, tb):
        self.trial.phases.append({"name": self.name, "start": self.start, "end": time.monotonic(),
                                  **({"error": f"{exc_type.__name__}: {exc}"} if exc else {})})


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


def _network_up(host: Host):
    from kernel.net import Network
    m = host.machine
    if not m.nics:
        return None
    net = Network(host.tag, m.nics[0], [p.id for p in m.partitions])
    net.up(next((p.id for p in m.partitions if m.nics[0].name in p.devices), 0))
    host.net = net
    return net


def _keep_logs(workdir: Path, dest: Path) -> None:
    """The kernels', the server's and the clients' logs outlive the trial's scratch dir."""
    src = workdir / "logs"
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)


def plan(schemes_: list[str], workload: str, fault: str, trials: int, seed: int,
         timing: dict, workload_params: dict, machine_file: str | None) -> list[TrialSpec]:
    """Trials interleaved across schemes (trial 0 of each, then trial 1, ...), so drift of
    a shared machine hits every scheme alike; trial i has the same seed under every scheme."""
    return [TrialSpec(s, workload, fault, i, seed + i, dict(timing), dict(workload_params),
                      machine_file)
            for i in range(trials) for s in schemes_]


def run_one(spec: TrialSpec, out: Path, say=lambda msg: None) -> dict:
    """A trial's record; an error inside the trial becomes a failed record, not a crash of
    the run (Ctrl-C still stops the run, after the trial's teardown)."""
    from harness.trial import failed
    trial = None
    try:
        trial = Trial(spec, out, say)
        return trial.run()
    except Exception as e:       # noqa: BLE001 - recorded in the trial, named in the run
        phases = trial.phases if trial else []
        crash_at = trial.crash_at if trial else None
        return failed(spec, phases, crash_at, f"{type(e).__name__}: {e}")
