"""The heartbeat of a busy kernel: what keeps it beating, and when a watcher gives up on it."""

import gc
import threading

import pytest

from harness import benchfalse
from kernel import param
from kernel.core.kernel import settle_heap
from kernel.hw import mailbox
from kernel.hw.physmem import PhysMem, partition_layout
from tests.stack import MEM, Stack


def walked_by_collections(obj) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_settle_heap_freezes_the_page_cache_tables_out_of_collections(tmp_path):
    s = Stack(tmp_path)
    tables = (s.vfs.pc.key, s.vfs.pc.flags, s.vfs.pc.gen, s.vfs.pc.csum)
    try:
        assert all(walked_by_collections(t) for t in tables)
        assert settle_heap() == gc.get_freeze_count() > 0
        assert not any(walked_by_collections(t) for t in tables)
    finally:
        gc.unfreeze()  # this process is the test runner's, not a kernel's
        s.close()


@pytest.mark.root
def test_a_booted_kernel_has_its_boot_heap_frozen(host):
    status = host.control(0, {"cmd": "status"})
    assert status["gc"]["frozen"] > 0
    assert len(status["gc"]["collections"]) == 3


class FakeClock:
    def __init__(self):
        self.ns = 1_000_000_000

    def monotonic_ns(self) -> int:
        return self.ns


def mail(beat: int, interval_ns: int) -> mailbox.Mail:
    return mailbox.Mail(mailbox.RUNNING, 1, 0, False, beat, 0, interval_ns, 0, 0, 0, "", "")


def NO_WAITS(pid):  # noqa: N802 - a constant-like null object
    return 0


class HostWaits:
    """The kernel's run-queue waits as the host's scheduler would count them: growing at
    ``share`` of the fake clock from ``since`` (ns), 0 once ``gone_at`` has passed."""

    def __init__(self, clock, since: int, share: float, gone_at: int | None = None):
        self.clock, self.since, self.share, self.gone_at = clock, since, share, gone_at

    def __call__(self, pid: int) -> int:
        if self.gone_at is not None and self.clock.ns >= self.gone_at:
            return 0
        return int(max(0, self.clock.ns - self.since) * self.share)


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(mailbox, "time", c)
    return c


def watch(monitor, clock, beats_at: list[int], until: int, interval: int) -> list[int]:
    """Poll every quarter interval up to ``until`` (ns) while the kernel beats at
    ``beats_at``; the poll times at which the monitor declared the kernel dead."""
    verdicts, beat = [], 0
    while clock.ns < until:
        beat += sum(1 for t in beats_at if clock.ns - interval // 4 < t <= clock.ns)
        if monitor.stopped(mail(beat, interval)):
            verdicts.append(clock.ns)
        clock.ns += interval // 4
    return verdicts


def test_a_busy_kernel_beating_late_but_within_the_timeout_is_not_declared_dead(clock):
    interval, missed = 10_000_000, 10
    start = clock.ns
    # beats delayed by a long collection or a busy CPU: 9 intervals apart, one under the timeout
    beats = [start + i * (missed - 1) * interval for i in range(1, 12)]
    monitor = mailbox.BeatMonitor(missed, waits=NO_WAITS)
    assert watch(monitor, clock, beats, beats[-1], interval) == []


def test_a_kernel_silent_longer_than_the_timeout_is_declared_dead(clock):
    interval, missed = 10_000_000, 10
    start = clock.ns
    beats = [start + i * interval for i in range(1, 5)]  # then silence: hung or killed
    monitor = mailbox.BeatMonitor(missed, waits=NO_WAITS)
    verdicts = watch(monitor, clock, beats, start + 30 * interval, interval)
    assert verdicts and verdicts[0] > beats[-1] + missed * interval


def test_a_silence_spent_waiting_for_a_host_cpu_is_not_counted(clock):
    """A living kernel on a loaded host: its threads wait for a CPU for 60 % of a silence
    of 20 intervals, so the silence it could have beaten in is 8 intervals: no verdict."""
    interval, missed = 10_000_000, 10
    start = clock.ns
    beats = [start + interval, start + 21 * interval, start + 22 * interval]
    monitor = mailbox.BeatMonitor(missed, waits=HostWaits(clock, start + interval, 0.6))
    assert watch(monitor, clock, beats, beats[-1], interval) == []
    # the same silence with no waiting is a verdict
    clock.ns = start
    monitor = mailbox.BeatMonitor(missed, waits=NO_WAITS)
    assert watch(monitor, clock, beats, beats[-1], interval) != []


def test_waiting_for_a_host_cpu_delays_a_verdict_only_up_to_its_bound(clock):
    """A kernel silent for good on a host that keeps it waiting all the time: declared dead
    once the silence passes the timeout plus HEARTBEAT_HOST_WAIT_MAX_BEATS intervals."""
    interval, missed = 10_000_000, 10
    start = clock.ns
    beats = [start + interval]
    monitor = mailbox.BeatMonitor(missed, waits=HostWaits(clock, start, 1.0))
    verdicts = watch(monitor, clock, beats, start + 100 * interval, interval)
    bound = (missed + param.HEARTBEAT_HOST_WAIT_MAX_BEATS) * interval
    assert verdicts and beats[0] + bound < verdicts[0] <= beats[0] + bound + 2 * interval


def test_a_killed_kernel_is_declared_dead_at_the_timeout_whatever_it_waited_before(clock):
    """Its threads waited for a CPU while it was late, then it was killed: a process that
    is gone waits for nothing, so the verdict comes at the plain timeout."""
    interval, missed = 10_000_000, 10
    start = clock.ns
    beats = [start + interval]
    waits = HostWaits(clock, start, 0.5, gone_at=start + 4 * interval)
    monitor = mailbox.BeatMonitor(missed, waits=waits)
    verdicts = watch(monitor, clock, beats, start + 40 * interval, interval)
    assert verdicts and verdicts[0] <= beats[0] + (missed + 1) * interval


def test_a_false_verdict_watch_counts_each_verdict_and_watches_on(tmp_path):
    """A kernel that never beats, watched as `bench detect --false-runs` watches: every
    verdict is counted, the watch goes on to its end."""
    path = str(tmp_path / "physmem")
    mem = PhysMem(path, MEM, create=True)
    lay = partition_layout(0, 0, MEM)
    try:
        mem.write(lay.base, lay.header_bytes())
        mailbox.Mailbox(mem, lay, mailbox.ROLE_ACTIVE, interval_s=0.001)
        stat = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        verdicts, *_ = benchfalse._watch(mem, lay, stat, 0.5, mailbox.BeatMonitor(2))
        assert verdicts >= 2
    finally:
        mem.close()
        PhysMem.unlink(path)


@pytest.mark.root
def test_bench_false_verdicts_watches_a_living_busy_kernel():
    (v,) = benchfalse.run(1, 1.0, cache_mib=4)  # raises if the kernel died meanwhile
    assert v.mib_written > 0 and v.longest_silence_ms > 0 and v.frozen > 0
