"""Sampling the running kernel's own counters during a trial, into the trial's history.

Promises to harness/driver.py and the checkers (harness/checkers/cachehits.py): while
running, a thread asks the scheme's active kernel for its ``status`` (kernel/hw/control.py)
every INTERVAL_S and records the page cache's cumulative ``hits`` and ``misses`` with the
kernel's pid as a nemesis ``info`` event of f ``kernel-counters``; a kernel that does not
answer (dead, not yet serving) is skipped, never waited for beyond TIMEOUT_S. ``pause``
stops the asking — the driver pauses it from the injection until the scheme's report, so
no request reaches a kernel while a recovery is under way — and ``resume`` starts again.
"""

from __future__ import annotations

import threading
from pathlib import Path

from harness import history
from harness.checkers.cachehits import SAMPLE

INTERVAL_S = 0.1
TIMEOUT_S = 0.5


class CounterSampler:
    def __init__(self, host, scheme, path: Path):
        self.host, self.scheme = host, scheme
        self._rec = history.Recorder(path, history.NEMESIS)
        self._stop, self._running = threading.Event(), threading.Event()
        self._asking = threading.Lock()  # held while a request is out
        self._thread = threading.Thread(target=self._loop, name="kernel-counters", daemon=True)

    def start(self) -> "CounterSampler":
        self._running.set()
        self._thread.start()
        return self

    def pause(self) -> None:
        """Stop asking; returns once no request is out."""
        self._running.clear()
        with self._asking:
            pass

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TIMEOUT_S * 4)
        self._rec.close()

    def _loop(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._running.wait()
            with self._asking:
                if self._running.is_set() and not self._stop.is_set():
                    self.sample()

    def sample(self) -> dict | None:
        """One sample of the active kernel, recorded and returned (None: no answer)."""
        part = self.scheme.active
        try:
            reply = self.host.control(part, {"cmd": "status"}, timeout=TIMEOUT_S)
        except (OSError, ValueError, KeyError):
            return None  # dead, booting or replaced: the next tick asks again
        c = reply.get("cache") if isinstance(reply, dict) else None
        if not (reply.get("ok") and isinstance(c, dict)):
            return None
        value = {"partition": part, "pid": reply["pid"], "hits": c["hits"], "misses": c["misses"]}
        return self._rec.write(history.event("info", history.NEMESIS, SAMPLE, value=value))
