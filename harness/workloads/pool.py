"""Client processes kept across the faults of one machine, each running one client at a time.

Promises to the workloads (harness/workloads/clients.py ``launch``) and to a campaign's
fast faults (harness/campaign/session.py): a ``ClientPool`` keeps real processes in the
client network namespace (entered before they execute, killed by the kernel with their
starter: parent-death signal) that have the workload's client module (``Workload.
client_module``) loaded; ``spawn(args, log)`` runs that module's ``main(args)`` in an idle
one (a new one when none is idle) and returns a handle with what the driver uses of a
``subprocess.Popen``: ``poll``, ``wait``, ``send_signal``, ``kill``, ``returncode``, ``pid``.
A run's output goes to its own log; SIGTERM stops the run as it stops a client process
(client_cli ``Stop``), and is ignored between runs; a run that is killed takes its process
with it (the next run gets a new one). The client is the same code in the same namespace,
only not paid for again: starting an interpreter and importing the client's libraries took
≈ 0.6 s a client at each fault's warm-up and again at its verify. ``close()`` ends every
process (also on an error path).

Run as ``python -m harness.workloads.pool MODULE``: read one JSON command a line on stdin
(``{"args": [...], "log": path}``), answer ``exit N`` a line on the descriptor that was
stdout, until stdin ends.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from harness.workloads.clients import _preexec


class PoolError(RuntimeError):
    """A pooled client process could not be started or reached."""


class Worker:
    """One pooled process; ``busy`` while a run of it is in progress."""

    def __init__(self, module: str, log: Path, enter: Callable[[], None] | None):
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, module],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=fh,
                start_new_session=True,
                preexec_fn=_preexec(enter, os.getpid()),
            )
        self.busy = False
        self.ended = False  # killed and reaped: its pipes are closed

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, args: list[str], log: Path) -> None:
        try:
            self.proc.stdin.write((json.dumps({"args": args, "log": str(log)}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as e:
            raise PoolError(f"pooled client {self.proc.pid} cannot be reached: {e}") from None
        self.busy = True

    def end(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.ended = True
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Run:
    """One client run in a pooled process, as the driver sees a client process."""

    def __init__(self, worker: Worker):
        self.w = worker
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.w.proc.pid

    def poll(self) -> int | None:
        return self.wait(0.0, raise_timeout=False)

    def wait(self, timeout: float | None = None, raise_timeout: bool = True) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.w.ended:  # the pool was closed under it (a trial's error path)
            self.returncode = self.w.proc.returncode
            return self.returncode
        out = self.w.proc.stdout
        ready, _, _ = select.select([out], [], [], timeout)
        if not ready:
            if raise_timeout:
                raise subprocess.TimeoutExpired(f"pooled client {self.pid}", timeout)
            return None
        line = out.readline()
        if line.startswith(b"exit "):
            self.returncode = int(line.split()[1])
            self.w.busy = False
        else:  # the process died mid-run: its status is the run's
            self.returncode = self.w.proc.wait()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.w.alive():
            self.w.proc.send_signal(sig)

    def kill(self) -> None:
        self.w.end()
        if self.returncode is None:
            self.returncode = self.w.proc.returncode


class ClientPool:
    def __init__(self, module: str, logdir: Path, enter: Callable[[], None] | None):
        self.module, self.logdir, self.enter = module, logdir, enter
        self.workers: list[Worker] = []

    def _new(self) -> Worker:
        w = Worker(self.module, self.logdir / f"pool-{len(self.workers)}.log", self.enter)
        self.workers.append(w)
        return w

    def spawn(self, args: list[str], log: Path) -> Run:
        self.workers = [w for w in self.workers if w.alive()]
        w = next((w for w in self.workers if not w.busy and w.alive()), None) or self._new()
        w.run(args, log)
        return Run(w)

    def close(self) -> None:
        for w in self.workers:
            w.end()
        self.workers = []


# --- the pooled process -----------------------------------------------------------------------
def _idle(signum, frame) -> None:
    """SIGTERM between runs: a stop that came after its run ended; nothing to stop."""


def serve(module: str) -> int:
    signal.signal(signal.SIGTERM, _idle)
    main = importlib.import_module(module).main
    answer = os.dup(1)
    for line in sys.stdin:
        cmd = json.loads(line)
        fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            rc = main(cmd["args"])
        except SystemExit as e:  # argparse's refusal, a client's sys.exit
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001 - a client's crash is its run's status, as a process's
            import traceback

            traceback.print_exc()
            rc = 1
        finally:
            signal.signal(signal.SIGTERM, _idle)
            sys.stdout.flush()
            sys.stderr.flush()
        os.write(answer, f"exit {rc or 0}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
