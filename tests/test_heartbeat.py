"""The heartbeat of a busy kernel: what keeps it beating, and when a watcher gives up on it."""

import threading

import pytest

from harness import benchfalse
from kernel.hw import mailbox
from kernel.hw.physmem import PhysMem, partition_layout
from tests.stack import MEM


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
    assert v.mib_written > 0 and v.longest_silence_ms > 0
