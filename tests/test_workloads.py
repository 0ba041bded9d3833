"""The `postgres` and `http` workloads end to end: real PostgreSQL and nginx on the FUSE
mount, psycopg and locust clients in the client namespace, one short trial under `orthros`
(without keeping its processes) and under `reboot` through the real CLI, and a failed trial
of each in process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import history

pytestmark = [pytest.mark.root]

SHORT = ["--warmup", "0.5", "--duration", "1.5", "--post", "1", "--bin", "0.25"]
PARAMS = {"postgres": {"scale": 2, "clients": 3}, "http": {"total_mib": 48, "users": 3}}
OURS = r"harness\.workloads\.(postgres|http)_client|postgres -D \S*crashbench-trial-|nginx -c \S*crashbench-trial-"


def crashbench(*args: str, tmpdir: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def own_tmpdir() -> Path:
    """A temp directory for one test's trials (TMPDIR of the run), so that what they could
    leave behind is told apart from other runs on the machine. Mode 755: the servers run
    as other users and must reach their files under it."""
    d = Path(tempfile.mkdtemp(prefix="cbtest-"))
    d.chmod(0o755)
    return d


def leftovers(tmpdir: Path, out: Path) -> dict:
    """What this test's trials could have left behind: processes of the workloads whose
    command line names the trials' temp directory or the results directory, socket and
    trial directories, mounts."""
    ps = subprocess.run(["pgrep", "-af", OURS], capture_output=True, text=True).stdout
    ours = (str(tmpdir), str(out))
    return {
        "processes": [line for line in ps.splitlines() if any(x in line for x in ours)],
        "temp dirs": [str(p) for p in tmpdir.glob("crashbench-*")],
        "mounts": [
            m
            for m in Path("/proc/mounts").read_text().splitlines()
            if "crashbench-trial-" in m and str(tmpdir) in m
        ],
    }


def assert_clean(tmpdir: Path, out: Path) -> None:
    after = leftovers(tmpdir, out)
    assert after["processes"] == [], after["processes"]
    assert after["temp dirs"] == [], after["temp dirs"]
    assert after["mounts"] == [], after["mounts"]
    shutil.rmtree(tmpdir, ignore_errors=True)
    # Shared memory is not compared: other PostgreSQL servers on the machine make and drop
    # segments at any time. Ours cannot leave one: see the next test.


def test_postgres_runs_in_its_own_ipc_and_pid_namespaces_with_no_posix_shared_memory(tmp_path):
    from harness.workloads import Service
    from harness.workloads.postgres import Postgres

    svc = Service(mount=str(tmp_path), ip="198.18.0.1", client_netns=None, workdir=tmp_path, seed=1)
    argv = Postgres().apps(svc)[0]["argv"]
    assert argv[:5] == ["unshare", "--ipc", "--pid", "--fork", "--kill-child=SIGKILL"]
    assert "dynamic_shared_memory_type=sysv" in argv and "unix_socket_directories=" in argv


def run_workload(tmp_path_factory, workload: str):
    tmpdir = own_tmpdir()
    out = tmp_path_factory.mktemp(workload) / "r"
    params = [x for k, v in PARAMS[workload].items() for x in ("--param", f"{k}={v}")]
    p = crashbench(
        "run",
        "--schemes",
        "orthros,reboot",
        "--no-keep-apps",  # both restart the server: its start-up and recovery are measured
        "--workload",
        workload,
        "--fault",
        "panic",
        "--trials",
        "1",
        *SHORT,
        *params,
        "--out",
        str(out),
        tmpdir=tmpdir,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from harness import results

    return results.load_run(out), out, tmpdir


@pytest.fixture(scope="module")
def pg_run(tmp_path_factory):
    return run_workload(tmp_path_factory, "postgres")


@pytest.fixture(scope="module")
def http_run(tmp_path_factory):
    return run_workload(tmp_path_factory, "http")


def by_scheme(run: dict) -> dict:
    return {t["scheme"]: t for t in run["trials"]}


# --- postgres ------------------------------------------------------------------------------


def test_postgres_recovers_under_both_schemes_and_loses_no_committed_row(pg_run):
    run, _, _ = pg_run
    for scheme, t in by_scheme(run).items():
        assert not t.get("error"), t.get("error")
        assert t["recovered"] is True, scheme
        bank = t["checks"]["bank"]
        assert bank["committed"] > 0, (scheme, bank)
        assert bank["lost"] == 0 and t["lost_writes"] == 0, (scheme, bank)
        assert t["acked_writes"] == bank["committed"]
        assert bank["failed_present"] == 0 and bank["unexplained_rows"] == 0, (scheme, bank)
        assert bank["unverified"] == 0, (scheme, bank)


def test_postgres_money_is_conserved_and_no_transaction_is_half_applied(pg_run):
    run, _, _ = pg_run
    for scheme, t in by_scheme(run).items():
        bank = t["checks"]["bank"]
        assert bank["conserved"] is True and bank["sum"] == bank["expected_sum"], (scheme, bank)
        assert bank["accounts_inconsistent"] == 0, (scheme, bank)
        assert bank["info_present"] + bank["info_absent"] == bank["info"]
        assert bank["ok"] is True, (scheme, bank)


def test_postgres_recovered_database_passes_pg_amcheck_under_both_schemes(pg_run):
    run, _, _ = pg_run
    for scheme, t in by_scheme(run).items():
        a = t["checks"]["amcheck"]
        assert a["checked"] is True and a["ok"] is True, (scheme, a)


def test_postgres_start_up_is_its_own_phase_and_ran_crash_recovery(pg_run):
    run, _, _ = pg_run
    for scheme, t in by_scheme(run).items():
        assert t["phases"]["postgres start-up"] > 0, (scheme, t["phases"])
        starts = t["checks"]["server_starts"]
        assert len(starts) == 2 and starts[1]["recovery"] is True, (scheme, starts)


def test_postgres_clients_waited_through_the_server_start_up(pg_run):
    """Some client went longer than the server's start-up without an answer across the crash
    (per-client downtime itself may be short: a reply to a request in flight at the crash
    can still arrive from the dying server — see docs/WORKLOADS.md)."""
    run, out, _ = pg_run
    for scheme, t in by_scheme(run).items():
        events = history.read(out / t["history"])
        crash = max(
            e["time"]
            for e in events
            if e["process"] == history.NEMESIS and e["f"] in ("crash", "activated")
        )
        gaps = []
        for c in range(PARAMS["postgres"]["clients"]):
            oks = sorted(e["time"] for e in events if e["process"] == c and e["type"] == "ok")
            gaps += [b - a for a, b in zip(oks, oks[1:]) if b > crash]
        assert max(gaps) >= t["phases"]["postgres start-up"], (scheme, max(gaps), t["phases"])


def test_postgres_history_records_every_transaction_and_commits_of_unknown_outcome(pg_run):
    run, out, _ = pg_run
    for t in run["trials"]:
        events = history.read(out / t["history"])
        writes = [e for e in events if e["f"] == "write" and e["process"] != history.NEMESIS]
        invokes = [e for e in writes if e["type"] == "invoke"]
        assert invokes and all(e["key"].startswith("ledger/") for e in invokes)
        done = [e for e in writes if e["type"] != "invoke"]
        assert len(done) >= len(invokes) - PARAMS["postgres"]["clients"]  # stopped mid-op
        assert any(e["type"] == "fail" for e in done)  # the outage was seen


def test_postgres_trials_leave_nothing_behind(pg_run):
    assert_clean(pg_run[2], pg_run[1])


# --- http ------------------------------------------------------------------------------------


def test_http_recovers_and_every_served_body_is_byte_identical(http_run):
    run, _, _ = http_run
    for scheme, t in by_scheme(run).items():
        assert not t.get("error"), t.get("error")
        assert t["recovered"] is True, scheme
        b = t["checks"]["bodies"]
        assert b["served"] > 0 and b["mismatched"] == 0, (scheme, b)
        assert b["verified_files"] > 0 and b["verify_mismatched"] == 0, (scheme, b)
        assert b["unverified_files"] == 0 and b["ok"] is True, (scheme, b)


def test_http_history_has_one_process_per_locust_user(http_run):
    run, out, _ = http_run
    for t in run["trials"]:
        events = history.read(out / t["history"])
        users = {e["process"] for e in events if e["f"] == "read"}
        assert users == set(range(PARAMS["http"]["users"]))
        assert set(t["downtime_per_client_s"]) == {str(u) for u in users}


def test_http_working_set_fills_the_cache_before_the_crash(http_run):
    run, _, _ = http_run
    t = by_scheme(run)["orthros"]
    pages = PARAMS["http"]["total_mib"] << 8  # 4 KiB pages
    assert t["cache"]["pages_before"] >= 0.9 * pages
    assert t["cache"]["pages_recovered"] >= 0.9 * pages


def test_http_trials_leave_nothing_behind(http_run):
    assert_clean(http_run[2], http_run[1])


# --- failed trials -------------------------------------------------------------------------


@pytest.mark.parametrize("workload", ["postgres", "http"])
def test_a_failed_trial_leaves_no_server_client_socket_or_temp_dir(workload, tmp_path, monkeypatch):
    from harness import driver
    from harness.workloads import registry

    def boom(self, svc, events, **kw):
        raise RuntimeError("verify exploded (test)")

    monkeypatch.setattr(registry()[workload], "verify", boom)
    tmpdir = own_tmpdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    timing = dict(driver.DEFAULTS, warmup_s=0.3, steady_s=0.5, post_s=0.2, bin_s=0.25)
    spec = driver.TrialSpec("reboot", workload, "panic", 0, 1, timing, dict(PARAMS[workload]))
    rec = driver.run_one(spec, tmp_path)
    assert "verify exploded" in (rec.get("error") or ""), rec.get("error")
    assert_clean(tmpdir, tmp_path)


def test_pooled_clients_run_one_after_another_in_one_process_and_stop_on_sigterm(tmp_path):
    """A pool keeps the client's process: a second client runs in the same process after
    the first ended (its status is the run's), SIGTERM stops a running client after the
    operation in flight is recorded, a SIGTERM between runs is ignored, and close() ends
    the process."""
    import signal
    import time

    from harness.workloads.pool import ClientPool

    url = ["--url", "http://127.0.0.1:9"]  # nothing listens: every attempt is refused
    pool = ClientPool("harness.workloads.files_client", tmp_path, None)
    try:
        ready = pool.spawn(["ready", *url, "--until", str(time.monotonic() + 0.3)], tmp_path / "r")
        assert ready.wait(60) == 1  # the ready check's "nothing answered"
        ready.send_signal(signal.SIGTERM)  # after its run: nothing to stop
        h = tmp_path / "h.jsonl"
        args = ["client", *url, "--until", str(time.monotonic() + 600), "--history", str(h)]
        load = pool.spawn([*args, "--id", "3"], tmp_path / "c")
        assert load.pid == ready.pid and load.poll() is None
        while not (h.exists() and h.read_text().count('"fail"') >= 2):
            time.sleep(0.05)
        load.send_signal(signal.SIGTERM)
        assert load.wait(30) == 0
        events = history.read(h)
        assert {e["process"] for e in events} == {3} and events[-1]["type"] == "fail"
    finally:
        pool.close()
    with pytest.raises(ProcessLookupError):
        os.kill(load.pid, 0)


def test_a_pooled_client_whose_pool_is_closed_under_it_reads_as_killed(tmp_path):
    """A trial's error path closes the pool while its clients run, then stops the
    clients: each run reads as killed (its process's status) and stopping them does not
    fail."""
    import signal
    import time

    from harness.workloads.clients import ClientGroup
    from harness.workloads.pool import ClientPool

    pool = ClientPool("harness.workloads.files_client", tmp_path, None)
    h = tmp_path / "h.jsonl"
    args = ["client", "--url", "http://127.0.0.1:9", "--until", str(time.monotonic() + 600)]
    run = pool.spawn([*args, "--history", str(h)], tmp_path / "c")
    group = ClientGroup([run], [h])
    while not h.exists():
        time.sleep(0.05)
    pool.close()
    group.stop(timeout=5.0)
    assert run.poll() == -signal.SIGKILL and group.alive() == 0
