"""Workload `postgres`: PostgreSQL with its data directory on the emulated file system, and
psycopg clients moving money between accounts.

Promises to the driver (harness/workloads/__init__.py):

* ``prepare`` (``prepares = True``: on a kernel booted only for it) runs initdb as the
  ``postgres`` user into ``<mount>/pgdata`` (mode 700, with data checksums, so a page
  corrupted on its way through the file system is an error, not a wrong answer), starts a
  temporary server on a unix socket in a temporary directory (fsync off, WAL minimal: the
  kernel is shut down cleanly afterwards, which writes everything back), loads
  ``scale`` × 100,000 accounts of ``initial_balance`` each and an empty ledger, installs
  the ``amcheck`` extension, vacuums, and stops the server cleanly. The temporary
  directory is removed and the server killed whatever happens.
* ``apps`` is the machine's own PostgreSQL server, unmodified, with PGDATA on the mount,
  listening only on the service address (no unix socket), run as ``postgres`` through
  ``setpriv`` inside its own IPC and PID namespaces (``unshare --ipc --pid --fork``): a
  server killed by a crash or a fence leaves no System V segment behind, and a restarted
  server finds neither a stale segment nor a stale postmaster.pid it would take for a live
  server (the dead postmaster's PID stays in use as an unreaped zombie until the machine's
  init reaps it, which took ≈ 1.5 s here; in its own PID namespace every postmaster is
  PID 1, which PostgreSQL knows to be stale). ``recovery_sync`` picks PostgreSQL's
  ``recovery_init_sync_method``: ``syncfs`` (default) or ``fsync``, which fsyncs every
  file of the data directory before crash recovery (≈ 7 s on the emulated file system
  after a reboot at scale 2, measured while building this). Durability settings are PostgreSQL's defaults (fsync on, synchronous commit), so an
  acknowledged COMMIT has been fsynced through the emulated kernel; after every failover
  the restarted server runs its own crash recovery (WAL replay).
* clients (harness/workloads/postgres_client.py) run in the client namespace; their
  reads are uniform over the accounts, or skewed with ``read_skew`` (a power law over
  ranks scattered through the table, so the hot set is not a hot few pages); ``verify``
  reads back every ledger row any client tried to insert and the accounts' balances, then
  runs pg_amcheck (heap and B-tree index checks) on the database, whatever the scheme.
* ``extra_phases`` measures the server's start-up after the crash (``postgres start-up``:
  from its "starting PostgreSQL" log line to "ready to accept connections", both stamped
  by the server); ``checks`` applies harness/checkers/bank.py and
  harness/checkers/amcheck.py (any pg_amcheck finding makes ``checks.amcheck.ok`` false).

How a transaction enters the history: a transfer is an f ``write`` whose key is its ledger
row (``ledger/c<client>-<seq>``, a fresh key per attempt) and whose value carries the
row's digest (version 1, bytes, sha256 of its canonical text) and the transfer (src, dst,
amount), so the generic acknowledged-write checker judges ledger rows as it judges files;
the bank checker adds the invariants (money conserved, no half transaction).
"""

from __future__ import annotations

import json
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from harness.binaries import pg_bin, pg_tool
from harness.workloads import Service, Workload, WorkloadError
from harness.workloads.clients import ClientGroup, run_to_end, spawn

CLIENT = "harness.workloads.postgres_client"
USER = "postgres"
ROWS_PER_SCALE = 100_000
AMCHECK_TIMEOUT_S = 120.0  # pg_amcheck's bound in the verify phase (scale 10: ≈ 6 s measured)

# Settings of the server the schemes run (durability at PostgreSQL's defaults).
SERVER_SETTINGS = {
    "unix_socket_directories": "",
    "dynamic_shared_memory_type": "sysv",  # in the server's own IPC namespace
    "huge_pages": "off",
    "logging_collector": "off",
    "log_line_prefix": "%m [%p] ",
    "log_timezone": "UTC",
    "log_checkpoints": "on",
    "max_connections": "40",
}
# Extra settings of the temporary server that loads the data set (never crashed).
LOAD_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "synchronous_commit": "off",
    "maintenance_work_mem": "64MB",
    "listen_addresses": "",
}


def _pw():
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        raise WorkloadError(
            "postgres: the machine has no 'postgres' user (install PostgreSQL: run `make` as root)"
        ) from None


def _as_postgres(argv: list[str], pid_ns: bool = False) -> list[str]:
    """argv run as the postgres user in a fresh IPC namespace, and with ``pid_ns`` in a
    fresh PID namespace too (see the module docstring)."""
    ns = ["--ipc", "--pid", "--fork", "--kill-child=SIGKILL"] if pid_ns else ["--ipc"]
    return [
        "unshare",
        *ns,
        "--",
        "setpriv",
        f"--reuid={USER}",
        f"--regid={USER}",
        "--init-groups",
        "--pdeathsig=SIGKILL",
        "--",
        *argv,
    ]


def _settings(d: dict) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        out += ["-c", f"{k}={v}"]
    return out


class Postgres(Workload):
    name = "postgres"
    description = (
        "PostgreSQL (data directory on the emulated FS); psycopg clients transfer "
        "money between accounts and insert ledger rows"
    )
    prepares = True
    # Each run boots a kernel with a cold page cache: at scale 10 the clients' random reads
    # came from the disk at ~12,000 blocks/s in the first second of load and ~300/s ten
    # seconds later (a warmcache run's VMM counters, read once a second).
    warmup_s = 15.0
    defaults = {
        "clients": 4,
        "scale": 10,
        "initial_balance": 1000,
        "read_ratio": 0.5,
        "port": 5432,
        "shared_buffers_mb": 16,
        "connect_timeout_s": 0.5,
        "statement_timeout_s": 2.0,
        "max_ops_per_client": 100_000,
        "recovery_sync": "syncfs",
        "prepare_timeout_s": 600,
        "read_skew": 0.0,
    }

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise WorkloadError(
                f"postgres: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(self.defaults)}"
            )
        self.p = {**self.defaults, **params}
        for k in ("clients", "scale", "initial_balance", "port", "shared_buffers_mb"):
            if not isinstance(self.p[k], int) or self.p[k] <= 0:
                raise WorkloadError(f"postgres: {k} must be a positive integer, got {self.p[k]!r}")
        if self.p["recovery_sync"] not in ("syncfs", "fsync"):
            raise WorkloadError(
                f"postgres: recovery_sync must be syncfs or fsync, got {self.p['recovery_sync']!r}"
            )
        if not 0 <= self.p["read_ratio"] < 1:
            raise WorkloadError(
                f"postgres: read_ratio must be in [0, 1), got {self.p['read_ratio']!r}"
            )
        skew = self.p["read_skew"]
        if (
            isinstance(skew, bool)
            or not isinstance(skew, (int, float))
            or not (math.isfinite(skew) and skew >= 0)
        ):
            raise WorkloadError(
                f"postgres: read_skew must be a number >= 0 (0: uniform), got {skew!r}"
            )

    @property
    def accounts(self) -> int:
        return self.p["scale"] * ROWS_PER_SCALE

    def pgdata(self, svc: Service) -> Path:
        return Path(svc.mount) / "pgdata"

    def log(self, svc: Service) -> Path:
        return svc.workdir / "logs" / "postgres.log"

    # --- prepare: initdb and the data set, on a kernel booted only for it ------------------
    def prepare(self, svc: Service) -> None:
        pw = _pw()
        pg_tool("pg_amcheck")  # the verify phase needs it: say so before loading
        pgdata = self.pgdata(svc)
        pgdata.mkdir(mode=0o700)
        os.chown(pgdata, pw.pw_uid, pw.pw_gid)
        logs = svc.workdir / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / "postgres-prepare.log"
        deadline = time.monotonic() + self.p["prepare_timeout_s"]
        with open(log, "ab") as fh:
            r = subprocess.run(
                _as_postgres(
                    [
                        pg_bin("initdb"),
                        "-D",
                        str(pgdata),
                        "--no-sync",
                        "--data-checksums",
                        "-A",
                        "trust",
                        "-U",
                        USER,
                        "-E",
                        "UTF8",
                        "--locale=C",
                    ]
                ),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=self.p["prepare_timeout_s"],
            )
        if r.returncode != 0:
            raise WorkloadError(f"postgres: initdb failed (status {r.returncode}); see {log.name}")
        with open(pgdata / "pg_hba.conf", "a") as fh:  # the clients' namespace
            fh.write(
                "\n# crashbench clients (198.18.0.0/15 benchmark range)\n"
                "host all all 198.18.0.0/15 trust\n"
            )
        sock = Path(tempfile.mkdtemp(prefix="crashbench-pgsock-"))
        server = None
        try:
            os.chown(sock, pw.pw_uid, pw.pw_gid)
            argv = _as_postgres(
                [
                    pg_bin("postgres"),
                    "-D",
                    str(pgdata),
                    "-k",
                    str(sock),
                    "-p",
                    str(self.p["port"]),
                    *_settings(
                        {
                            **SERVER_SETTINGS,
                            **LOAD_SETTINGS,
                            "unix_socket_directories": str(sock),
                            "shared_buffers": f"{self.p['shared_buffers_mb']}MB",
                        }
                    ),
                ]
            )
            with open(log, "ab") as fh:
                server = subprocess.Popen(
                    argv,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_pdeathsig,
                )
            self._load(sock, server, deadline, log)
            server.send_signal(signal.SIGINT)  # fast shutdown: a clean checkpoint
            try:
                rc = server.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise WorkloadError(
                    "postgres: the loading server did not shut down in time"
                ) from None
            if rc != 0:
                raise WorkloadError(
                    f"postgres: the loading server exited with status {rc}; see {log.name}"
                )
        finally:
            if server is not None and server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
            shutil.rmtree(sock, ignore_errors=True)

    def _load(self, sock: Path, server: subprocess.Popen, deadline: float, log: Path) -> None:
        import psycopg

        conn = None
        while conn is None:
            try:
                conn = psycopg.connect(
                    host=str(sock),
                    port=self.p["port"],
                    user=USER,
                    dbname="postgres",
                    autocommit=True,
                    connect_timeout=5,
                )
            except psycopg.OperationalError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise WorkloadError(
                        f"postgres: the loading server did not start; see {log.name}"
                    ) from None
                time.sleep(0.1)
        n, b = self.accounts, self.p["initial_balance"]
        with conn:
            with conn.transaction():
                conn.execute(
                    "CREATE TABLE accounts (aid integer NOT NULL, balance bigint NOT NULL, "
                    "filler character(84))"
                )
                conn.execute(
                    "INSERT INTO accounts SELECT g, %s, '' FROM generate_series(1, %s) g", (b, n)
                )
                conn.execute("ALTER TABLE accounts ADD PRIMARY KEY (aid)")
                conn.execute(
                    "CREATE TABLE ledger (client integer NOT NULL, seq integer NOT NULL, "
                    "src integer NOT NULL, dst integer NOT NULL, amount integer NOT NULL, "
                    "PRIMARY KEY (client, seq))"
                )
                conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")  # for pg_amcheck
            conn.execute("VACUUM (ANALYZE, FREEZE) accounts")
            conn.execute("CHECKPOINT")

    # --- the service ---------------------------------------------------------------------
    def apps(self, svc: Service) -> list[dict]:
        argv = _as_postgres(
            [
                pg_bin("postgres"),
                "-D",
                str(self.pgdata(svc)),
                "-p",
                str(self.p["port"]),
                *_settings(
                    {
                        **SERVER_SETTINGS,
                        "listen_addresses": svc.ip,
                        "shared_buffers": f"{self.p['shared_buffers_mb']}MB",
                        "recovery_init_sync_method": self.p["recovery_sync"],
                    }
                ),
            ],
            pid_ns=True,
        )
        pw = _pw()
        return [
            {
                "name": "postgres",
                "argv": argv,
                "cwd": "/",
                "env": {"HOME": pw.pw_dir, "USER": USER, "LOGNAME": USER},
                "log": str(self.log(svc)),
            }
        ]

    def _args(self, svc: Service, mode: str, until: float) -> list[str]:
        p = self.p
        return [
            "-m",
            CLIENT,
            mode,
            "--host",
            svc.ip,
            "--port",
            str(p["port"]),
            "--until",
            repr(until),
            "--seed",
            str(svc.seed),
            "--accounts",
            str(self.accounts),
            "--initial-balance",
            str(p["initial_balance"]),
            "--read-ratio",
            str(p["read_ratio"]),
            "--read-skew",
            str(p["read_skew"]),
            "--max-ops",
            str(p["max_ops_per_client"]),
            "--connect-timeout",
            str(p["connect_timeout_s"]),
            "--statement-timeout",
            str(p["statement_timeout_s"]),
        ]

    def wait_ready(self, svc: Service, timeout: float) -> None:
        argv = self._args(svc, "ready", time.monotonic() + timeout)
        rc = run_to_end(
            argv, svc.workdir / "logs" / "postgres-ready.log", svc.client_enter, timeout + 5
        )
        if rc != 0:
            raise WorkloadError(
                f"postgres: the server at {svc.ip}:{self.p['port']} did not "
                f"answer within {timeout:.0f} s; see logs/postgres.log"
            )

    def start_clients(self, svc: Service, until: float) -> ClientGroup:
        hd = svc.history_dir()
        procs, paths = [], []
        for cid in range(self.p["clients"]):
            h = hd / f"client-{cid}.jsonl"
            procs.append(
                spawn(
                    [*self._args(svc, "client", until), "--id", str(cid), "--history", str(h)],
                    svc.workdir / "logs" / f"client-{cid}.log",
                    svc.client_enter,
                )
            )
            paths.append(h)
        return ClientGroup(procs, paths)

    def verify(self, svc: Service, events: list[dict], timeout: float = 60.0) -> Path | None:
        keys = sorted(
            {e["key"] for e in events if e["f"] == "write" and e["type"] == "invoke" and "key" in e}
        )
        kf = svc.workdir / "verify-keys.json"
        kf.write_text(json.dumps(keys))
        h = svc.history_dir() / "verify.jsonl"
        argv = [
            *self._args(svc, "verify", time.monotonic() + timeout),
            "--id",
            str(self.p["clients"]),
            "--history",
            str(h),
            "--keys",
            str(kf),
            "--amcheck",
            pg_tool("pg_amcheck"),
            "--amcheck-timeout",
            str(AMCHECK_TIMEOUT_S),
        ]
        run_to_end(
            argv,
            svc.workdir / "logs" / "verify.log",
            svc.client_enter,
            timeout + AMCHECK_TIMEOUT_S + 10,
        )
        self._starts = startups(self.log(svc))  # read before teardown removes the log
        return h

    def _server_starts(self, svc: Service) -> list[dict]:
        starts = getattr(self, "_starts", None)
        return starts if starts is not None else startups(self.log(svc))

    # --- figures beyond the generic checkers -------------------------------------------------
    def extra_phases(self, svc: Service, events: list[dict]) -> dict[str, float]:
        """{"postgres start-up": seconds} of the first server start after the crash, from
        the server's own log (its timestamps; CLOCK_MONOTONIC crash time mapped to the wall
        clock once); {} when the server never started again."""
        from harness.checkers.common import crash_times

        crash = crash_times(events)["crash_at"]
        if crash is None:
            return {}
        crash_wall = crash + (time.time() - time.monotonic())
        st = self._server_starts(svc)
        after = [s for s in st if s["start"] >= crash_wall - 0.01 and s["ready"] is not None]
        if not after:
            return {}
        return {"postgres start-up": after[0]["ready"] - after[0]["start"]}

    def checks(self, svc: Service, events: list[dict]) -> dict:
        """{"bank": the bank invariants (harness/checkers/bank.py), "amcheck": what
        pg_amcheck found (harness/checkers/amcheck.py), "server_starts": every start of the
        server as its log tells it (wall-clock times, WAL replay seconds)}."""
        from harness.checkers.amcheck import amcheck
        from harness.checkers.bank import bank

        return {
            "bank": bank(events),
            "amcheck": amcheck(events),
            "server_starts": self._server_starts(svc),
        }


def _pdeathsig() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)


_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[(\d+)\] \w+:\s+(.*)$")


def startups(log: Path) -> list[dict]:
    """Every server start in a PostgreSQL log: {"start", "ready" (wall-clock seconds or
    None), "redo_s" (WAL replay's elapsed time as the server reports it, or None),
    "recovery" (whether it ran crash recovery)}."""
    out: list[dict] = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        t = (
            datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
            .replace(tzinfo=timezone.utc)
            .timestamp()
        )
        msg = m.group(3)
        if msg.startswith("starting PostgreSQL"):
            out.append({"start": t, "ready": None, "redo_s": None, "recovery": False})
        elif not out:
            continue
        elif "automatic recovery in progress" in msg:
            out[-1]["recovery"] = True
        elif msg.startswith("redo done at") and out[-1]["redo_s"] is None:
            e = re.search(r"elapsed: ([\d.]+) s", msg)
            out[-1]["redo_s"] = float(e.group(1)) if e else None
        elif "ready to accept connections" in msg and out[-1]["ready"] is None:
            out[-1]["ready"] = t
    return out
