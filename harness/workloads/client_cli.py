"""What the workloads' client processes (files_client, postgres_client) share: the stop
flag, the options every one of them takes, and the dispatch of its three modes.

Promises to those clients: ``arguments(prog, connect_timeout)`` is a parser with the
options common to every client (mode ``client``/``verify``/``ready``, the deadline, the
history file, the client id and seed, the read ratio, the operation bound, the connect
timeout, the retry backoff and the verify keys); a client adds its own. ``run(a, ...)``
calls the ``ready`` check without a history, or records the ``verify`` pass or the load
into ``--history`` under ``--id``. ``Stop`` is set by SIGTERM: a client stops after the
operation in flight is recorded.
"""

from __future__ import annotations

import argparse
import signal
from typing import Callable

from harness.history import Recorder


class Stop:
    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        self.requested = True


def arguments(prog: str, connect_timeout: float) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("mode", choices=("client", "verify", "ready"))
    ap.add_argument("--until", type=float, required=True, help="CLOCK_MONOTONIC deadline")
    ap.add_argument("--history")
    ap.add_argument("--id", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-ratio", type=float, default=0.5)
    ap.add_argument("--max-ops", type=int, default=100_000)
    ap.add_argument("--connect-timeout", type=float, default=connect_timeout)
    ap.add_argument("--backoff-min", type=float, default=0.005)
    ap.add_argument("--backoff-max", type=float, default=0.05)
    ap.add_argument("--keys", help="verify: JSON list of the keys to read back")
    return ap


def run(a: argparse.Namespace, ready: Callable, verify: Callable, load: Callable) -> int:
    """The client's exit status: ``ready(a)``; ``verify(a, rec, stop)``; or 0 after
    ``load(a, rec, stop)`` ran to its end."""
    if a.mode == "ready":
        return ready(a)
    stop = Stop()
    with Recorder(a.history, a.id) as rec:
        if a.mode == "verify":
            return verify(a, rec, stop)
        load(a, rec, stop)
    return 0
