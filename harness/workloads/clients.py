"""Client processes of a workload: launched in the client namespace, stopped, and watched.

Promises to the workloads and the driver: every client is a real process in its own
session, entered into the client network namespace before it executes, and killed by the
kernel if the driver dies (parent-death signal), so an interrupted run leaves no client
behind (``launch``: in a process of the service's pool when it has one, harness/workloads/
pool.py, where each client still runs alone in its process). ``stop()`` asks politely (SIGTERM: a client finishes recording its current
operation), then kills. ``all_ok_after(t)`` reads the clients' history files — the
driver's only way to learn that service is back, as the clients saw it: every client has
had an operation invoked at or after t answered ``ok``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _preexec(enter: Callable[[], None] | None, parent: int) -> Callable[[], None]:
    def run() -> None:
        if enter is not None:
            enter()
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the driver died before the signal was armed
            os._exit(1)

    return run


def spawn(argv: Sequence[str], log: Path, enter: Callable[[], None] | None) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_preexec(enter, os.getpid()),
        )


def run_to_end(
    argv: Sequence[str], log: Path, enter: Callable[[], None] | None, timeout: float
) -> int:
    """Run one client (readiness probe, verify pass) to its end; killed past `timeout`,
    which then reads as exit status -1."""
    return _to_end(spawn(argv, log, enter), timeout)


def launch(svc, module: str, args: Sequence[str], log: Path):
    """A client running ``module``'s ``main(args)``: in a process of the service's pool
    (harness/workloads/pool.py) when it has one, else in a process of its own."""
    if svc.pool is not None:
        return svc.pool.spawn(list(args), log)
    return spawn(["-m", module, *args], log, svc.client_enter)


def launch_to_end(svc, module: str, args: Sequence[str], log: Path, timeout: float) -> int:
    """``launch``, then as ``run_to_end``."""
    return _to_end(launch(svc, module, args, log), timeout)


def _to_end(p, timeout: float) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return -1


class ClientGroup:
    def __init__(self, procs: list[subprocess.Popen], histories: list[Path]):
        self.procs, self.histories = procs, histories

    def alive(self) -> int:
        return sum(1 for p in self.procs if p.poll() is None)

    def all_ok_after(self, t: float) -> bool:
        """Every client process has had an operation invoked at or after monotonic time t
        answered ``ok``."""
        return all(_ok_after(h, t) for h in self.histories)

    def back_at(self, t: float) -> float | None:
        """When the last client to be answered again after monotonic time t was (the ok
        of its first operation invoked at or after t), as the clients recorded it; None
        when a client's is not in the end of its history that is read."""
        times = [_first_ok_after(h, t) for h in self.histories]
        return None if not times or None in times else max(times)

    def stop(self, timeout: float = 5.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def failed(self) -> list[str]:
        """Clients that exited with an error (their log says why)."""
        return [
            f"client {i} exited with status {p.returncode}"
            for i, p in enumerate(self.procs)
            if p.returncode not in (None, 0, -signal.SIGTERM)
        ]


def _ok_after(path: Path, t: float) -> bool:
    """Every process of the history file has an ``ok`` operation invoked at or after t
    (a reply to an older request may come from a server that is dying: the definition of
    downtime in docs/METRICS.md)."""
    return _first_ok_after(path, t) is not None


def _first_ok_after(path: Path, t: float) -> float | None:
    """The latest, over the processes of the history file, of each one's first ``ok`` of
    an operation invoked at or after t (None: a process has none in the end that is read).
    A process runs one operation at a time, so an ``ok`` belongs to that process's latest
    ``invoke``. Where the end read starts after t, an earlier ok may be cut off: the time
    found is then later than the true one, never earlier."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))  # the newest events are at the end
            tail = fh.read().split(b"\n")
    except FileNotFoundError:
        return None
    invoked: dict = {}
    back: dict = {}
    for line in tail:
        try:
            e = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # the cut first line, or one being written
        if e.get("f") == "verify":
            continue
        p = e.get("process")
        if e.get("type") == "invoke":
            invoked[p] = e["time"]
        elif e.get("type") == "ok" and invoked.get(p, -1.0) >= t and back.get(p) is None:
            back[p] = e["time"]
        back.setdefault(p, None)
    if not back or None in back.values():
        return None
    return max(back.values())
