"""`crashbench overhead`: the steady-state checker, the paired figures, vanilla's kernel,
one tiny end-to-end run through the CLI, and bad input refused. No timing goals here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import history
from harness.checkers.steady import steady, window


def op(process, f, t0, t1, type_="ok"):
    return [
        history.event("invoke", process, f, time_s=t0),
        history.event(type_, process, f, time_s=t1),
    ]


def hand_made() -> list[dict]:
    """Window [10, 20): five ok operations complete inside it with latencies 0.1 … 0.5 s,
    one ok completes before it, one after; one fail and one info inside."""
    ev = []
    for i, lat in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):
        ev += op(i % 2, "write" if i % 2 else "read", 12.0 + i - lat, 12.0 + i)
    ev += op(0, "read", 9.0, 9.5)  # before the window
    ev += op(1, "read", 19.9, 20.0)  # completes at its end: outside [10, 20)
    ev += op(2, "write", 13.0, 13.1, "fail")
    ev += op(3, "write", 14.0, 16.0, "info")
    ev += op(history.NEMESIS, "crash", 11.0, 11.0, "info")  # not load
    ev.append(history.event("info", history.NEMESIS, "steady-start", time_s=10.0))
    ev.append(history.event("info", history.NEMESIS, "steady-end", time_s=20.0))
    return sorted(ev, key=lambda e: e["time"])


def test_steady_throughput_and_percentiles_are_exact():
    s = steady(hand_made())
    assert (s["start"], s["end"], s["duration_s"]) == (10.0, 20.0, 10.0)
    assert s["ok_ops"] == 5 and s["failed_ops"] == 1 and s["info_ops"] == 1
    assert s["throughput_ops_s"] == pytest.approx(0.5)
    lat = s["latency_s"]
    # type-7 interpolation over 0.1 … 0.5: p50 = 0.3, p95 = 0.48, p99 = 0.496
    assert lat["p50"] == pytest.approx(0.3)
    assert lat["p95"] == pytest.approx(0.48)
    assert lat["p99"] == pytest.approx(0.496)
    assert lat["mean"] == pytest.approx(0.3) and lat["max"] == pytest.approx(0.5)
    assert s["latencies_s"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_steady_window_given_overrides_and_an_empty_window_has_no_latency():
    ev = hand_made()
    assert window(ev) == (10.0, 20.0)
    s = steady(ev, 11.5, 12.5)  # only the op completing at 12.0
    assert s["ok_ops"] == 1 and s["throughput_ops_s"] == pytest.approx(1.0)
    assert s["latency_s"]["p50"] == pytest.approx(0.1)
    empty = steady(ev, 100.0, 101.0)
    assert empty["ok_ops"] == 0 and empty["throughput_ops_s"] == 0
    assert empty["latency_s"]["p99"] is None


def test_steady_refuses_a_history_without_a_window():
    ev = [e for e in hand_made() if not e["f"].startswith("steady")]
    with pytest.raises(ValueError, match="window"):
        steady(ev)
    with pytest.raises(ValueError, match="empty"):
        steady(ev, 5.0, 5.0)


def _run(scheme, rnd, thr, p50, micro=None):
    if micro is not None:
        return {
            "id": f"{scheme}-micro-{rnd}",
            "scheme": scheme,
            "workload": "micro",
            "round": rnd,
            "seed": 1 + rnd,
            "phases": [],
            "figures": micro,
            "error": None,
        }
    return {
        "id": f"{scheme}-files-{rnd}",
        "scheme": scheme,
        "workload": "files",
        "round": rnd,
        "seed": 1 + rnd,
        "phases": [],
        "error": None,
        "figures": {
            "ok_ops": 10,
            "throughput_ops_s": thr,
            "latency_s": {"p50": p50, "p95": 2 * p50, "p99": 3 * p50},
        },
    }


def test_figures_pair_rounds_with_vanilla():
    from harness import overhead

    runs = [
        _run("vanilla", 0, 100.0, 0.010),
        _run("orthros", 0, 99.0, 0.011),
        _run("vanilla", 1, 50.0, 0.020),
        _run("orthros", 1, 48.0, 0.020),
        _run("vanilla", 0, 0, 0, micro={"stat": [1e-4, 2e-4, 3e-4]}),
        _run("orthros", 0, 0, 0, micro={"stat": [3e-4, 4e-4, 5e-4]}),
    ]
    runs.append({**_run("orthros", 2, 1.0, 1.0), "error": "DriverError: x"})  # ignored
    f = overhead.figures(runs, ["orthros"], ["files"])
    o = f["workloads"]["files"]["orthros"]
    assert o["rounds"] == 2
    assert o["throughput_ops_s"]["mean"] == pytest.approx(73.5)
    assert o["ratio_to_vanilla"]["throughput_ops_s"]["mean"] == pytest.approx((0.99 + 0.96) / 2)
    assert o["overhead_pct"]["mean"] == pytest.approx((1 + 4) / 2)
    assert o["overhead_pct"]["lo"] is None  # 2 rounds: no honest 95 % interval
    assert f["workloads"]["files"]["vanilla"]["overhead_pct"]["mean"] == 0
    m = f["micro"]["stat"]["orthros"]
    assert m["median_s"]["mean"] == pytest.approx(4e-4)
    assert m["ratio_to_vanilla"]["mean"] == pytest.approx(2.0)
    assert m["overhead_pct"]["mean"] == pytest.approx(100.0)


def test_plan_interleaves_and_rotates():
    from harness import overhead

    specs = overhead.plan(["orthros", "reboot"], ["files"], 3, 7, {}, {}, 5, None)
    order = [(overhead.run_id(s)) for s in specs]
    assert order[:6] == [
        "vanilla-files-0",
        "vanilla-micro-0",
        "orthros-files-0",
        "orthros-micro-0",
        "reboot-files-0",
        "reboot-micro-0",
    ]
    assert [overhead.run_id(s) for s in specs[6:12:2]] == [
        "orthros-files-1",
        "reboot-files-1",
        "vanilla-files-1",
    ]
    assert {s.seed for s in specs if s.trial == 2} == {9}


def test_each_workload_warms_up_for_its_own_time_unless_one_is_given():
    """postgres fills its page cache from the disk first: its own warm-up; files has none
    of its own and gets the default; --warmup overrides every workload's."""
    from harness import overhead
    from harness.workloads.postgres import Postgres

    assert overhead.warmups(["files", "postgres"], None, 2.0) == {
        "files": 2.0,
        "postgres": Postgres.warmup_s,
    }
    assert overhead.warmups(["files", "postgres"], 0.5, 2.0) == {"files": 0.5, "postgres": 0.5}
    specs = overhead.plan(
        ["reboot"],
        ["files", "postgres"],
        1,
        1,
        {"warmup_s": 2.0},
        {},
        5,
        None,
        {"files": 2.0, "postgres": 15.0},
    )
    assert [(s.workload, s.timing["warmup_s"]) for s in specs] == [
        ("files", 2.0),
        ("postgres", 15.0),
        ("idle", 2.0),
    ] * 2


@pytest.mark.root
def test_vanilla_kernel_has_no_heartbeat():
    from harness.testbed import Testbed

    with Testbed(kind="test", delay=False) as bed:
        h = bed.host
        h.boot(0, extra=("--no-heartbeat",))
        before = h.mail(0).beat
        time.sleep(0.3)
        assert h.mail(0).beat == before
        assert os.path.ismount(h.kernels[0].mount)


SPINNER = """
import sys, threading, time
from kernel.core.kernel import HEARTBEAT_THREAD
from kernel.core.proc import name_thread

def spin():
    name_thread(HEARTBEAT_THREAD)
    sys.stdin.readline()
    t = time.thread_time()
    while time.thread_time() - t < 0.3:
        pass
    print("spun", flush=True)
    sys.stdin.readline()

th = threading.Thread(target=spin)
th.start()
print("ready", flush=True)
th.join()
"""


def test_cpu_sample_tells_the_heartbeat_thread_from_the_kernel():
    """A thread named like the heartbeat that runs 0.3 s of CPU is counted as heartbeat,
    to the nanosecond clock the thread itself reads; its idle main thread as kernel."""
    from harness import cpuuse

    p = subprocess.Popen(
        [sys.executable, "-c", SPINNER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert p.stdout.readline() == "ready\n"
        roles = {cpuuse.KERNEL: [p.pid]}
        before = cpuuse.sample(roles)
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline() == "spun\n"
        after = cpuuse.sample(roles)
        p.stdin.write("end\n")
        p.stdin.flush()
        assert p.wait(10) == 0
    finally:
        p.kill()
    spent = {r: after[r] - before[r] for r in cpuuse.ROLES}
    assert spent[cpuuse.HEARTBEAT] >= 0.3e9
    assert spent[cpuuse.KERNEL] < 0.05e9
    assert spent[cpuuse.STANDBY] == spent[cpuuse.APPS] == spent[cpuuse.CLIENTS] == 0
    assert spent[cpuuse.VMM] == 0
    assert cpuuse.cores(before, after, 2.0)[cpuuse.HEARTBEAT] == spent[cpuuse.HEARTBEAT] / 2e9
    with pytest.raises(ValueError, match="must be positive"):
        cpuuse.cores(before, after, 0.0)


def test_cpu_sample_moves_the_vmm_time_from_the_kernel_to_the_vmm(tmp_path):
    """The VMM runs on the kernel's threads: what its region counted is the VMM's, and the
    kernel's figure is what its threads ran less that."""
    from harness import cpuuse
    from kernel.hw import vmm
    from kernel.hw.physmem import partition_layout

    region = vmm.Region.create(str(tmp_path / "vmm"), partition_layout(0, 0, 64 << 20), 64)
    region.counters[vmm.COUNTERS.index("busy_ns")] = 12_345
    region.close()
    rs = {cpuuse.KERNEL: [os.getpid()]}
    raw0 = cpuuse.sample(rs)
    got = cpuuse.sample(rs, str(tmp_path / "vmm"))
    raw1 = cpuuse.sample(rs)
    assert got[cpuuse.VMM] == 12_345 and raw0[cpuuse.VMM] == 0
    assert raw0[cpuuse.KERNEL] - 12_345 <= got[cpuuse.KERNEL] <= raw1[cpuuse.KERNEL] - 12_345


def test_the_load_runs_beside_the_active_partition_and_the_driver_returns():
    """A client started inside ``on_load_cpus`` runs on the CPUs partition 0 does not
    own; the driver's own CPUs are given back afterwards."""
    from harness.overhead import on_load_cpus
    from kernel.hw import machine

    m = machine.load()
    mine = os.sched_getaffinity(0)
    with on_load_cpus(m, 0):
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    assert json.loads(out) == sorted((mine - set(m.partition(0).cpus)) or mine)
    assert os.sched_getaffinity(0) == mine


def crashbench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def pyperf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyperf", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def overhead_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overhead") / "o"
    p = crashbench(
        "overhead",
        "--schemes",
        "orthros",
        "--workloads",
        "files",
        "--rounds",
        "1",
        "--duration",
        "1",
        "--warmup",
        "0.5",
        "--micro-ops",
        "10",
        "--param",
        "clients=2",
        "--param",
        "max_kib=64",
        "--param",
        "corpus_mib=8",
        "--out",
        str(out),
        "--json",
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(p.stdout)  # --json: one document on stdout, nothing else
    assert doc["kind"] == "crashbench overhead --json" and doc["dir"] == str(out)
    assert doc["figures"] == json.loads((out / "overhead.json").read_text())["figures"]
    assert all((out / f).is_file() for f in doc["files"])
    return out


@pytest.mark.root
def test_overhead_json_is_valid_and_complete(overhead_dir):
    from harness import overhead

    doc = overhead.load(overhead_dir)  # validates against the schema
    assert doc["schema_version"] == 1 and doc["kind"] == "crashbench overhead"
    assert [r["id"] for r in doc["runs"]] == [
        "vanilla-files-0",
        "vanilla-micro-0",
        "orthros-files-0",
        "orthros-micro-0",
    ]
    assert all(r["error"] is None for r in doc["runs"])
    files = doc["figures"]["workloads"]["files"]
    for s in ("vanilla", "orthros"):
        assert files[s]["rounds"] == 1 and files[s]["throughput_ops_s"]["mean"] > 0
        assert files[s]["latency_p99_s"]["mean"] >= files[s]["latency_p50_s"]["mean"]
    assert files["vanilla"]["ratio_to_vanilla"]["throughput_ops_s"]["mean"] == 1
    assert set(doc["figures"]["micro"]) == {"write-4k", "fsync", "create", "stat"}
    assert doc["resources"]["orthros"]["cores"] == 1
    assert doc["resources"]["orthros"]["memory_bytes"] > 0
    assert doc["resources"]["vanilla"] == {
        **doc["resources"]["vanilla"],
        "cores": 0,
        "memory_bytes": 0,
    }
    assert (overhead_dir / "report.md").read_text().count("| orthros |") >= 1
    assert doc["parameters"]["warmup_runs"] == 1
    assert doc["parameters"]["warmup_s"] == {"files": 0.5}
    mine = os.sched_getaffinity(0)
    assert doc["parameters"]["load_cpus"] == sorted((mine - {0}) or mine)
    assert (overhead_dir / "overhead.png").read_bytes()[:4] == b"\x89PNG"
    assert (overhead_dir.parent / "latest").resolve() == overhead_dir.resolve()
    for r in doc["runs"]:
        if r["workload"] == "files":
            assert (overhead_dir / f"history-{r['id']}.jsonl").exists()


@pytest.mark.root
def test_cpu_by_role_tells_the_machinery_apart(overhead_dir):
    """Vanilla has no heartbeat thread and no standby: exactly zero; orthros's heartbeat
    and standby kept a CPU busy for a measurable time, and so did the kernel serving the
    load and the clients making it."""
    from harness import cpuuse, overhead

    doc = overhead.load(overhead_dir)
    runs = {r["id"]: r["cpu_cores"] for r in doc["runs"]}
    assert set(runs["vanilla-files-0"]) == set(cpuuse.ROLES)
    assert runs["vanilla-files-0"]["heartbeat"] == 0 == runs["vanilla-files-0"]["standby"]
    assert runs["vanilla-files-0"]["vmm"] == 0 == runs["orthros-files-0"]["vmm"]
    assert runs["vanilla-micro-0"]["heartbeat"] == 0 == runs["vanilla-micro-0"]["standby"]
    for r in ("orthros-files-0", "orthros-micro-0"):
        assert runs[r]["heartbeat"] > 0 and runs[r]["standby"] > 0
    for r in ("vanilla-files-0", "orthros-files-0"):
        assert runs[r]["kernel"] > 0 and runs[r]["apps"] > 0 and runs[r]["clients"] > 0
    files = doc["figures"]["workloads"]["files"]
    assert files["vanilla"]["machinery_share_pct"]["mean"] == 0
    assert 0 < files["orthros"]["machinery_share_pct"]["mean"] < 100
    assert set(doc["figures"]["micro_cpu"]) == {"vanilla", "orthros"}
    assert "## CPU by role" in (overhead_dir / "report.md").read_text()


@pytest.mark.root
def test_pyperf_reads_and_compares_the_suites(overhead_dir):
    for s in ("vanilla", "orthros"):
        p = pyperf("stats", f"{s}.pyperf.json", cwd=overhead_dir)
        assert p.returncode == 0, p.stderr
        assert "micro-fsync" in p.stdout and "files-time-per-op" in p.stdout
    p = pyperf(
        "compare_to", "vanilla.pyperf.json", "orthros.pyperf.json", "--table", cwd=overhead_dir
    )
    assert p.returncode == 0, p.stderr
    assert "files-latency-p99" in p.stdout
    names = {
        json.loads((overhead_dir / f"{s}.pyperf.json").read_text())["benchmarks"][0]["metadata"][
            "name"
        ]
        for s in ("vanilla", "orthros")
    }
    assert len(names) == 1


@pytest.mark.parametrize(
    "args, says",
    [
        (["--schemes", "orthros,nosuch"], "unknown scheme 'nosuch'"),
        (["--schemes", "vanilla"], "always run"),
        (["--schemes", "reboot,reboot"], "named twice"),
        (["--workloads", "nosuch"], "unknown workload 'nosuch'"),
        (["--workloads", "idle"], "unknown workload 'idle'"),
        (["--rounds", "0"], "--rounds"),
        (["--duration", "0"], "--duration"),
        (["--warmup", "-1"], "--warmup"),
        (["--micro-ops", "-5"], "--micro-ops"),
        (["--warmup-runs", "-1"], "--warmup-runs"),
        (["--param", "nosuch=1", "--workloads", "files"], "--param"),
        (["--param", "postgres.clients=1", "--workloads", "files"], "not among --workloads"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, says):
    out = tmp_path / "o"
    p = crashbench("overhead", *args, "--out", str(out), timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("crashbench: ") and says in p.stderr, p.stderr
    assert not out.exists() and not (tmp_path / "latest").exists()
