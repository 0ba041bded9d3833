"""The `http` workload's clients: locust users (load), and plain httpx readers (ready probe,
cache warm-up, verify).

``load`` runs locust as a library in this process: ``--users`` FastHttpUsers, each
fetching a uniformly chosen file of the manifest, in a closed loop (``--loop closed``: the
next request as soon as the last is answered; after a failure, a back-off of 5 ms
doubling to 50 ms) or every ``--pacing`` seconds (``paced``), with explicit connect and network timeouts and no retries; the run stops by
itself at ``--until`` or after ``--max-requests`` requests, and on SIGTERM. A request
listener writes every request to the history (harness/history.py), one process number per
user: the invoke (f ``read``, key the path, value the file's bytes and sha256 from the
manifest: what was asked for) at the moment the user sent it, and the completion: ``ok``
with the served body's byte count and sha256 on a 200, ``fail`` otherwise (a read has no
effect, so it is never indeterminate). Locust's own statistics only go to the log, as a
summary at the end.

``verify`` reads every file of the manifest once (f ``verify``, same shapes, retrying until
answered or the deadline).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time

from harness.history import Recorder, event

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.005, 0.05  # a closed-loop user's wait after a failure


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def load(a) -> int:
    import gevent
    import numpy as np
    from locust import FastHttpUser, constant, constant_pacing, task
    from locust.env import Environment
    from locust.exception import StopUser

    files = json.loads(open(a.manifest).read())
    rec = Recorder(a.history, 0)
    sent = {"n": 0}

    class Reader(FastHttpUser):
        host = a.url
        wait_time = constant(0) if a.loop == "closed" else constant_pacing(a.pacing)
        connection_timeout = a.connect_timeout
        network_timeout = a.network_timeout
        max_retries = 0

        def on_start(self):
            self.uid = Reader.next_uid
            Reader.next_uid += 1
            self.rng = np.random.default_rng([a.seed, self.uid, 82])
            self.backoff = 0.0

        @task
        def fetch(self):
            if sent["n"] >= a.max_requests or time.monotonic() >= a.until:
                raise StopUser()
            sent["n"] += 1
            f = files[int(self.rng.integers(len(files)))]
            r = self.client.get(
                f["path"],
                name="file",
                headers={"Accept-Encoding": "identity"},
                context={"uid": self.uid, "file": f, "t0": time.monotonic()},
            )
            # a closed loop backs off after a failure, so an outage is not a flood of
            # refused requests that spends the request budget
            self.backoff = (
                0.0
                if r.status_code == 200
                else min(max(2 * self.backoff, BACKOFF_MIN_S), BACKOFF_MAX_S)
            )
            if self.backoff and a.loop == "closed":
                gevent.sleep(self.backoff)

    Reader.next_uid = 0

    def on_request(
        request_type,
        name,
        response_time,
        response_length,
        response=None,
        context=None,
        exception=None,
        **_,
    ):
        t1 = time.monotonic()
        if not context or "uid" not in context:
            return
        f = context["file"]
        rec.write(
            event(
                "invoke",
                context["uid"],
                "read",
                key=f["path"],
                value={"bytes": f["bytes"], "sha256": f["sha256"]},
                time_s=context["t0"],
            )
        )
        status = getattr(response, "status_code", None)
        if exception is None and status == 200:
            body = response.content or b""
            rec.write(
                event(
                    "ok",
                    context["uid"],
                    "read",
                    key=f["path"],
                    value={"status": 200, "bytes": len(body), "sha256": digest(body)},
                    time_s=t1,
                )
            )
        else:
            why = f"HTTP {status}" if status else f"{type(exception).__name__}: {exception}"
            rec.write(
                event("fail", context["uid"], "read", key=f["path"], error=why[:200], time_s=t1)
            )

    env = Environment(user_classes=[Reader])
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    gevent.signal_handler(signal.SIGTERM, runner.quit)
    runner.start(a.users, spawn_rate=max(a.users * 20, 1))
    gevent.spawn_later(max(0.0, a.until - time.monotonic()), runner.quit)

    def watch_budget():
        while sent["n"] < a.max_requests:
            gevent.sleep(0.1)
        runner.quit()

    gevent.spawn(watch_budget)
    runner.greenlet.join()
    s = env.stats.total
    print(
        f"locust: {s.num_requests} requests, {s.num_failures} failures, "
        f"median {s.median_response_time} ms, 95th {s.get_response_time_percentile(0.95)} ms",
        flush=True,
    )
    rec.close()
    return 0


def _get(http, path: str):
    """(status or None, body or None, error or None)."""
    import httpx

    try:
        r = http.get(path, headers={"Accept-Encoding": "identity"})
        return r.status_code, r.content, None
    except httpx.HTTPError as e:
        return None, None, f"{type(e).__name__}: {e}"[:200]


def _client(a):
    import httpx

    return httpx.Client(
        base_url=a.url, timeout=httpx.Timeout(a.network_timeout, connect=a.connect_timeout)
    )


def ready(a) -> int:
    files = json.loads(open(a.manifest).read())
    with _client(a) as http:
        while time.monotonic() < a.until:
            status, _, _ = _get(http, files[0]["path"])
            if status == 200:
                return 0
            time.sleep(0.02)
    return 1


def warm(a) -> int:
    """Read the whole tree once (no history: this is deployment, not load)."""
    files = json.loads(open(a.manifest).read())
    with _client(a) as http:
        for f in files:
            status, body, err = _get(http, f["path"])
            if status != 200 or digest(body) != f["sha256"]:
                print(f"warm: {f['path']}: {err or status}", file=sys.stderr)
                return 1
            if time.monotonic() >= a.until:
                return 1
    return 0


def verify(a) -> int:
    files = json.loads(open(a.manifest).read())
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    missing = 0
    with Recorder(a.history, a.users) as rec, _client(a) as http:
        for f in files:
            while True:
                op = rec.invoke("verify", f["path"], {"bytes": f["bytes"], "sha256": f["sha256"]})
                status, body, err = _get(http, f["path"])
                if status == 200:
                    rec.complete(
                        "ok", op, value={"status": 200, "bytes": len(body), "sha256": digest(body)}
                    )
                    break
                rec.complete("fail", op, value={}, error=err or f"HTTP {status}")
                if stop["now"] or time.monotonic() >= a.until:
                    missing += 1
                    break
                time.sleep(0.05)
    return 1 if missing else 0


def arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m harness.workloads.http_client")
    ap.add_argument("mode", choices=("load", "ready", "warm", "verify"))
    ap.add_argument("--url", required=True)
    ap.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC deadline")
    ap.add_argument("--manifest", required=True, help="JSON list of {path, bytes, sha256}")
    ap.add_argument("--history")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument(
        "--loop",
        choices=("closed", "paced"),
        default="closed",
        help="closed: the next request as soon as the last is answered",
    )
    ap.add_argument(
        "--pacing", type=float, default=0.02, help="paced: seconds between a user's requests"
    )
    ap.add_argument("--max-requests", type=int, default=200_000)
    ap.add_argument("--connect-timeout", type=float, default=0.2)
    ap.add_argument("--network-timeout", type=float, default=2.0)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = arguments().parse_args(argv)
    return {"load": load, "ready": ready, "warm": warm, "verify": verify}[a.mode](a)


if __name__ == "__main__":
    sys.exit(main())
