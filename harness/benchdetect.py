"""`crashbench bench detect`: how fast a watcher learns that a kernel died or hung.

Two detectors, as a backup kernel would run them: the doorbell (a panicking kernel's dying
message rings it) and the heartbeat (a hung or killed kernel stops beating; the watcher
declares it dead after MISSED beats). Each trial boots a fresh kernel, injects the fault
and measures, on CLOCK_MONOTONIC, from the fault's activation (recorded by the dying
kernel in its mailbox) to the watcher's verdict.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from harness.testbed import Testbed
from kernel import param
from kernel.hw import mailbox
from kernel.hw.host import Host
from kernel.hw.physmem import CorruptObject, PhysMem, partition_layout


@dataclass
class Detection:
    fault: str
    via: str
    latencies_s: list[float] = field(default_factory=list)
    interval_s: float = param.HEARTBEAT_INTERVAL_S

    def summary(self) -> dict:
        lat = self.latencies_s
        return {
            "fault": self.fault,
            "detected_by": self.via,
            "trials": len(lat),
            "median_ms": statistics.median(lat) * 1e3,
            "min_ms": min(lat) * 1e3,
            "max_ms": max(lat) * 1e3,
            "median_beats": statistics.median(lat) / self.interval_s,
        }


def _watch_heartbeat(mem: PhysMem, lay, missed: int, timeout: float) -> int:
    """Poll the mailbox every quarter beat; return when no beat was seen for `missed` beats."""
    deadline = time.monotonic() + timeout
    beats = mailbox.BeatMonitor(missed)
    while time.monotonic() < deadline:
        try:
            m = mailbox.read_mail(mem, lay)
        except CorruptObject:
            continue
        if beats.stopped(m):
            return time.monotonic_ns()
        time.sleep(m.interval_ns / 4e9)
    raise TimeoutError("the heartbeat never stopped")


def one_trial(host: Host, fault: str, missed: int) -> float:
    part = host.machine.partition(0)
    lay = partition_layout(0, part.base, part.size)
    bell = mailbox.Doorbell(str(host.workdir), 1)  # listen as partition 1 would
    try:
        host.boot(0)
        host.control(0, {"cmd": "inject", "fault": fault})
        if fault == "panic":
            if bell.wait(10.0) is None:
                raise TimeoutError("no doorbell after a panic")
            seen = time.monotonic_ns()
            host.kernels[0].proc.wait(10)
            mem = PhysMem(host.physmem, readonly=True)
            try:
                mail = mailbox.read_mail(mem, lay)
            finally:
                mem.close()
            return (seen - mail.activated_ns) / 1e9
        mem = PhysMem(host.physmem, readonly=True)
        try:
            seen = _watch_heartbeat(mem, lay, missed, 10.0)
            mail = mailbox.read_mail(mem, lay)
        finally:
            mem.close()
        return (seen - mail.activated_ns) / 1e9
    finally:
        bell.close()
        host.crash(0)


def run(
    trials: int,
    faults=("panic", "hang", "kill"),
    missed: int = param.HEARTBEAT_MISSED_BEATS,
    progress=None,
) -> list[Detection]:
    out = []
    with Testbed(kind="bench") as bed:
        for fault in faults:
            d = Detection(
                fault,
                "doorbell (dying message)"
                if fault == "panic"
                else f"heartbeat ({missed} missed beats)",
            )
            for i in range(trials):
                d.latencies_s.append(one_trial(bed.host, fault, missed))
                if progress:
                    progress(fault, i + 1, trials)
            out.append(d)
    return out
