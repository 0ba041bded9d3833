"""The `postgres` workload checks its own database and offers a read-heavy mix.

The checker and the key law alone first; then a real PostgreSQL (the workload's own
prepare, server and clients, on this machine's disk: what is tested here is the workload,
not the file system under it): a clean database passes pg_amcheck, a heap page flipped on
disk while the server was stopped fails the verify with pg_amcheck's finding named, and
the read-heavy mix reads the share asked for over a skewed working set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from harness import history, report, results
from harness.workloads import Service, WorkloadError
from harness.workloads import postgres_client as client
from harness.workloads.postgres import Postgres

# What pg_amcheck 15 printed for a heap page whose checksum failed (block 3 flipped).
AMCHECK_OUT = """btree index "postgres.public.accounts_pkey":
    ERROR:  invalid page in block 3 of relation base/5/16391
heap table "postgres.public.accounts":
    ERROR:  invalid page in block 3 of relation base/5/16391
"""


def amcheck(events: list[dict]) -> dict:
    from harness.checkers.amcheck import amcheck

    return amcheck(events)


def _amcheck_history(outcome: str, value: dict | None = None, error: str | None = None):
    inv = history.event("invoke", 1, "verify", value={"check": "amcheck"}, time_s=10.0)
    done = history.event(outcome, 1, "verify", value=value, error=error, time_s=11.0)
    return [inv, done]


# --- the checker and the key law, alone -----------------------------------------------------


def test_pg_amcheck_report_becomes_one_finding_per_relation():
    assert client.amcheck_findings(AMCHECK_OUT) == [
        'btree index "postgres.public.accounts_pkey": ERROR: invalid page in block 3 of '
        "relation base/5/16391",
        'heap table "postgres.public.accounts": ERROR: invalid page in block 3 of relation '
        "base/5/16391",
    ]
    assert client.amcheck_findings("") == []


def test_amcheck_checker_passes_only_a_check_that_found_nothing():
    clean = amcheck(_amcheck_history("ok", {"check": "amcheck", "status": 0, "findings": []}))
    assert clean == {"checked": True, "status": 0, "findings": [], "error": None, "ok": True}
    bad = amcheck(
        _amcheck_history(
            "ok",
            {"check": "amcheck", "status": 2, "findings": client.amcheck_findings(AMCHECK_OUT)},
        )
    )
    assert bad["ok"] is False and bad["checked"] and len(bad["findings"]) == 2
    not_run = amcheck(_amcheck_history("fail", error="pg_amcheck exited with status 1: no server"))
    assert not_run["ok"] is None and not not_run["checked"] and "no server" in not_run["error"]
    assert amcheck([])["ok"] is None  # no verify phase: unknown, not passed


def test_verify_findings_are_in_the_report(tmp_path):
    golden = Path(__file__).parent / "golden" / "20261205-130000-orthros-warmcache-reboot-files"
    run = json.loads((golden / "run.json").read_text())
    bad = amcheck(
        _amcheck_history(
            "ok",
            {"check": "amcheck", "status": 2, "findings": client.amcheck_findings(AMCHECK_OUT)},
        )
    )
    run["trials"][0]["checks"] = {"amcheck": bad}
    run["trials"][1]["checks"] = {"amcheck": {**bad, "ok": True, "findings": []}}
    d = tmp_path / "run"
    d.mkdir()
    results.write_run(d, run["parameters"], run["environment"], run["trials"])
    report.write_report(d)
    md = (d / "report.md").read_text()
    assert "## Verify findings" in md
    tid = run["trials"][0]["id"]
    assert (
        f'{tid}: amcheck: heap table "postgres.public.accounts": ERROR: invalid page in '
        f"block 3 of relation base/5/16391"
    ) in md
    assert f"{run['trials'][1]['id']}: amcheck" not in md


def test_skewed_keys_favour_few_ranks_scattered_over_the_table():
    n = 100_000
    u = np.random.default_rng(1).random(20_000)
    uniform = Counter(client.skewed_account(float(x), n, 0.0) for x in u)
    skewed = Counter(client.skewed_account(float(x), n, 1.0) for x in u)
    assert all(1 <= k <= n for k in skewed)
    top10 = sum(c for _, c in skewed.most_common(10)) / len(u)
    assert 0.15 < top10 < 0.30  # ln(11)/ln(100001) = 0.208 of the draws
    assert sum(c for _, c in uniform.most_common(10)) / len(u) < 0.01
    hot = [k for k, _ in skewed.most_common(10)]
    assert len({(k - 1) // 1000 for k in hot}) == 10  # not a hot few pages
    assert len(skewed) > 2000  # a working set, not a hot spot


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), "zipf", True])
def test_a_bad_read_skew_is_refused_by_name(value):
    with pytest.raises(WorkloadError, match=r"^postgres: read_skew must be a number >= 0"):
        Postgres(read_skew=value)


# --- a real PostgreSQL ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service(mount: Path, work: Path) -> Service:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return Service(mount=str(mount), ip="127.0.0.1", client_netns=None, workdir=work, seed=7)


class Server:
    """The workload's own server (its apps() entry), started as a partition would."""

    def __init__(self, wl: Postgres, svc: Service):
        app = wl.apps(svc)[0]
        with open(app["log"], "ab") as log:
            self.p = subprocess.Popen(
                app["argv"],
                cwd=app["cwd"],
                env={**os.environ, **app["env"]},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wl.wait_ready(svc, 120)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """A clean shutdown (SIGINT to the postmaster, the child of unshare), then kill."""
        try:
            kids = Path(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        for k in kids:
            os.kill(int(k), signal.SIGINT)
        try:
            self.p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()


@pytest.fixture(scope="module")
def cluster():
    """A prepared scale-1 cluster with its server running, and an untouched copy of its data
    directory made while no server ran (for the corruption test)."""
    if os.geteuid() != 0:
        pytest.skip("the postgres user's servers need root")
    top = Path(tempfile.mkdtemp(prefix="cbtest-pg-"))
    top.chmod(0o755)  # the servers run as postgres
    server = None
    try:
        mount, copy = top / "mount", top / "copy"
        mount.mkdir(mode=0o755)
        copy.mkdir(mode=0o755)
        svc = _service(mount, top / "work")
        wl = Postgres(scale=1, clients=1, port=_free_port())
        wl.prepare(svc)
        subprocess.run(["cp", "-a", str(mount / "pgdata"), str(copy / "pgdata")], check=True)
        server = Server(wl, svc)
        yield {"top": top, "wl": wl, "svc": svc, "copy": copy}
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(top, ignore_errors=True)


def _verify(wl: Postgres, svc: Service, work: Path) -> tuple[list[dict], dict]:
    svc = dataclasses.replace(svc, workdir=work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    events = history.read(wl.verify(svc, [], timeout=60))
    return events, wl.checks(svc, events)


@pytest.mark.root
@pytest.mark.root
def test_a_clean_database_passes_pg_amcheck(cluster):
    events, checks = _verify(cluster["wl"], cluster["svc"], cluster["top"] / "verify-clean")
    assert checks["amcheck"] == {
        "checked": True,
        "status": 0,
        "findings": [],
        "error": None,
        "ok": True,
    }, checks["amcheck"]


@pytest.mark.root
@pytest.mark.root
def test_a_heap_page_corrupted_on_disk_fails_the_verify_with_pg_amcheck_finding(cluster):
    import psycopg

    wl, svc = cluster["wl"], cluster["svc"]
    with psycopg.connect(
        host=svc.ip,
        port=wl.p["port"],
        user="postgres",
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        rel = conn.execute("SELECT pg_relation_filepath('accounts')").fetchone()[0]
    path = cluster["copy"] / "pgdata" / rel  # the copy no server has opened yet
    with open(path, "r+b") as f:  # flip 16 bytes amid block 1's tuples
        f.seek(8192 + 4096)
        data = f.read(16)
        f.seek(8192 + 4096)
        f.write(bytes(b ^ 0xFF for b in data))
    wl2 = Postgres(scale=1, clients=1, port=_free_port())
    svc2 = _service(cluster["copy"], cluster["top"] / "work-copy")
    server = Server(wl2, svc2)
    try:
        events, checks = _verify(wl2, svc2, cluster["top"] / "verify-corrupt")
    finally:
        server.stop()
    a = checks["amcheck"]
    assert a["checked"] and a["status"] == 2 and a["ok"] is False, a
    heap = [f for f in a["findings"] if f.startswith('heap table "postgres.public.accounts"')]
    assert heap and f"invalid page in block 1 of relation {rel}" in heap[0], a["findings"]
    bank = [
        e for e in events if e["f"] == "verify" and (e.get("value") or {}).get("check") == "bank"
    ]
    assert [e["type"] for e in bank] == ["invoke", "fail"]  # refused, not trusted
    assert "invalid page in block 1" in bank[1]["error"]
    assert checks["bank"]["ok"] is None


@pytest.mark.root
@pytest.mark.root
def test_read_heavy_mix_reads_the_share_asked_over_a_skewed_working_set(cluster):
    wl0, svc = cluster["wl"], cluster["svc"]
    ops = 1000
    wl = Postgres(
        scale=1,
        clients=1,
        port=wl0.p["port"],
        read_ratio=0.9,
        read_skew=1.0,
        max_ops_per_client=ops,
    )
    work = cluster["top"] / "mix"
    svc = dataclasses.replace(svc, workdir=work)
    (work / "logs").mkdir(parents=True)
    group = wl.start_clients(svc, time.monotonic() + 600)
    deadline = time.monotonic() + 600
    while group.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    group.stop()
    events = history.read(group.histories[0])
    invokes = [e for e in events if e["type"] == "invoke"]
    assert len(invokes) == ops
    reads = [e["key"] for e in invokes if e["f"] == "read"]
    share = len(reads) / len(invokes)
    assert abs(share - 0.9) < 0.05, share  # 5 standard deviations at 1000 draws
    counts = Counter(int(k.split("/")[1]) for k in reads)
    top10 = sum(c for _, c in counts.most_common(10)) / len(reads)
    assert top10 > 0.1, top10  # expected 0.21; uniform: 0.011
    assert len(counts) > 200, len(counts)  # a working set, not a few hot rows
    assert len({(aid - 1) // 1000 for aid in counts}) > 50  # spread over the table
