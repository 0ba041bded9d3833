"""`crashbench bench detect --false-runs N`: false heartbeat verdicts on a living kernel.

Promises: each run boots a fresh kernel, keeps it busy with a writer process through its
mount (1 MiB files round a working set of CACHE_MIB, so its page cache grows, warm and
dirty, as a workload's does) and watches its heartbeat for SECONDS as the Orthros backup
does (the same BeatMonitor and MISSED, polling every quarter beat, on the backup
partition's CPUs). The kernel never fails, so every verdict is false; each is counted and
the watch goes on. With ``load`` > 0 that many CPU-bound processes run beside it for the
run, unpinned, and are killed at its end.

Per run it also reports, measured: the longest time the watcher saw the beat counter not
move (what a verdict judges), how long of it the heartbeat thread waited for a CPU (its
run-queue delay in /proc/<pid>/task/<tid>/schedstat, sampled when the watcher saw each new
beat: the rest it waited for something else, the interpreter lock above all), how long the
watcher itself waited for a CPU in it (a late watcher sees a silence longer than the
kernel's, but never a false one: it judges by the progress it sees), and the kernel's full
garbage collections, with the longest of them (its ``status`` reply).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness.testbed import Testbed
from kernel import param
from kernel.core.kernel import HEARTBEAT_THREAD
from kernel.hw import mailbox
from kernel.hw.host import Host
from kernel.hw.physmem import CorruptObject, PhysMem, partition_layout

CHUNK = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class Vigil:
    """One run's watch over a kernel that stayed alive."""

    seconds: float
    false_verdicts: int
    longest_silence_ms: float  # the watcher saw no new beat for this long
    cpu_wait_ms: float  # of that silence, the heartbeat thread's run-queue delay
    watcher_wait_ms: float  # and the watcher's own
    full_collections: int  # of the kernel, during the run
    full_longest_ms: float  # the kernel's longest full collection since its boot
    frozen: int  # objects the kernel's collector no longer walks
    mib_written: int
    load: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def run(
    runs: int,
    seconds: float,
    *,
    load: int = 0,
    cache_mib: int = 512,
    missed: int = param.HEARTBEAT_MISSED_BEATS,
    progress=None,
) -> list[Vigil]:
    out = []
    with Testbed(kind="bench") as bed:
        for i in range(runs):
            out.append(one_run(bed.host, seconds, load, cache_mib, missed))
            if progress:
                progress(i + 1, runs)
    return out


def one_run(host: Host, seconds: float, load: int, cache_mib: int, missed: int) -> Vigil:
    kp = host.boot(0)
    procs: list[subprocess.Popen] = []  # the writer first, then the load
    try:
        before = host.control(0, {"cmd": "status"})["gc"]

        def busy() -> None:  # once the watch has seen its first beat
            procs.append(start_writer(kp.mount, cache_mib, seconds))
            procs.extend(busy_process() for _ in range(load))

        watched = watch(host, kp.pid, seconds, missed, busy)
        mib = mib_written(procs[0])
        after = host.control(0, {"cmd": "status"})["gc"]
        if not kp.alive():
            raise RuntimeError("the watched kernel died: its verdicts were not false")
    finally:
        for p in procs:
            p.kill()
            p.wait()
        host.crash(0)
    return Vigil(
        seconds,
        *watched,
        full_collections=after["collections"][2] - before["collections"][2],
        full_longest_ms=after["full_longest_ms"],
        frozen=after["frozen"],
        mib_written=mib,
        load=load,
    )


def busy_process() -> subprocess.Popen:
    """A CPU-bound process for the run's background load (killed at its end)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)


def watch(host: Host, pid: int, seconds: float, missed: int, started=None) -> tuple:
    """(false verdicts, longest silence ms, the heartbeat thread's and the watcher's
    run-queue delays in it ms), watched on the backup partition's CPUs, as the backup would; ``started``
    is called once the first beat is seen."""
    part = host.machine.partition(0)
    lay = partition_layout(0, part.base, part.size)
    mem = PhysMem(host.physmem, readonly=True)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, host.machine.partition(1).cpus or old)  # this thread only
    stat = heartbeat_schedstat(pid)
    try:
        return _watch(mem, lay, stat, seconds, mailbox.BeatMonitor(missed), started)
    finally:
        os.sched_setaffinity(0, old)
        mem.close()


def _watch(mem, lay, stat: str, seconds: float, beats, started=None) -> tuple:
    verdicts, silence, waited = 0, 0, (0, 0)
    own = f"/proc/self/task/{threading.get_native_id()}/schedstat"
    seen = None  # the last beat seen: (counter, when seen, run-queue delays then)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            m = mailbox.read_mail(mem, lay)
        except CorruptObject:
            continue
        if seen is None or m.beat != seen[0]:
            now, delays = time.monotonic_ns(), (run_delay(stat), run_delay(own))
            if seen is None and started:
                started()
            elif seen is not None and now - seen[1] > silence:
                silence = now - seen[1]
                waited = (delays[0] - seen[2][0], delays[1] - seen[2][1])
            seen = (m.beat, now, delays)
        if beats.stopped(m):
            verdicts += 1
            beats.last = None  # the kernel lives on: watch it afresh
        time.sleep(m.interval_ns / 4e9)
    return verdicts, silence / 1e6, waited[0] / 1e6, waited[1] / 1e6


def heartbeat_schedstat(pid: int) -> str:
    """The /proc schedstat file of the kernel's heartbeat thread."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == HEARTBEAT_THREAD:
            return f"/proc/{pid}/task/{tid}/schedstat"
    raise RuntimeError(f"kernel {pid} has no {HEARTBEAT_THREAD} thread")


def run_delay(schedstat: str) -> int:
    """Nanoseconds the thread has waited on a run queue so far."""
    with open(schedstat, "rb") as f:
        return int(f.read().split()[1])


WRITER = """
import pathlib, sys, time
mount, n, end = pathlib.Path(sys.argv[1]), int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
chunk, i = bytes(range(256)) * 4096, 0
while time.monotonic() < end:
    (mount / f"w{i % n}").write_bytes(chunk)
    i += 1
print(i)
"""


def start_writer(mount: str, mib: int, seconds: float) -> subprocess.Popen:
    """Keeps the kernel busy for ``seconds``, as a client would from its own process: 1 MiB
    files written round a working set of ``mib`` files (new pages in the kernel's cache
    until the set is written once, then overwrites); prints the MiB it wrote."""
    args = [sys.executable, "-c", WRITER, mount, str(max(1, mib)), str(seconds)]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)


def mib_written(writer: subprocess.Popen) -> int:
    out, _ = writer.communicate(timeout=60)
    if writer.returncode != 0:
        raise RuntimeError(f"the writer failed (exit {writer.returncode})")
    return int(out)
