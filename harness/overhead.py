"""The steady-state overhead benchmark: what each scheme costs while nothing fails.

Promises to `crashbench overhead` and to whoever reads its results (format: docs/RESULTS.md,
"overhead.json"; figures: docs/METRICS.md, "Steady state"):

* Every scheme and the ``vanilla`` baseline — a kernel with no scheme machinery at all: no
  heartbeat thread, no backup, no VMM, no watcher — run the same workloads with no crash,
  through the driver's one trial pipeline (``SteadyTrial``, a Trial whose measured phases
  end with the steady state) on the same testbed, with the same warm-up (until the
  workload's cache is full). Runs are interleaved: round r runs every scheme once,
  in an order rotated by r, so drift of a shared machine hits every scheme alike; round r
  uses seed + r under every scheme.
* Per run, the figures come from the history (harness/checkers/steady.py) over the window
  the steady-state phase recorded; per scheme, means over rounds with 95 % intervals from
  harness.stats; the ratio to vanilla is taken per round (same round, same seed) and then
  averaged, so it is paired.
* FS micro-operations (4 KiB write, fsync, create, stat) are timed one by one with
  ``time.perf_counter_ns`` on the real mount of a deployment with no workload.
* The load — the clients, and the loop that times the micro-operations — runs on the
  same CPUs under every scheme: those the active partition does not own (``load_cpus``).
* Around each measured window, CPU time is split by role (harness/cpuuse.py).
* The result directory holds overhead.json (validated before it is written, atomically),
  one pyperf suite per scheme (``<scheme>.pyperf.json``: ``python -m pyperf compare_to
  vanilla.pyperf.json orthros.pyperf.json`` works), the histories, report.md with a table
  and overhead.png; ``results/latest`` points at it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import jsonschema

from harness import cpuuse, driver, history, results, stats
from harness.checkers.steady import END, START, steady
from harness.driver import DEFAULTS, Trial, TrialSpec, warmup_for
from systems.base import RecoveryScheme, Reservation
from systems.base import registry as schemes_registry

SCHEMA_VERSION = 1
KIND = "crashbench overhead"
FILE = "overhead.json"
VANILLA = "vanilla"
DEFAULT_SCHEMES = ("orthros", "warmcache", "reboot")  # `crashbench overhead`'s --schemes default
MICRO = "micro"
MICRO_OPS = ("write-4k", "fsync", "create", "stat")
MICRO_BUDGET_S = 30.0  # each micro loop also stops after this long
STEADY_FAULT = "steady"  # the fault field of a steady run's spec: there is none
LATENCY_KEYS = ("p50", "p95", "p99")


class Vanilla(RecoveryScheme):
    """No scheme: a kernel without heartbeat (kernel.core.kernel --no-heartbeat), no watcher."""

    name = VANILLA

    def deploy(self, host, apps=()) -> None:
        self.host = host
        host.boot(0, apps=list(apps), extra=("--no-heartbeat",))

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0):
        raise NotImplementedError("vanilla: no scheme, so nothing detects or recovers a crash")

    @classmethod
    def reservation(cls, machine) -> Reservation:
        return Reservation(what="nothing")


class SteadyTrial(Trial):
    """Deploy → warm up → steady state → collect → teardown; no fault."""

    def make_scheme(self, name: str):
        return Vanilla() if name == VANILLA else super().make_scheme(name)

    def __init__(self, spec: TrialSpec, out: Path, say=lambda msg: None):
        super().__init__(spec, out, say)
        self.figures: dict = {}
        self.reserved_bytes: int | None = None
        self.cpu: dict[str, float] | None = None  # cores per role in the measured window

    def deploy(self) -> None:
        super().deploy()
        self.reserved_bytes = self.scheme.reserved_bytes()

    def measure(self) -> None:
        with on_load_cpus(self.host.machine, self.scheme.active):
            self.measure_load()

    def measure_load(self) -> None:
        t = self.spec.timing
        until = (
            time.monotonic()
            + t["ready_timeout_s"]
            + t["warmup_s"]
            + t["steady_s"]
            + t.get("cache_timeout_s", DEFAULTS["cache_timeout_s"])
            + 10
        )
        with self.phase("warm up"):
            self.warm_up(until)
        with self.phase("steady state"), self.cpu_window(self.clients.procs):
            start = time.monotonic()
            self.hold(t["steady_s"])
            end = time.monotonic()
        with self.phase("collect"):
            self.clients.stop()
            hd = self.svc.history_dir()
            with history.Recorder(hd / "nemesis.jsonl", history.NEMESIS) as rec:
                rec.write(history.event("info", history.NEMESIS, START, time_s=start))
                rec.write(history.event("info", history.NEMESIS, END, time_s=end))
            events = history.merge(
                sorted(hd.glob("*.jsonl")), self.out / f"history-{run_id(self.spec)}.jsonl"
            )
            self.figures = steady(events)

    @contextmanager
    def cpu_window(self, clients):
        """``self.cpu``: the cores each role kept busy while the block ran."""
        rs = cpuuse.roles(self.host, self.scheme.active, [p.pid for p in clients])
        vr = self.scheme.vmm_region()
        before, t0 = cpuuse.sample(rs, vr), time.monotonic()
        yield
        t1 = time.monotonic()
        self.cpu = cpuuse.cores(before, cpuuse.sample(rs, vr), t1 - t0)

    def record(self) -> dict:
        s = self.spec
        return {
            "id": run_id(s),
            "scheme": s.scheme,
            "workload": _workload(s),
            "round": s.trial,
            "seed": s.seed,
            "phases": self.phases,
            "figures": self.figures,
            "reserved_bytes": self.reserved_bytes,
            "cpu_cores": self.cpu,
            "cache_fill": self.cache_fill,
            "error": None,
        }

    @classmethod
    def failed_record(cls, spec: TrialSpec, trial: Trial | None, error: str) -> dict:
        return {
            "id": run_id(spec),
            "scheme": spec.scheme,
            "workload": _workload(spec),
            "round": spec.trial,
            "seed": spec.seed,
            "phases": trial.phases if trial else [],
            "figures": {},
            "reserved_bytes": None,
            "cpu_cores": None,
            "error": error,
        }


def load_cpus(machine, active: int) -> set[int]:
    """The CPUs the load runs on: those this process may use that the active partition
    does not own (all of them when it owns every one)."""
    mine = os.sched_getaffinity(0)
    return (mine - set(machine.partition(active).cpus)) or mine


@contextmanager
def on_load_cpus(machine, active: int):
    """The calling thread, and the clients it starts, on ``load_cpus``: the same CPUs
    under every scheme. Left to the scheduler, a client or the micro-operations' timing
    loop lands beside the pinned kernel more often under one scheme than another (a 4 KiB
    write then costs ≈ 35 µs more), and that placement moved the figures by more than
    the schemes did. Under orthros the load shares its CPUs with the standby: that is
    what the standby costs on this machine."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, load_cpus(machine, active))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


class MicroTrial(SteadyTrial):
    """Deploy with no workload, then time FS micro-operations on the mount."""

    def measure_load(self) -> None:
        with self.phase("micro"), self.cpu_window([]):
            self.figures = micro_ops(Path(self.svc.mount), self.spec.timing["micro_ops"])


def micro_ops(mount: Path, n: int, budget_s: float = MICRO_BUDGET_S) -> dict[str, list[float]]:
    """Seconds each operation took, per kind, in order: ``write-4k`` (pwrite of 4 KiB at the
    next 4 KiB offset of one open file), ``fsync`` (fsync of a file after an untimed 4 KiB
    write), ``create`` (open O_CREAT|O_EXCL of a new name + close), ``stat`` (os.stat of a
    file created earlier, after the host's attribute and entry caches expired, so each one
    reaches the kernel). At most ``n`` of each, each loop at most ``budget_s`` seconds."""
    from kernel.core.fuse import TIMEOUT_S

    d = mount / "micro"
    d.mkdir()
    buf = os.urandom(4096)
    out: dict[str, list[float]] = {k: [] for k in MICRO_OPS}
    clock = time.perf_counter_ns

    def loop(kind: str, op) -> None:
        deadline = time.monotonic() + budget_s
        for i in range(n):
            if time.monotonic() > deadline:
                break
            t0 = clock()
            op(i)
            out[kind].append((clock() - t0) / 1e9)

    fd = os.open(d / "w", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        loop("write-4k", lambda i: os.pwrite(fd, buf, i * 4096))
    finally:
        os.close(fd)
    fd = os.open(d / "s", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        deadline = time.monotonic() + budget_s
        for i in range(n):
            if time.monotonic() > deadline:
                break
            os.pwrite(fd, buf, i * 4096)
            t0 = clock()
            os.fsync(fd)
            out["fsync"].append((clock() - t0) / 1e9)
    finally:
        os.close(fd)

    def create(i: int) -> None:
        os.close(os.open(d / f"c{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))

    loop("create", create)
    created = len(out["create"])
    time.sleep(TIMEOUT_S + 0.2)  # the host forgets what it learnt of those names
    if created:
        loop("stat", lambda i: os.stat(d / f"c{i % created}"))
    return out


# --- the plan and the run ------------------------------------------------------------------


def _workload(spec: TrialSpec) -> str:
    return MICRO if spec.fault == MICRO else spec.workload


def run_id(spec: TrialSpec) -> str:
    """``<scheme>-<workload>-<round>``; ``<scheme>-micro-<round>`` for the micro-operations."""
    return f"{spec.scheme}-{_workload(spec)}-{spec.trial}"


def rotated(names: list[str], r: int) -> list[str]:
    k = r % len(names)
    return names[k:] + names[:k]


def warmups(workloads: list[str], warmup_s: float | None, default_s: float) -> dict[str, float]:
    """Seconds of load before each workload's steady state: ``warmup_s`` when given, else
    the workload's own (the time its caches take to fill), else ``default_s``."""
    return {w: warmup_for(w, warmup_s, default_s) for w in workloads}


def plan(
    schemes: list[str],
    workloads: list[str],
    rounds: int,
    seed: int,
    timing: dict,
    workload_params: dict[str, dict],
    micro_n: int,
    machine_file: str | None,
    warmup_s: dict[str, float] | None = None,
) -> list[TrialSpec]:
    """Round by round; in round r the schemes (vanilla first in round 0) rotated by r;
    under each scheme every workload (with its warm-up from ``warmup_s``, else timing's),
    then the micro-operations (when micro_n > 0)."""
    names = [VANILLA, *schemes]
    warm = warmup_s or {}
    specs = []
    for r in range(rounds):
        for s in rotated(names, r):
            for w in workloads:
                t = {**timing, "warmup_s": warm[w]} if w in warm else dict(timing)
                specs.append(
                    TrialSpec(
                        s,
                        w,
                        STEADY_FAULT,
                        r,
                        seed + r,
                        t,
                        dict(workload_params.get(w, {})),
                        machine_file,
                    )
                )
            if micro_n > 0:
                specs.append(
                    TrialSpec(
                        s,
                        "idle",
                        MICRO,
                        r,
                        seed + r,
                        {**timing, "micro_ops": micro_n},
                        {},
                        machine_file,
                    )
                )
    return specs


def run_one(spec: TrialSpec, out: Path, say=lambda msg: None) -> dict:
    """A run's record, through the driver's one trial pipeline; an error becomes a record
    with ``error`` set, not a crash of the benchmark (Ctrl-C still stops it, after the
    run's teardown)."""
    return driver.run_one(spec, out, say, kind=MicroTrial if spec.fault == MICRO else SteadyTrial)


# --- figures --------------------------------------------------------------------------------


def ci(values: list[float]) -> dict:
    m, lo, hi = stats.mean_ci(values)
    return {"mean": m, "lo": lo, "hi": hi, "n": len(values)}


def _median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(xs))


def per_round(runs: list[dict]) -> dict:
    """{(scheme, workload): {round: figures}} of the runs that did not fail; micro runs
    under workload MICRO, their figures {op: median seconds of the round}."""
    out: dict = {}
    for r in runs:
        if r.get("error"):
            continue
        if r["workload"] == MICRO:
            figs = {op: _median(v) for op, v in r["figures"].items() if v}
            key = (r["scheme"], MICRO)
        else:
            f = r["figures"]
            if not f.get("ok_ops"):
                continue
            figs = {
                "throughput_ops_s": f["throughput_ops_s"],
                **{f"latency_{k}_s": f["latency_s"][k] for k in LATENCY_KEYS},
            }
            key = (r["scheme"], r["workload"])
        if r.get("cpu_cores"):
            figs["cpu"] = r["cpu_cores"]
        out.setdefault(key, {})[r["round"]] = figs
    return out


def cpu_figures(rounds: dict) -> dict:
    """{"cpu_cores": {role: ci}, "machinery_share_pct": ci} over the rounds that measured
    CPU: cores per role, and the share of the active partition's CPU time that the
    scheme's machinery took there ((heartbeat + vmm) / (kernel + heartbeat + vmm + apps),
    in percent)."""
    cpus = [f["cpu"] for f in rounds.values() if "cpu" in f]
    share = [
        100 * sum(c[r] for r in cpuuse.ON_ACTIVE) / active
        for c in cpus
        if (active := sum(c[r] for r in cpuuse.ACTIVE)) > 0
    ]
    return {
        "cpu_cores": {r: ci([c[r] for c in cpus]) for r in cpuuse.ROLES},
        "machinery_share_pct": ci(share),
    }


LOWER_IS_BETTER = {"throughput_ops_s": False}


def figures(runs: list[dict], schemes: list[str], workloads: list[str]) -> dict:
    """{"workloads": {w: {scheme: {"rounds", "<figure>": ci, "ratio_to_vanilla":
    {"<figure>": ci}, "overhead_pct": ci}}}, "micro": {op: {scheme: {"rounds",
    "median_s": ci, "ratio_to_vanilla": ci, "overhead_pct": ci}}}}.

    Ratios are scheme / vanilla of the same round. overhead_pct is the cost in percent:
    (1 − throughput ratio)·100 for a workload, (time ratio − 1)·100 for a micro-op. Each
    workload's entry also has ``cpu_figures`` of its rounds; "micro_cpu" has them per
    scheme for the micro-operation runs."""
    pr = per_round(runs)
    names = [VANILLA, *schemes]
    out: dict = {"workloads": {}, "micro": {}}
    for w in workloads:
        base = pr.get((VANILLA, w), {})
        per: dict = {}
        for s in names:
            rounds = pr.get((s, w), {})
            keys = ["throughput_ops_s", *(f"latency_{k}_s" for k in LATENCY_KEYS)]
            entry = {"rounds": len(rounds)}
            for k in keys:
                entry[k] = ci([f[k] for f in rounds.values()])
            paired = [r for r in sorted(rounds) if r in base]
            entry["ratio_to_vanilla"] = {
                k: ci([rounds[r][k] / base[r][k] for r in paired if base[r][k]]) for k in keys
            }
            entry["overhead_pct"] = ci(
                [
                    (1 - rounds[r]["throughput_ops_s"] / base[r]["throughput_ops_s"]) * 100
                    for r in paired
                ]
            )
            per[s] = entry | cpu_figures(rounds)
        out["workloads"][w] = per
    base = pr.get((VANILLA, MICRO), {})
    for op in MICRO_OPS:
        per = {}
        for s in names:
            rounds = {r: f[op] for r, f in pr.get((s, MICRO), {}).items() if op in f}
            paired = [r for r in sorted(rounds) if op in base.get(r, {})]
            if not rounds:
                continue
            per[s] = {
                "rounds": len(rounds),
                "median_s": ci(list(rounds.values())),
                "ratio_to_vanilla": ci([rounds[r] / base[r][op] for r in paired]),
                "overhead_pct": ci([(rounds[r] / base[r][op] - 1) * 100 for r in paired]),
            }
        if per:
            out["micro"][op] = per
    out["micro_cpu"] = {s: cpu_figures(pr[(s, MICRO)]) for s in names if (s, MICRO) in pr}
    return out


def resources(machine, schemes: list[str], runs: list[dict]) -> dict:
    """What each scheme keeps from the workload: its declared ``reservation`` on this
    machine (e.g. a standby's partitions, their cores and memory); memory it measures per
    deploy (a VMM's region; the VMM runs on the kernel's own core) is the largest its
    runs measured."""
    reg = {VANILLA: Vanilla, **schemes_registry()}
    out = {}
    for s in [VANILLA, *schemes]:
        res = reg[s].reservation(machine)
        memory = res.memory_bytes
        if memory is None:
            sizes = [
                r["reserved_bytes"] for r in runs if r["scheme"] == s and r.get("reserved_bytes")
            ]
            memory = max(sizes) if sizes else None
        out[s] = {
            "cores": res.cores,
            "cpus": list(res.cpus),
            "memory_bytes": memory,
            "what": res.what,
        }
    return out


# --- overhead.json --------------------------------------------------------------------------

_CI = {
    "type": "object",
    "required": ["mean", "lo", "hi", "n"],
    "properties": {k: {"type": ["number", "null"]} for k in ("mean", "lo", "hi")}
    | {"n": {"type": "integer", "minimum": 0}},
}

# CPU by role (harness/cpuuse.py); optional: files written before it was measured lack it.
_CPU = {
    "cpu_cores": {"type": "object", "required": list(cpuuse.ROLES), "additionalProperties": _CI},
    "machinery_share_pct": _CI,
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "crashbench overhead.json, schema_version 1",
    "type": "object",
    "required": [
        "schema_version",
        "kind",
        "run_id",
        "created",
        "parameters",
        "environment",
        "resources",
        "runs",
        "figures",
        "pyperf",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"const": KIND},
        "run_id": {"type": "string", "pattern": r"^[^/\\]+$"},
        "created": {"type": "string"},
        "parameters": {
            "type": "object",
            "required": ["schemes", "workloads", "rounds", "seed", "timing", "micro_ops"],
        },
        "environment": {"type": "object", "required": ["python", "crashbench"]},
        "resources": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["cores", "memory_bytes"],
                "properties": {
                    "cores": {"type": "integer", "minimum": 0},
                    "memory_bytes": {"type": ["integer", "null"], "minimum": 0},
                },
            },
        },
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "id",
                    "scheme",
                    "workload",
                    "round",
                    "seed",
                    "phases",
                    "figures",
                    "error",
                ],
                "properties": {
                    "round": {"type": "integer", "minimum": 0},
                    "error": {"type": ["string", "null"]},
                    "cpu_cores": {
                        "type": ["object", "null"],
                        "additionalProperties": {"type": "number", "minimum": 0},
                    },
                },
            },
        },
        "figures": {
            "type": "object",
            "required": ["workloads", "micro"],
            "properties": {
                "workloads": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": [
                                "rounds",
                                "throughput_ops_s",
                                "latency_p50_s",
                                "latency_p95_s",
                                "latency_p99_s",
                                "ratio_to_vanilla",
                                "overhead_pct",
                            ],
                            "properties": {
                                "throughput_ops_s": _CI,
                                "latency_p50_s": _CI,
                                "latency_p95_s": _CI,
                                "latency_p99_s": _CI,
                                "overhead_pct": _CI,
                            }
                            | _CPU,
                        },
                    },
                },
                "micro": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": {
                            "type": "object",
                            "required": ["rounds", "median_s", "ratio_to_vanilla", "overhead_pct"],
                            "properties": {
                                "median_s": _CI,
                                "ratio_to_vanilla": _CI,
                                "overhead_pct": _CI,
                            },
                        },
                    },
                },
                "micro_cpu": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": list(_CPU),
                        "properties": _CPU,
                    },
                },
            },
        },
        "pyperf": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def validate(doc: dict) -> None:
    errors = sorted(
        jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "overhead.json"
        raise results.ResultsError(f"{where}: {e.message}")


def load(dir: str | Path) -> dict:
    p = Path(dir)
    f = p / FILE if p.is_dir() else p
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise results.ResultsError(f"{f}: {e}") from None
    validate(doc)
    return doc


def write(d: Path, parameters: dict, environment: dict, machine, runs: list[dict]) -> dict:
    """Figures, pyperf suites, overhead.json (validated, atomic); returns the document."""
    schemes, workloads = parameters["schemes"], parameters["workloads"]
    suites = write_pyperf(d, [VANILLA, *schemes], runs)
    slim = [{k: v for k, v in r.items()} | {"figures": _slim(r)} for r in runs]
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "run_id": d.name,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "parameters": parameters,
        "environment": environment,
        "resources": resources(machine, schemes, runs),
        "runs": slim,
        "figures": figures(runs, schemes, workloads),
        "pyperf": {s: p.name for s, p in suites.items()},
    }
    validate(doc)
    results.write_atomic(d / FILE, json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def _slim(r: dict) -> dict:
    """A run's figures without the raw samples (those are in the history and in pyperf)."""
    f = r.get("figures") or {}
    if r["workload"] == MICRO:
        return {op: {"n": len(v), "median_s": _median(v) if v else None} for op, v in f.items()}
    return {k: v for k, v in f.items() if k != "latencies_s"}


def write_pyperf(d: Path, names: list[str], runs: list[dict]) -> dict[str, Path]:
    """``<scheme>.pyperf.json`` per scheme: benchmarks ``<workload>-time-per-op`` (seconds
    per ok operation of the aggregate load = 1 / throughput, one value per round),
    ``<workload>-latency-p50|p95|p99`` (one value per round) and ``micro-<op>`` (every
    timed operation, one pyperf run per round). Same names in every suite, so compare_to
    pairs them."""
    import pyperf

    written = {}
    for s in names:
        benches: dict[str, list] = {}
        for r in sorted(
            (r for r in runs if r["scheme"] == s and not r.get("error")), key=lambda r: r["round"]
        ):
            f = r["figures"]
            if r["workload"] == MICRO:
                for op, v in f.items():
                    if v and all(x > 0 for x in v):
                        benches.setdefault(f"micro-{op}", []).append(
                            _run(f"micro-{op}", v, f"{op} through the mount, round {r['round']}")
                        )
                continue
            if not f.get("ok_ops"):
                continue
            w = r["workload"]
            benches.setdefault(f"{w}-time-per-op", []).append(
                _run(
                    f"{w}-time-per-op",
                    [1 / f["throughput_ops_s"]],
                    f"seconds per ok operation, round {r['round']}",
                )
            )
            for k in LATENCY_KEYS:
                v = f["latency_s"][k]
                if v and v > 0:
                    benches.setdefault(f"{w}-latency-{k}", []).append(
                        _run(f"{w}-latency-{k}", [v], f"{k} latency, round {r['round']}")
                    )
        if not benches:
            continue
        path = d / f"{s}.pyperf.json"
        suite = pyperf.BenchmarkSuite([pyperf.Benchmark(rs) for rs in benches.values()])
        written[s] = results.dump_pyperf(path, suite)
    return written


def _run(name: str, values: list[float], description: str):
    import pyperf

    meta = {"name": name, "unit": "second", "loops": 1, "description": description}
    return pyperf.Run([float(v) for v in values], metadata=meta, collect_metadata=False)
