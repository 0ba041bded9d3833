"""Orthros keeping real servers: PostgreSQL and nginx run on across failovers, same pids.

Each server is the workload's own (harness/workloads/postgres.py, http.py: their prepare,
their apps in their PID namespace, behind the machine's NIC), deployed once by the driver's
deploy phase; then a panic, a kill and a hang follow one another on that machine (each
after the re-pairing of the one before). Every process of the server's tree that lives as
long as the server (PostgreSQL's postmaster and auxiliary processes, nginx's master and
worker) has the same pid afterwards and runs (none left stopped), and the service answers.
PostgreSQL runs no crash recovery. A crash trial under load then shows what the clients
and the checkers see: nothing lost, pg_amcheck clean, no server start after the crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import driver
from harness.workloads.postgres import startups
from systems.base import check_report

pytestmark = [pytest.mark.root]

SMALL = {"postgres": {"scale": 1}, "http": {"total_mib": 8}}
# the processes that live as long as the server (not backends, not autovacuum workers)
LASTING = {
    "postgres": (
        " -D ",  # the postmaster
        "checkpointer",
        "background writer",
        "walwriter",
        "autovacuum launcher",
        "logical replication launcher",
    ),
    "http": ("master process", "worker process"),
}
APP = {"postgres": "postgres", "http": "nginx"}


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of ``pid``, None once it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b") ", 1)[1].split()
    except OSError:
        return None
    return int(rest[1]), rest[0].decode()


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree(root: int) -> dict[int, str]:
    """``root`` and all its descendants: pid → command line."""
    stats = {int(d.name): _stat(int(d.name)) for d in Path("/proc").iterdir() if d.name.isdigit()}
    out, todo = {}, [root]
    while todo:
        p = todo.pop()
        out[p] = _title(p)
        todo += [c for c, st in stats.items() if st is not None and st[0] == p]
    return out


def lasting(workload: str, root: int) -> dict[int, str]:
    """The server's lasting processes under ``root`` (the app's process), root included."""
    return {
        p: t for p, t in tree(root).items() if p == root or any(w in t for w in LASTING[workload])
    }


def app_root(s) -> int:
    """The pid of the deployment's one app: the process its kernel launched (``unshare``,
    the server's PID namespace)."""
    kernel = s.host.kernels[s.active].proc.pid
    (pid,) = [p for p, t in tree(kernel).items() if p != kernel and t.startswith("unshare ")]
    return pid


@pytest.fixture(params=["postgres", "http"])
def server(request, tmp_path):
    spec = driver.TrialSpec(
        "orthros",
        request.param,
        "panic",
        0,
        1,
        workload_params=SMALL[request.param],
        scheme_options={"keep_processes": True},
    )
    t = driver.Trial(spec, tmp_path)
    try:
        t.deploy()
        yield request.param, t
    finally:
        t.teardown()


def test_a_server_keeps_every_pid_across_a_panic_a_kill_and_a_hang(server):
    workload, t = server
    s = t.scheme
    root = app_root(s)
    before = lasting(workload, root)
    assert len(before) == 1 + len(LASTING[workload]), before
    for n, fault in enumerate(("panic", "kill", "hang")):
        r = check_report(s.on_crash(s.inject(fault), timeout=30))
        assert r.recovered and s.active == (n + 1) % 2, fault
        assert [(p.name, p.pid, p.fate) for p in r.processes] == [
            (APP[workload], root, "preserved")
        ], fault
        t.workload.wait_ready(t.svc, 30)  # it answers a client again
        assert lasting(workload, root) == before, fault
        stopped = {p for p in before if _stat(p)[1] == "T"}
        assert not stopped, f"{fault}: left stopped: {[before[p] for p in stopped]}"
    if workload == "postgres":
        log = t.workload.log(t.svc)
        assert "database system was interrupted" not in log.read_text()
        assert len(startups(log)) == 1  # started once, at deploy: never again


@pytest.mark.parametrize("workload", ["postgres", "http"])
def test_a_trial_under_load_with_keeping_loses_nothing_and_restarts_no_server(workload, tmp_path):
    timing = dict(driver.DEFAULTS, warmup_s=1.0, steady_s=2.0, post_s=2.0)
    # no scheme option: orthros keeps by default
    spec = driver.TrialSpec("orthros", workload, "panic", 0, 1, timing, SMALL[workload])
    rec = driver.run_one(spec, tmp_path)
    assert rec.get("error") is None and rec["recovered"]
    assert [(p["name"], p["fate"]) for p in rec["report"]["processes"]] == [
        (APP[workload], "preserved")
    ]
    assert rec["recovery"]["first_ok_after_s"] is not None  # the clients were served again
    if workload == "http":
        assert rec["checks"]["bodies"]["ok"], rec["checks"]["bodies"]
    if workload == "postgres":
        assert rec["acked_writes"] > 0 and rec["lost_writes"] == rec["corrupted_writes"] == 0
        checks = rec["checks"]
        assert checks["amcheck"]["checked"] and checks["amcheck"]["ok"], checks["amcheck"]
        assert checks["bank"]["ok"], checks["bank"]
        assert [s["recovery"] for s in checks["server_starts"]] == [False]
        assert "postgres start-up" not in rec["phases"]
