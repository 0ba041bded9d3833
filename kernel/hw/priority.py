"""A kernel process's claim on the host's CPUs: idle while it starts, normal once it serves.

Promises to the host (host.py ``boot(idle=True)``) and to a standby kernel
(systems/orthros/backup.py): ``start_idle`` — the preexec of a process that leads a new
session — puts it, its threads and its children behind every other process on the host
until ``raise_group`` gives its session back the normal share. Nothing else's share moves:
a process that does not lead its own session leaves its group alone.

Why two knobs: SCHED_IDLE weighs a thread only against the threads of its own scheduling
group, and with autogroups (sched(7), ``kernel.sched_autogroup_enabled``) every session is
a group of its own. A kernel starts one session, each client another, so at SCHED_IDLE
alone a re-paired backup's start-up still took a full group's share of the CPU the clients
ran on (docs/PERFORMANCE.md, "Re-pairing, and why the backup starts at idle priority").
The session's autogroup at nice 19 is what makes it yield across sessions; where
autogroups are off, the write is accepted and SCHED_IDLE is what counts.
"""

from __future__ import annotations

import errno
import os
import time

AUTOGROUP = "/proc/self/autogroup"
IDLE_NICE = 19  # the weakest autogroup: weight 15 against a normal group's 1024
RAISE_TIMEOUT_S = 1.0  # the kernel lets an unprivileged process set it once per 100 ms


def start_idle() -> None:
    """Preexec: this process at SCHED_IDLE (its threads and children inherit it) and, if it
    leads its own session, that session's autogroup at IDLE_NICE."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass
    if os.getsid(0) == os.getpid():
        _write_nice(IDLE_NICE)


def raise_group(timeout: float = RAISE_TIMEOUT_S) -> None:
    """This session's autogroup back to nice 0; OSError if the host refuses it. A host
    without autogroups (no such file) has nothing to raise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _write_nice(0, quiet=False)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EAGAIN or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # another process set its group's nice within the last 100 ms


def group_nice(pid: int | str = "self") -> int | None:
    """The nice of ``pid``'s autogroup ("/autogroup-N nice K"); None without autogroups."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _write_nice(nice: int, quiet: bool = True) -> None:
    # os.open/os.write: a preexec runs in a forked child, where no buffered file is safe
    try:
        fd = os.open(AUTOGROUP, os.O_WRONLY)
        try:
            os.write(fd, str(nice).encode())
        finally:
            os.close(fd)
    except OSError:
        if not quiet:
            raise
