"""Where a deployment's CPU time went during a window, by role.

Promises to harness/overhead.py (definitions: docs/METRICS.md, "CPU by role"): ``roles(host,
active, clients)`` names the processes of a running deployment — the active kernel (its
heartbeat thread apart, found by its name kernel.core.kernel.HEARTBEAT_THREAD), the apps of
the active partition (every other member of its process set), every other partition's
processes (a standby backup kernel and its helpers), and the workload's clients with their
descendants. ``sample(roles, vmm_region)`` reads the time each of their threads has run on
a CPU — the scheduler's own accounting in /proc/<pid>/task/<tid>/schedstat, nanoseconds,
the clock behind CLOCK_THREAD_CPUTIME_ID — and sums it per role; a warm-cache VMM runs
inline on the kernel's threads, so the wall time its entry points counted in its region
(kernel/hw/vmm.py, ``busy_ns``) moves from the kernel's role to VMM. ``cores(before, after,
seconds)`` is CPU-seconds per second of the window: 1.0 is one core kept busy.

What it cannot see: a thread or process that ends inside the window takes its time with
it (undercounted); work the host kernel does outside these threads (interrupts, the FUSE
device's queues) is nobody's. The VMM's figure is wall time inside its calls, so a call
preempted on the way counts the wait too: an upper bound of its CPU time.
"""

from __future__ import annotations

import os
from typing import Iterable

from kernel.core.kernel import HEARTBEAT_THREAD
from kernel.hw import schedstat

KERNEL, HEARTBEAT, VMM, APPS, STANDBY, CLIENTS = (
    "kernel",
    "heartbeat",
    "vmm",
    "apps",
    "standby",
    "clients",
)
ROLES = (KERNEL, HEARTBEAT, VMM, APPS, STANDBY, CLIENTS)
MACHINERY = (HEARTBEAT, VMM, STANDBY)  # what exists only because of a scheme
ON_ACTIVE = (HEARTBEAT, VMM)  # the machinery that runs on the active partition
ACTIVE = (KERNEL, HEARTBEAT, VMM, APPS)  # what runs on the active partition's CPUs


def roles(host, active: int, clients: Iterable[int]) -> dict[str, list[int]]:
    """{role: pids} of a deployment; the KERNEL role is the active kernel's pid alone
    (its HEARTBEAT thread is told apart by ``sample``)."""
    from kernel.hw.procset import ProcError, ProcessSet

    out: dict[str, list[int]] = {r: [] for r in ROLES}
    for part, kp in host.kernels.items():
        try:
            members = ProcessSet(host.tag, part, create=False).pids()
        except ProcError:
            members = []
        pids = sorted({kp.pid, *members})
        if part == active:
            out[KERNEL].append(kp.pid)
            out[APPS] += [p for p in pids if p != kp.pid]
        else:
            out[STANDBY] += pids
    out[CLIENTS] = sorted(_with_descendants(clients))
    return out


def sample(rs: dict[str, list[int]], vmm_region: str | None = None) -> dict[str, int]:
    """{role: nanoseconds on a CPU so far} of every thread of the roles' processes; the
    active kernel's heartbeat thread counts as HEARTBEAT, the time its VMM counted (when
    ``vmm_region`` names the region) as VMM instead of KERNEL."""
    out = {r: 0 for r in ROLES}
    for role, pids in rs.items():
        for pid in pids:
            for comm, ns in _threads(pid):
                out[HEARTBEAT if role == KERNEL and comm == HEARTBEAT_THREAD else role] += ns
    if vmm_region:
        out[VMM] = _vmm_busy(vmm_region)
        out[KERNEL] -= out[VMM]
    return out


def _vmm_busy(path: str) -> int:
    from kernel.hw import vmm

    r = vmm.Region(path)
    try:
        return r.stats()["busy_ns"]
    finally:
        r.close()


def cores(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU-seconds per second of the window, per role (never below zero: a process that
    ended took its time with it)."""
    if not seconds > 0:
        raise ValueError(f"cpu window of {seconds!r} s: must be positive")
    return {r: max(0, after.get(r, 0) - before.get(r, 0)) / 1e9 / seconds for r in ROLES}


def _threads(pid: int) -> list[tuple[str, int]]:
    """(name, ns run) of each thread of a process; [] once it is gone."""
    return [(t.name, t.run_ns) for t in schedstat.threads(pid, names=True)]


def _with_descendants(roots: Iterable[int]) -> set[int]:
    parent: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(b")") + 2 :].split()[1])
        parent.setdefault(ppid, []).append(int(name))
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += parent.get(p, [])
    return seen
