"""The host scheduler's accounting of a process's threads (/proc/<pid>/task/<tid>/schedstat).

Promises to the heartbeat watcher (mailbox.py) and to the harness's CPU accounting
(harness/cpuuse.py): ``threads(pid)`` is one ``Thread`` per thread of process ``pid``:
the nanoseconds it ran on a CPU and those it waited on a run queue while runnable, and
with ``names`` its name (comm); [] once the process is gone. A thread that ends between
the listing and the read is left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Thread:
    run_ns: int
    wait_ns: int
    name: str = ""


def threads(pid: int, names: bool = False) -> list[Thread]:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out = []
    for tid in tids:
        task = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{task}/schedstat", "rb") as f:
                run, wait = (int(x) for x in f.read().split()[:2])
            name = ""
            if names:
                with open(f"{task}/comm", "rb") as f:
                    name = f.read().strip().decode(errors="replace")
        except (OSError, ValueError):
            continue  # the thread ended between the listing and the read
        out.append(Thread(run, wait, name))
    return out
