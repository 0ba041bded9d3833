"""The kernel process's Python heap, as the heartbeat sees it.

Promises to the kernel daemon (kernel/core/kernel.py) and to whoever reads its ``status``:

* ``settle_heap()`` freezes every object the process has out of all later collections
  (``gc.freeze``), and returns how many objects are frozen;
* ``GcClock`` times every full (generation 2) collection of the process on
  CLOCK_MONOTONIC — ``status()`` gives the collections per generation, the frozen
  objects, and the full collections timed so far with their total and longest duration.

Why it matters: a collection runs holding the interpreter lock, so while it walks the heap
no other thread of the kernel runs — the heartbeat thread included. A full collection walks
every tracked object not frozen.
"""

from __future__ import annotations

import gc
import time


def settle_heap() -> int:
    """Freeze what boot made and the kernel keeps out of every later collection."""
    # No collection first: at the end of boot one found nothing to free (0 unreachable
    # objects) and cost 9-31 ms (young generations) or ≈ 50 ms (all) of a boot that the
    # reboot scheme's recovery waits for; a freeze only moves the generations' lists.
    gc.freeze()
    return gc.get_freeze_count()


class GcClock:
    """A clock around the process's full collections (a gc.callbacks entry)."""

    def __init__(self):
        self.count, self.total_ns, self.longest_ns = 0, 0, 0
        self._start = 0

    def install(self) -> "GcClock":
        gc.callbacks.append(self._on_collection)
        return self

    def uninstall(self) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.monotonic_ns()
            return
        took = time.monotonic_ns() - self._start
        self.count += 1
        self.total_ns += took
        self.longest_ns = max(self.longest_ns, took)

    def status(self) -> dict:
        return {
            "collections": [g["collections"] for g in gc.get_stats()],
            "frozen": gc.get_freeze_count(),
            "full_timed": self.count,
            "full_total_ms": self.total_ns / 1e6,
            "full_longest_ms": self.longest_ns / 1e6,
        }
