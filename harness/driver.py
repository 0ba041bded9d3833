"""The driver: one trial is the same ordered phases for every scheme.

Promises to the CLI and to whoever reads a run: a trial is deploy → warm up → steady state
→ inject → observe recovery → verify → teardown, each phase's start and end recorded on
CLOCK_MONOTONIC; the seed and every parameter are recorded; teardown always runs (also on
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
from systems.base import check_report, registry as schemes

DEFAULTS = {"warmup_s": 2.0, "steady_s": 5.0, "post_s": 5.0, "recovery_timeout_s": 30.0,
            "ready_timeout_s": 30.0, "bin_s": 1.0}


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
    fault_args: dict = field(default_factory=dict)   # where the fault goes: target, site, seed

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
                     + t["recovery_timeout_s"] + t["post_s"] + 10)
            with self.phase("warm up"):
                self.clients = self.workload.start_clients(self.svc, until)
                self.await_first_answers()
                self.hold(t["warmup_s"])
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
            op = rec.invoke("crash", value={"fault": self.spec.fault, "partition": self.scheme.active,
                                            **self.spec.fault_args})
            self.crash_at = op["time"]
            reply = self.scheme.inject(self.spec.fault, **self.spec.fault_args)
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
                    try:
                        self.examine()
                    finally:
                        _keep_logs(self.host.workdir, self.out / f"logs-{self.spec.id}")
                        shutil.rmtree(self.host.workdir, ignore_errors=True)
        if self.host is not None:     # only a machine fully torn down is forgotten
            owners.release(self.host.tag)

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
        self.trial.phases.append({"name": self.name, "start": self.start, "end": time.monotonic(),
                                  **({"error": f"{exc_type.__name__}: {exc}"} if exc else {})})


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


def run_one(spec: TrialSpec, out: Path, say=lambda msg: None, trial_cls: type = Trial) -> dict:
    """A trial's record; an error inside the trial becomes a failed record, not a crash of
    the run (Ctrl-C still stops the run, after the trial's teardown). ``trial_cls``: a
    subclass of Trial that adds to a phase (harness/campaign)."""
    from harness.trial import failed
    trial = None
    try:
        trial = trial_cls(spec, out, say)
        return trial.run()
    except Exception as e:       # noqa: BLE001 - recorded in the trial, named in the run
        phases = trial.phases if trial else []
        crash_at = trial.crash_at if trial else None
        return failed(spec, phases, crash_at, f"{type(e).__name__}: {e}")
