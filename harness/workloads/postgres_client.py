"""The `postgres` workload's client: a psycopg 3 user of the bank, recording every
transaction (harness/history.py).

A pgbench-like mix on one connection: with probability ``--read-ratio`` a balance lookup
of an account (f ``read``; uniform over the accounts, or with ``--read-skew`` s > 0 drawn
from a power law of exponent s over ranks, the ranks scattered over the whole table: see
``skewed_account``), otherwise a transfer (f ``write``): in one transaction,
debit one random account, credit another (the lower account id first, so two clients never
deadlock) and insert the transfer's row into the insert-only ledger. Each transfer attempt
has its own ledger key ``ledger/c<client>-<seq>``; its value says what was sent: version 1,
the row's canonical text's byte count and sha256, and src, dst, amount.

Outcomes: ``ok`` when COMMIT was answered with success; ``fail`` when the transaction
certainly did not commit (no connection, any error before COMMIT was sent, an ERROR
answered to the COMMIT); ``info`` when the COMMIT was sent and no answer came (the
connection broke, or the client-side timeout fired) or the answer was a FATAL or PANIC —
it may or may not have committed.
Timeouts: connecting is bounded by ``--connect-timeout``, every transaction by
``--statement-timeout`` (server side through ``statement_timeout``, client side by an
interval timer, because a dead server answers nothing). After a failed attempt the client
reconnects with a bounded exponential backoff. Bounded in time (``--until``) and count
(``--max-ops``); SIGTERM stops it after the operation in flight is recorded.

``verify`` records, for every ledger key named in ``--keys``, a ``verify`` read of the row
(``{"bytes", "sha256"}`` of its canonical text, or ``{"absent": true}``) and one keyless
``verify`` of the bank: the number of accounts, their initial balance, the sum of all
balances and every account whose balance differs from the initial one. A corrupted
database (an error of SQLSTATE class XX, e.g. a page whose checksum fails) is not retried:
the reads that met it are recorded ``fail`` with the server's error. With ``--amcheck``
(the path of pg_amcheck) it then runs PostgreSQL's own checker on the database (heap
tables, B-tree indexes with ``--heapallindexed``) and records one keyless ``verify`` of
``{"check": "amcheck"}``: ``ok`` with pg_amcheck's exit status and its findings (each a
"relation: message" line, as pg_amcheck printed them) when it checked (status 0: none;
2: corruption found), ``fail`` with its error when it could not check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psycopg

from harness.history import Recorder
from harness.workloads import client_cli
from harness.workloads.client_cli import Stop


class ClientTimeout(Exception):
    """The client-side bound of a connect or a transaction expired."""


def _alarm(*_):
    raise ClientTimeout("client-side timeout")


class deadline:
    """Raise ClientTimeout in this process after `seconds` (SIGALRM interval timer)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


def row_text(client: int, seq: int, src: int, dst: int, amount: int) -> bytes:
    return f"{client},{seq},{src},{dst},{amount}".encode()


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# A prime larger than any int4 account id: rank -> (rank * SCATTER) mod n is a permutation
# of the accounts that puts neighbouring ranks far apart, so the hot keys of a skewed mix
# are spread over the whole table, not packed into its first few pages.
SCATTER = 2_147_483_659


def skewed_account(u: float, n: int, s: float) -> int:
    """The account id (1..n) of a uniform draw u in [0, 1) under a power law of exponent s
    over ranks 1..n (rank r has probability ~ r^-s: the continuous law's inverse CDF, cut
    to whole ranks), the ranks scattered by SCATTER."""
    if s == 1.0:
        x = (n + 1.0) ** u
    else:
        x = (1.0 + u * ((n + 1.0) ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
    rank = min(max(int(x), 1), n)
    return (rank - 1) * SCATTER % n + 1


class Bank:
    def __init__(self, a, rec: Recorder | None, stop: Stop):
        self.a, self.rec, self.stop = a, rec, stop
        self.rng = np.random.default_rng([a.seed, a.id, 11])
        self.conn: psycopg.Connection | None = None
        self.seq = 0
        self.ops = 0

    # --- connection ------------------------------------------------------------------------
    def connect(self) -> psycopg.Connection:
        if self.conn is None:
            ms = int(self.a.statement_timeout * 1000)
            with deadline(self.a.connect_timeout):
                self.conn = psycopg.connect(
                    host=self.a.host,
                    port=self.a.port,
                    user="postgres",
                    dbname="postgres",
                    connect_timeout=max(2, int(self.a.connect_timeout + 1)),
                    options=f"-c statement_timeout={ms}",
                    application_name=f"crashbench-{self.a.id}",
                )
        return self.conn

    def drop(self) -> None:
        c, self.conn = self.conn, None
        if c is not None:
            try:
                with deadline(0.2):
                    c.close()
            except Exception:  # noqa: BLE001 - a broken connection is dropped anyway
                pass

    # --- the load ----------------------------------------------------------------------------
    def done(self) -> bool:
        return self.stop.requested or self.ops >= self.a.max_ops or time.monotonic() >= self.a.until

    def run(self) -> None:
        backoff = self.a.backoff_min
        while not self.done():
            if self.rng.random() < self.a.read_ratio:
                ok = self.read()
            else:
                ok = self.transfer()
            self.ops += 1
            if ok:
                backoff = self.a.backoff_min
            else:
                time.sleep(backoff)
                backoff = min(backoff * 2, self.a.backoff_max)

    def account(self) -> int:
        return int(self.rng.integers(1, self.a.accounts + 1))

    def read_account(self) -> int:
        if self.a.read_skew == 0:
            return self.account()  # the uniform mix, draw for draw as before
        return skewed_account(float(self.rng.random()), self.a.accounts, self.a.read_skew)

    def read(self) -> bool:
        aid = self.read_account()
        op = self.rec.invoke("read", f"account/{aid}")
        try:
            with deadline(self.a.statement_timeout):
                conn = self.connect()
                row = conn.execute("SELECT balance FROM accounts WHERE aid = %s", (aid,)).fetchone()
                conn.rollback()
        except (psycopg.Error, ClientTimeout, OSError) as e:
            self.after_error(e)
            self.rec.complete("fail", op, error=_why(e))
            return False
        self.rec.complete("ok", op, value={"balance": None if row is None else int(row[0])})
        return True

    def transfer(self) -> bool:
        self.seq += 1
        src, dst = self.account(), self.account()
        while dst == src:
            dst = self.account()
        amount = int(self.rng.integers(1, 100))
        body = row_text(self.a.id, self.seq, src, dst, amount)
        op = self.rec.invoke(
            "write",
            f"ledger/c{self.a.id}-{self.seq}",
            {
                "version": 1,
                "bytes": len(body),
                "sha256": digest(body),
                "src": src,
                "dst": dst,
                "amount": amount,
            },
        )
        committing = False
        try:
            with deadline(self.a.statement_timeout):
                conn = self.connect()
                # the lower account id first: concurrent transfers lock in one order
                for aid, delta in sorted(((src, -amount), (dst, amount))):
                    conn.execute(
                        "UPDATE accounts SET balance = balance + %s WHERE aid = %s", (delta, aid)
                    )
                conn.execute(
                    "INSERT INTO ledger (client, seq, src, dst, amount) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (self.a.id, self.seq, src, dst, amount),
                )
                committing = True
                conn.commit()
        except (psycopg.Error, ClientTimeout, OSError) as e:
            unknown = committing and not rolled_back(e)
            self.after_error(e)
            self.rec.complete("info" if unknown else "fail", op, error=_why(e))
            return False
        self.rec.complete("ok", op)
        return True

    def after_error(self, e: Exception) -> None:
        """Keep a connection that answered with an error (after a rollback); drop one that
        broke or timed out."""
        if (
            isinstance(e, psycopg.DatabaseError)
            and not isinstance(e, psycopg.OperationalError)
            and self.conn is not None
            and not self.conn.broken
        ):
            try:
                with deadline(self.a.statement_timeout):
                    self.conn.rollback()
                return
            except (psycopg.Error, ClientTimeout, OSError):
                pass
        self.drop()


def rolled_back(e: Exception) -> bool:
    """An error answered to COMMIT with severity ERROR: the server rolled the transaction
    back. Anything else — no answer (broken connection, timeout), or a FATAL or PANIC (the
    session or the server died, e.g. a PANIC on the WAL's fdatasync, after which the commit
    record may well be on disk) — leaves the outcome unknown."""
    return isinstance(e, psycopg.DatabaseError) and e.diag.severity_nonlocalized == "ERROR"


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def verify(a, rec: Recorder, stop: Stop) -> int:
    """The bank's read-back, then (with --amcheck) PostgreSQL's own checker; 1 if either
    could not be made or found the database corrupted."""
    status = verify_bank(a, rec, stop)
    if a.amcheck:
        status = max(status, verify_amcheck(a, rec))
    return status


def corrupted(e: Exception) -> bool:
    """An error of SQLSTATE class XX (data_corrupted, index_corrupted, internal_error): the
    database itself is at fault, so asking again will not help."""
    return isinstance(e, psycopg.Error) and (e.sqlstate or "").startswith("XX")


def verify_bank(a, rec: Recorder, stop: Stop) -> int:
    """Read back the ledger rows named in --keys and the bank's balances (retrying the
    connection until the deadline); 1 if the reads could not be made."""
    keys = json.loads(open(a.keys).read())
    b = Bank(a, None, stop)
    while True:
        try:
            with deadline(max(30.0, a.statement_timeout)):
                conn = b.connect()
                rows = conn.execute("SELECT client, seq, src, dst, amount FROM ledger").fetchall()
                total, n = conn.execute("SELECT sum(balance), count(*) FROM accounts").fetchone()
                changed = conn.execute(
                    "SELECT aid, balance FROM accounts WHERE balance <> %s ORDER BY aid",
                    (a.initial_balance,),
                ).fetchall()
                conn.rollback()
            break
        except (psycopg.Error, ClientTimeout, OSError) as e:
            b.drop()
            if stop.requested or time.monotonic() >= a.until or corrupted(e):
                what = "the database is corrupted" if corrupted(e) else "no answer from the server"
                print(f"verify: {what}: {_why(e)}", file=sys.stderr)
                for k in keys:
                    rec.complete("fail", rec.invoke("verify", k), error=_why(e))
                rec.complete("fail", rec.invoke("verify", value={"check": "bank"}), error=_why(e))
                return 1
            time.sleep(0.1)
    found = {f"ledger/c{c}-{s}": row_text(c, s, src, dst, amt) for c, s, src, dst, amt in rows}
    for k in keys:
        op = rec.invoke("verify", k)
        body = found.get(k)
        rec.complete(
            "ok",
            op,
            value={"absent": True}
            if body is None
            else {"bytes": len(body), "sha256": digest(body)},
        )
    op = rec.invoke("verify", value={"check": "bank"})
    rec.complete(
        "ok",
        op,
        value={
            "check": "bank",
            "accounts": int(n),
            "initial_balance": a.initial_balance,
            "sum": int(total),
            "ledger_rows": len(rows),
            "changed": [[int(x), int(y)] for x, y in changed],
        },
    )
    b.drop()
    return 0


def verify_amcheck(a, rec: Recorder) -> int:
    """pg_amcheck on the database (see the module docstring); 1 unless it found nothing."""
    op = rec.invoke("verify", value={"check": "amcheck"})
    argv = [
        a.amcheck,
        "--host",
        a.host,
        "--port",
        str(a.port),
        "--username",
        "postgres",
        "--no-password",
        "--database",
        "postgres",
        "--heapallindexed",
    ]
    env = dict(
        os.environ,
        PGCONNECT_TIMEOUT=str(max(2, int(a.connect_timeout + 1))),
        PGAPPNAME="crashbench-amcheck",
    )
    try:
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=a.amcheck_timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        rec.complete("fail", op, error=_why(e))
        return 1
    if p.returncode not in (0, 2):  # 1: it could not check (no server, no extension)
        said = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()
        rec.complete(
            "fail",
            op,
            error=f"pg_amcheck exited with status {p.returncode}: " + " / ".join(said[:3])[:300],
        )
        return 1
    found = amcheck_findings(p.stdout)
    if p.returncode == 2 and not found:  # corruption reported in a shape not parsed above
        found = [f"pg_amcheck exited with status 2: {p.stdout.strip()[:300]!r}"]
    rec.complete("ok", op, value={"check": "amcheck", "status": p.returncode, "findings": found})
    return 0 if p.returncode == 0 else 1


def amcheck_findings(out: str, limit: int = 100) -> list[str]:
    """pg_amcheck's report, one finding per "relation…:" header with its indented message
    lines joined: 'heap table "postgres.public.accounts", block 3, offset 7: <message>'."""
    found: list[str] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        if line[:1].isspace() and found:
            found[-1] += (" " if found[-1].endswith(":") else " / ") + " ".join(line.split())
        else:
            found.append(line.strip())
    return found[:limit]


def ready(a) -> int:
    """Exit 0 once the server answers a query, 1 at the deadline."""
    b = Bank(a, None, Stop())
    while time.monotonic() < a.until:
        try:
            with deadline(max(a.connect_timeout, 1.0)):
                b.connect().execute("SELECT 1").fetchone()
            b.drop()
            return 0
        except (psycopg.Error, ClientTimeout, OSError):
            b.drop()
            time.sleep(0.05)
    return 1


def arguments() -> argparse.ArgumentParser:
    ap = client_cli.arguments("python -m harness.workloads.postgres_client", connect_timeout=0.5)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=5432)
    ap.add_argument("--accounts", type=int, required=True)
    ap.add_argument("--initial-balance", type=int, default=1000)
    ap.add_argument("--statement-timeout", type=float, default=2.0)
    ap.add_argument("--read-skew", type=float, default=0.0)
    ap.add_argument("--amcheck", help="verify: pg_amcheck's path (run it after the read-back)")
    ap.add_argument("--amcheck-timeout", type=float, default=300.0)
    return ap


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGALRM, _alarm)
    return client_cli.run(
        arguments().parse_args(argv), ready, verify, lambda a, rec, stop: Bank(a, rec, stop).run()
    )


if __name__ == "__main__":
    sys.exit(main())
