"""`crashbench run` end to end: the driver, the `files` workload, results and report.

One short trial of each scheme on `files` with a panic, through the real CLI: WsgiDAV on
the FUSE mount, httpx clients in the client namespace, the checkers over their history.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import history

SHORT = [
    "--warmup",
    "0.5",
    "--duration",
    "1.5",
    "--post",
    "1",
    "--bin",
    "0.25",
    "--param",
    "clients=2",
    "--param",
    "max_kib=64",
    "--param",
    "corpus_mib=8",
]


def crashbench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "r"
    p = crashbench(
        "run",
        "--schemes",
        "none,reboot,orthros",
        "--workload",
        "files",
        "--fault",
        "panic",
        "--trials",
        "1",
        *SHORT,
        "--out",
        str(out),
        "--json",
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


@pytest.fixture(scope="module")
def run_dir(run_out) -> Path:
    return run_out[0]


@pytest.mark.root
def test_run_json_is_valid_and_has_every_scheme(run_dir):
    from harness import results

    run = results.load_run(run_dir)  # validates against the schema
    assert run["schema_version"] == 2
    assert [t["scheme"] for t in run["trials"]] == ["none", "reboot", "orthros"]
    assert all(not t.get("error") for t in run["trials"]), [t.get("error") for t in run["trials"]]


@pytest.mark.root
def test_run_json_prints_one_document_and_the_progress_on_stderr(run_out):
    import csv

    from harness import results

    out, stdout = run_out
    doc = json.loads(stdout)  # nothing but the document on stdout
    assert doc["kind"] == "crashbench run --json" and doc["exit_code"] == 0
    assert doc["dir"] == str(out) and doc["failed_trials"] == []
    assert [g["scheme"] for g in doc["groups"]] == ["none", "reboot", "orthros"]
    assert all((out / f).is_file() for f in doc["files"]) and "trials.csv" in doc["files"]
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [t["id"] for t in results.load_run(out)["trials"]]


@pytest.mark.root
def test_none_does_not_recover_and_the_others_do(run_dir):
    from harness import results

    by = {t["scheme"]: t for t in results.load_run(run_dir)["trials"]}
    assert by["none"]["recovered"] is False and by["none"]["downtime_s"] is None
    for s in ("reboot", "orthros"):
        assert by[s]["recovered"] is True, by[s]
        assert by[s]["downtime_s"] > 0
        assert by[s]["acked_writes"] > 0


@pytest.mark.root
def test_orthros_loses_no_acknowledged_write(run_dir):
    from harness import results

    t = next(t for t in results.load_run(run_dir)["trials"] if t["scheme"] == "orthros")
    assert t["lost_writes"] == 0 and t["corrupted_writes"] == 0 and t["lost_bytes"] == 0
    assert t["unverified_keys"] == 0
    assert t["cache"]["pages_recovered"] > 0


@pytest.mark.root
def test_the_recovery_is_resolved_and_the_kernel_counters_were_sampled(run_dir):
    """The outage shows as empty 0.1 s bins after the crash (reboot's: orthros keeping its
    processes may end its outage inside one bin), the clients' gap and the hit ratio before
    and after come from the run itself (the kernel's counters were asked)."""
    from harness import results

    by = {t["scheme"]: t for t in results.load_run(run_dir)["trials"]}
    for s in ("reboot", "orthros"):
        t = by[s]
        assert t["recovery"]["bin_s"] == 0.1
        after = [b["ops"] for b in t["recovery"]["bins"] if b["t"] >= 0 and b["full"]]
        if s == "reboot":  # a boot in the outage: at least one empty bin, near the crash
            assert 0 in after[:10], after[:10]
        assert t["client_gap_s"] is not None and t["recovery"]["first_ok_after_s"] > 0
        assert t["latency"]["before"]["n"] > 0 and t["latency"]["after"]["n"] > 0
        assert t["cache_hits"]["samples"] > 0
        assert t["cache_hits"]["before"] is not None and t["cache_hits"]["after"] is not None


@pytest.mark.root
def test_every_trial_has_a_history_with_the_crash(run_dir):
    from harness import results

    for t in results.load_run(run_dir)["trials"]:
        events = history.read(run_dir / t["history"])
        assert any(e["process"] == history.NEMESIS and e["f"] == "crash" for e in events)
        assert any(e["type"] == "ok" and e["f"] == "write" for e in events)


@pytest.mark.root
def test_report_files_and_plots_are_written(run_dir):
    for name in ("report.md", "report.html", "downtime.pyperf.json"):
        assert (run_dir / name).stat().st_size > 0, name
    pngs = list(run_dir.glob("*.png"))
    assert pngs and all(
        p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000 for p in pngs
    )


@pytest.mark.root
def test_run_leaves_no_mount_namespace_or_process_behind(run_dir):
    from harness import results
    from kernel.hw.procset import ProcError, ProcessSet

    trials = results.load_run(run_dir)["trials"]
    mounts = Path("/proc/mounts").read_text()
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for t in trials:
        tag = t["machine_tag"]
        assert not [line for line in ns.splitlines() if line.startswith(f"cb{tag}-")]
        assert not [m for m in mounts.splitlines() if "crashbench-p" in m and tag in m]
        for part in (0, 1):
            with pytest.raises(ProcError):  # the partition's process set is gone
                ProcessSet(tag, part, create=False)
    ps = subprocess.run(
        ["pgrep", "-f", f"files_client .*--history {run_dir}"], capture_output=True, text=True
    ).stdout
    assert ps.strip() == ""


@pytest.mark.parametrize(
    "args, names",
    [
        (["--schemes", "orthros,warpdrive"], "unknown scheme 'warpdrive'"),
        (["--workload", "nosuch"], "unknown workload 'nosuch'"),
        (["--fault", "meteor"], "unknown fault 'meteor'"),
        (["--trials", "0"], "--trials: must be a positive"),
        (["--trials", "-2"], "--trials: must be a positive"),
        (["--duration", "0"], "--duration: must be positive"),
        (["--param", "clients"], "expected NAME=VALUE"),
        (["--param", "colour=blue"], "unknown parameter(s) colour"),
        (["--schemes", "reboot", "--keep-apps"], "--keep-apps: none of the schemes keeps"),
        (["--schemes", "reboot", "--no-keep-apps"], "--no-keep-apps: none of the schemes keeps"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, names):
    out = tmp_path / "r"
    p = crashbench("run", *args, "--out", str(out), timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert names in p.stderr
    assert not out.exists()


def test_list_names_every_scheme_workload_and_fault():
    p = crashbench("list", "--json", timeout=60)
    assert p.returncode == 0, p.stderr
    cat = json.loads(p.stdout)
    assert cat.pop("schema_version") == 1 and cat.pop("kind") == "crashbench list --json"
    assert {"none", "reboot", "orthros"} <= set(cat["schemes"])
    assert "files" in cat["workloads"]
    assert "panic" in cat["faults"]
    assert all(isinstance(v, str) and v for kind in cat.values() for v in kind.values())


def _as_from_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and the run would inherit that
    (a test suite started in the background): give it the terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_leaves_nothing_behind(tmp_path, sig):
    """Stopped in its steady state by Ctrl-C or a polite kill, `crashbench run` tears the
    trial down: no namespace, memory file, mount, process set or process of its machine
    stays, nor its ownership record; its run.json says the run is incomplete, why, and how
    many of the planned trials ran. (Only this run's machine is looked at: other runs may
    share the host.)"""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--schemes",
            "orthros",
            "--workload",
            "files",
            "--fault",
            "panic",
            "--trials",
            "1",
            "--warmup",
            "0.5",
            "--duration",
            "60",
            "--param",
            "clients=2",
            "--param",
            "corpus_mib=8",
            "--out",
            str(tmp_path / "r"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            (rec := _machine_of(p.pid)) and any(x.startswith("mount") for x in _what_is_left(rec))
        ):
            assert p.poll() is None, p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never mounted its machine"
            time.sleep(0.2)
        time.sleep(3)  # into the warm-up and steady state
        p.send_signal(sig)
        out = p.communicate(timeout=60)[0]
    finally:
        p.kill()
    assert p.returncode != 0, out[-3000:]
    from harness import results

    run = results.load_run(tmp_path / "r")  # what ran is kept, and marked incomplete
    assert run["incomplete"] == {
        "reason": f"interrupted by {sig.name}",
        "trials_run": 0,
        "trials_planned": 1,
    }, out[-3000:]
    assert run["trials"] == []
    assert _what_is_left(rec) == [], out[-3000:]
    assert _machine_of(p.pid) is None, out[-3000:]


def _machine_of(pid: int):
    from harness import owners

    return next((r for r in owners.records() if r.data and r.data["owner"]["pid"] == pid), None)


def _what_is_left(rec) -> list[str]:
    from kernel.hw import fusedev
    from kernel.hw.procset import ProcError, ProcessSet

    tag, wd = rec.data["tag"], rec.data["workdir"]
    left = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += [f"netns {line.split()[0]}" for line in ns.splitlines() if line.startswith(f"cb{tag}-")]
    left += [f"mount {m}" for m in Path(wd).glob("mnt-p*") if fusedev.is_mounted(str(m))]
    left += [f"memory {rec.data['physmem']}"] if Path(rec.data["physmem"]).exists() else []
    for part in (0, 1):
        try:
            left.append(f"procset {ProcessSet(tag, part, create=False)}")
        except ProcError:
            pass
    ps = subprocess.run(["pgrep", "-f", wd], capture_output=True, text=True).stdout.split()
    left += [f"process {p}" for p in ps if int(p) != os.getpid()]
    left += [f"work directory {wd}"] if Path(wd).exists() else []
    return left


@pytest.mark.root
def test_a_killed_run_is_reported_and_down_all_removes_what_it_left(tmp_path):
    """SIGKILL of `crashbench run` in its steady state leaves its machine running; the next
    `run` names it, and `down --all` removes its processes, mounts, namespaces, process
    sets, memory file and work directory."""
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--schemes",
            "orthros",
            "--workload",
            "files",
            "--fault",
            "panic",
            "--trials",
            "1",
            "--warmup",
            "0.5",
            "--duration",
            "60",
            "--param",
            "clients=2",
            "--param",
            "corpus_mib=8",
            "--out",
            str(tmp_path / "r"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (
            (rec := _machine_of(p.pid)) and any(x.startswith("mount") for x in _what_is_left(rec))
        ):
            assert p.poll() is None, p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the run never mounted its machine"
            time.sleep(0.2)
        time.sleep(3)  # into the warm-up and steady state
    finally:
        p.kill()
        p.communicate(timeout=60)
    tag = rec.data["tag"]
    from harness import prepared

    def owned_by_the_run(d: Path) -> bool:
        return (d / prepared.STAMPS / f"{p.pid}.json").is_file()

    store = [d for d in prepared.orphan_stores() if owned_by_the_run(d)]
    assert len(store) == 1  # the run's data set, made by its first trial, outlived the kill
    kinds = {x.split(" ")[0] for x in _what_is_left(rec)}  # the kill really left them
    assert {"mount", "memory", "procset", "netns", "process", "work"} <= kinds
    nxt = crashbench("run", "--trials", "0", timeout=60)  # refused, but names the orphan
    assert nxt.returncode == 2
    assert f"run machine {tag} in {rec.data['workdir']}" in nxt.stderr
    assert "crashbench down --all" in nxt.stderr
    down = crashbench("down", "--all", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"unmounted {rec.data['workdir']}/mnt-p0" in down.stdout
    assert _what_is_left(rec) == [], down.stdout
    assert f"removed a killed run's data set {store[0]}" in down.stdout
    assert not store[0].exists()
    assert _machine_of(p.pid) is None
    assert f"machine {tag}" not in crashbench("run", "--trials", "0", timeout=60).stderr
