"""txipc_sim: each request a transaction; a fault inside one rolls back only it."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as stt

from kernel import param
from kernel.core.faults import REQUEST_SITES, SITES
from kernel.core.txlog import (
    IRREVOCABLE,
    OPEN,
    Irrevocable,
    LogDamaged,
    UndoLog,
    _write_header,
    open_transaction,
    roll_back,
)
from kernel.core.vfs import VFS
from kernel.hw.blockdev import BlockDevice
from kernel.hw.physmem import PAGE_DESC, PG_VALID, PhysMem, partition_layout
from kernel.tools.fsck import fsck
from kernel.tools.mkfs import mkfs
from systems.txipc_sim.requests import RequestAborted, Transactions

MEM, DISK = 48 << 20, 128 << 20
PAGE = param.PAGE_SIZE
ROOT = 1
FILES = [b"a", b"b", b"c"]


class Rig:
    """A txipc_sim kernel's storage stack in one process: what the kernel program wires."""

    def __init__(self, tmp):
        self.img = str(tmp / "disk.img")
        mkfs(self.img, DISK)
        path = str(tmp / "physmem")
        PhysMem.unlink(path)
        self.mem = PhysMem(path, MEM, create=True)
        full = partition_layout(0, 0, MEM)
        self.mem.write(0, full.header_bytes())
        self.lay, self.log_phys = UndoLog.carve(full)
        self.span = (self.lay.ksuper, self.log_phys)
        self.dev = BlockDevice(self.img, "none", delay=False)
        self.vfs = VFS(self.mem, self.lay, self.dev)
        self.log = UndoLog(self.mem, self.log_phys, param.TXLOG_BYTES, self.span, frames=self.lay)
        self.tx = Transactions(self, self.log)
        self.snapshots: list[tuple[bytes, bytes]] = []  # (before the request, after roll-back)

    def panic(self, reason: str, site: str) -> None:
        raise AssertionError(f"panic at {site}: {reason}")

    def memory(self) -> bytes:
        lo, hi = self.span
        return self.mem.read(lo, hi - lo)

    def request(self, fn, fault_after: int | None = None):
        """Run ``fn`` as one FUSE request; ``fault_after``: an exception in it after that
        many stores (once), memory compared before it and after its roll-back."""
        before = self.memory() if fault_after is not None else None
        remount = self.tx._remount

        def checked_remount(*a):
            self.snapshots.append((before, self.memory()))
            return remount(*a)

        trip = StoreFault(self, fault_after) if fault_after is not None else None
        self.tx._remount = checked_remount
        try:
            return self.tx.around({0: lambda *a: fn()})[0](ROOT, b"", 0, 0, 0)
        finally:
            self.tx._remount = remount
            if trip:
                trip.close()

    def close(self):
        self.log.close()
        self.dev.close()
        self.mem.close()


class StoreFault:
    """An exception inside the request after ``n`` of its stores (the next one never lands)."""

    def __init__(self, rig: Rig, n: int):
        self.rig, self.left = rig, n
        rig.mem.watchers.insert(0, self.store)

    def store(self, phys: int, data) -> None:
        if self.rig.tx.open and self.rig.log.state == 1:
            if self.left == 0:
                self.left = -1
                raise RequestAborted(f"store {phys:#x}")
            self.left -= 1

    def close(self):
        self.rig.mem.watchers.remove(self.store)


class SiteFault:
    """The injector's exception-in-request at a named site, as the txipc kernel raises it."""

    armed = None

    def __init__(self, site: str):
        self.site, self.fired = site, 0

    def at(self, site: str) -> None:
        if site == self.site and self.fired < 1:
            self.fired += 1
            raise RequestAborted(site)


def mattering(rig, mem: bytes, like: bytes | None = None) -> bytes:
    """The storage stack's memory that matters: every byte but the content of the frames
    that were free (descriptor invalid) in ``like`` (default: ``mem`` itself)."""
    like = mem if like is None else like
    lo, lay = rig.span[0], rig.lay
    desc = np.frombuffer(like, PAGE_DESC.dtype, lay.nframes, lay.desc - lo)
    used = np.flatnonzero(desc["flags"] & PG_VALID)
    frames = np.frombuffer(mem, np.uint8, lay.nframes * PAGE, lay.frames - lo).reshape(-1, PAGE)
    return mem[: lay.frames - lo] + frames[used].tobytes() + used.tobytes()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def ino_of(rig, name):
    try:
        return rig.vfs.lookup(ROOT, name).ino
    except OSError as e:
        assert e.errno == errno.ENOENT
        return None


def apply(rig, model: dict, op) -> None:
    """One operation on the VFS, and on the model when it succeeds."""
    kind, name = op[0], op[1]
    ino = ino_of(rig, name)
    if kind == "write":
        off, data = op[2], op[3]
        if ino is None:
            ino = rig.vfs.create(ROOT, name, 0o100644, 0, 0).ino
            model[name] = b""
        rig.vfs.write(ino, off, data)
        old = model[name]
        old = old + bytes(max(0, off - len(old)))
        model[name] = old[:off] + data + old[off + len(data) :]
    elif kind == "truncate" and ino is not None:
        rig.vfs.setattr(ino, size=op[2])
        model[name] = model[name][: op[2]] + bytes(max(0, op[2] - len(model[name])))
    elif kind == "unlink" and ino is not None:
        rig.vfs.unlink(ROOT, name)
        del model[name]
    elif kind == "rename" and ino is not None and op[2] != name:
        rig.vfs.rename(ROOT, name, ROOT, op[2])
        model[op[2]] = model.pop(name)


def ops():
    name = stt.sampled_from(FILES)
    return stt.one_of(
        stt.tuples(
            stt.just("write"),
            name,
            stt.integers(0, 6 * param.PAGE_SIZE),
            stt.binary(min_size=1, max_size=3 * param.PAGE_SIZE),
        ),
        stt.tuples(stt.just("truncate"), name, stt.integers(0, 5 * param.PAGE_SIZE)),
        stt.tuples(stt.just("unlink"), name),
        stt.tuples(stt.just("rename"), name, stt.sampled_from(FILES)),
    )


def check_files(rig, model):
    for name in FILES:
        ino = ino_of(rig, name)
        assert (ino is not None) == (name in model), name
        if ino is not None:
            want = model[name]
            assert rig.vfs.getattr(ino).size == len(want)
            assert rig.vfs.read(ino, 0, len(want) + 1) == want


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seq=stt.lists(ops(), min_size=1, max_size=8),
    which=stt.integers(0, 7),
    after=stt.integers(0, 15),
)
def test_a_rolled_back_request_leaves_memory_byte_identical(tmp_path_factory, seq, which, after):
    """Random request sequences, a fault after a random number of stores of one request:
    memory is byte-identical to before that request once it is rolled back, the request
    is executed again and succeeds, and the files are what the requests made them."""
    rig = Rig(tmp_path_factory.mktemp("tx"))
    try:
        model: dict[bytes, bytes] = {}
        faulted = which % len(seq)
        for k, op in enumerate(seq):
            rig.request(lambda op=op: apply(rig, model, op), after if k == faulted else None)
        for before, after_abort in rig.snapshots:
            assert mattering(rig, before) == mattering(rig, after_abort, like=before)
        assert rig.tx.counts["rolled_back"] == len(rig.snapshots)
        assert rig.tx.counts["re_executed"] == len(rig.snapshots)
        check_files(rig, model)
        rig.vfs.writeback.sync_all()
        rig.vfs.fs.unmount()
        assert fsck(rig.img).problems == []
    finally:
        rig.close()


@pytest.mark.parametrize("site", REQUEST_SITES)
def test_exception_at_each_request_site_rolls_back_and_reexecutes(rig, site):
    model: dict[bytes, bytes] = {}
    rig.request(lambda: apply(rig, model, ("write", b"a", 0, b"x" * 9000)))
    rig.request(lambda: rig.vfs.mkdir(ROOT, b"d", 0o40755, 0, 0))
    fault = SiteFault(site)
    rig.vfs.faults = fault
    requests = {
        "vfs.lookup": lambda: rig.vfs.lookup(ROOT, b"a"),
        "vfs.create": lambda: apply(rig, model, ("write", b"b", 0, b"new")),
        "vfs.mkdir": lambda: rig.vfs.mkdir(ROOT, b"e", 0o40755, 0, 0),
        "vfs.write": lambda: apply(rig, model, ("write", b"a", 100, b"y" * 5000)),
        "vfs.rename": lambda: apply(rig, model, ("rename", b"a", b"c")),
        "vfs.unlink": lambda: apply(rig, model, ("unlink", b"a")),
        "vfs.truncate": lambda: apply(rig, model, ("truncate", b"a", 10)),
        "vfs.setattr": lambda: rig.vfs.setattr(ino_of(rig, b"a"), mode=0o600),
        "fs.dir-update": lambda: apply(rig, model, ("write", b"b", 0, b"new")),
        "fs.inode-alloc": lambda: apply(rig, model, ("write", b"b", 0, b"new")),
    }
    assert set(requests) == set(REQUEST_SITES)
    rig.request(requests[site], fault_after=10**9)  # the site's exception, no store fault
    assert fault.fired == 1, f"site {site} not reached"
    assert rig.tx.counts["rolled_back"] == 1 and rig.tx.counts["re_executed"] == 1
    before, after = rig.snapshots[0]
    assert mattering(rig, before) == mattering(rig, after, like=before)
    check_files(rig, model)
    a = rig.tx.aborts[0]
    assert a["site"] == site
    steps = ("start_ns", "rolled_back_ns", "walked_ns", "completed_ns", "remounted_ns")
    assert [a[k] for k in steps] == sorted(a[k] for k in steps)  # each step clocked, in order


def test_a_second_abort_is_answered_eio(rig):
    rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0))
    ino = ino_of(rig, b"a")
    always = SiteFault("vfs.write")
    always.fired = -(10**9)  # fires every time
    rig.vfs.faults = always
    with pytest.raises(OSError) as e:
        rig.request(lambda: rig.vfs.write(ino, 0, b"z" * 10))
    rig.vfs.faults = SiteFault("none")
    assert e.value.errno == errno.EIO
    assert rig.tx.counts["answered_error"] == 1 and rig.tx.counts["rolled_back"] == 2
    assert rig.vfs.read(ino_of(rig, b"a"), 0, 100) == b""


def test_a_request_that_wrote_to_the_disk_is_irrevocable(rig):
    """fsync writes back inside the request: a later fault in it cannot be rolled back."""
    ino = rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0)).ino
    rig.request(lambda: rig.vfs.write(ino, 0, b"d" * 5000))

    def fsync_then_fault():
        rig.vfs.fsync(ino)
        assert rig.log.state == IRREVOCABLE
        raise RequestAborted("after fsync")

    with pytest.raises(AssertionError, match="not recovered by the transaction: Irrevocable"):
        rig.request(fsync_then_fault)
    assert rig.tx.counts["irrevocable"] == 1


def test_a_damaged_log_refuses_to_roll_back(rig):
    rig.tx._begin()
    rig.vfs.create(ROOT, b"a", 0o100644, 0, 0)
    rec = rig.log_phys + 64 + 24  # the first record's old bytes
    rig.mem.mm[rec] ^= 0xFF
    with pytest.raises(LogDamaged, match="checksum, sequence or address"):
        rig.log.abort()


def test_the_log_is_not_in_the_page_cache(rig):
    assert rig.log_phys >= rig.lay.frame_phys(rig.lay.nframes)
    assert rig.log_phys + param.TXLOG_BYTES <= MEM
    assert rig.vfs.pc.nframes == rig.lay.nframes


def test_sites_are_named_and_request_sites_among_them():
    assert set(REQUEST_SITES) <= set(SITES)
    assert "writeback" in SITES and "writeback" not in REQUEST_SITES


def test_a_reader_of_the_memory_finds_exactly_the_open_transactions_records(rig):
    """Records of an earlier, longer transaction left in the area are never taken for the
    open one's: the reader walking the memory alone stops at the first that fails."""
    rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0))
    rig.request(lambda: rig.vfs.write(ino_of(rig, b"a"), 0, b"q" * 9000))
    rig.tx._begin()
    rig.vfs.setattr(ino_of(rig, b"a"), mode=0o600)
    logged = rig.log.count
    assert 0 < logged
    assert rig.log.records() == rig.log.records(rig.log.used)
    assert len(rig.log.records()) == logged


def test_stores_into_frames_free_before_the_request_keep_no_old_bytes(rig):
    """A new file's pages land in free frames: no old bytes are logged for them, and the
    roll-back still leaves every frame in use and every descriptor as it was."""
    ino = rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0)).ino
    rig.request(lambda: rig.vfs.write(ino, 0, b"o" * PAGE))
    logged = rig.log.bytes
    rig.request(lambda: rig.vfs.write(ino, PAGE, b"n" * (64 * PAGE)), fault_after=2)
    assert rig.log.free_skipped >= 64 * PAGE
    assert rig.log.bytes - logged < 2 * 64 * PAGE  # two attempts, no frame content each
    before, after = rig.snapshots[0]
    assert mattering(rig, before) == mattering(rig, after, like=before)
    assert rig.vfs.read(ino, 0, 65 * PAGE) == b"o" * PAGE + b"n" * (64 * PAGE)


def test_a_bug_inside_a_request_is_rolled_back_like_a_fault(rig):
    """An exception that is no answer (a kernel bug's) after stores: rolled back, executed
    again, and since it recurs answered EIO; memory as before the request."""
    ino = rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0)).ino
    rig.request(lambda: rig.vfs.write(ino, 0, b"a" * 5000))

    def buggy():
        rig.vfs.write(ino, 0, b"b" * 5000)
        return 1 // 0

    with pytest.raises(OSError) as e:
        rig.request(buggy, fault_after=10**9)
    assert e.value.errno == errno.EIO and "ZeroDivisionError" in str(e.value)
    assert rig.tx.counts["rolled_back"] == 2 and rig.tx.counts["answered_error"] == 1
    before, after = rig.snapshots[0]
    assert mattering(rig, before) == mattering(rig, after, like=before)
    assert rig.vfs.read(ino, 0, 5000) == b"a" * 5000


def test_an_error_answer_commits_what_the_request_did(rig):
    """ENOENT is an answer, not a fault: nothing is rolled back."""
    with pytest.raises(OSError) as e:
        rig.request(lambda: rig.vfs.lookup(ROOT, b"missing"))
    assert e.value.errno == errno.ENOENT
    assert rig.tx.counts["rolled_back"] == 0 and rig.tx.counts["requests"] == 1


def test_a_report_figure_must_be_a_count():
    from systems.base import RecoveryReport, ReportError, check_report

    r = RecoveryReport("txipc_sim", "exception-in-request", 1.0)
    r.figures = {"rolled_back": 1}
    assert check_report(r) is r
    for bad in (-1, 0.5, True):
        r.figures = {"rolled_back": bad}
        with pytest.raises(ReportError, match="rolled_back"):
            check_report(r)
    assert RecoveryReport.from_dict(r.to_dict()).figures == r.figures


def test_one_roll_back_reports_the_rebuild_step_by_step():
    from systems.base import RecoveryReport
    from systems.txipc_sim import TxIPCSim

    ms = 1_000_000
    a = dict(rolled_back_ns=10 * ms, walked_ns=12 * ms, completed_ns=13 * ms, remounted_ns=20 * ms)
    r = RecoveryReport("txipc_sim", "exception-in-request", 0.0)
    TxIPCSim._rebuild_phases(r, a, a)
    got = [(p.name, round((p.end - p.start) * 1e3, 6)) for p in r.phases]
    assert got == [("cache walk", 2.0), ("journal completion", 1.0), ("tables rebuilt", 7.0)]
    two = RecoveryReport("txipc_sim", "exception-in-request", 0.0)
    TxIPCSim._rebuild_phases(two, a, {**a, "remounted_ns": 40 * ms})  # re-executed, aborted again
    assert [(p.name, round((p.end - p.start) * 1e3, 6)) for p in two.phases] == [
        ("remount in place", 30.0)
    ]


def died_inside_a_request(rig) -> tuple[bytes, int]:
    """A committed file, then a request that stores into it and dies (no commit, the
    log's watcher gone with the process): the memory before that request, its records."""
    ino = rig.request(lambda: rig.vfs.create(ROOT, b"a", 0o100644, 0, 0)).ino
    rig.request(lambda: rig.vfs.write(ino, 0, b"o" * (3 * PAGE)))
    before = rig.memory()
    rig.tx._begin()
    rig.vfs.write(ino, PAGE // 2, b"n" * (2 * PAGE))
    rig.vfs.setattr(ino, mode=0o600)
    logged = rig.log.count
    rig.log.close()
    return before, logged


def test_roll_back_from_the_memory_alone_restores_the_open_transaction(rig):
    before, logged = died_inside_a_request(rig)
    assert logged > 0
    assert len(open_transaction(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span)) == logged
    stores, restored = roll_back(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span)
    assert stores == logged and restored > 0
    assert mattering(rig, rig.memory(), like=before) == mattering(rig, before)
    assert open_transaction(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span) is None


def test_a_request_that_stored_nothing_yet_is_open_in_memory(rig):
    rig.tx._begin()
    assert open_transaction(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span) == []
    rig.tx._commit()
    assert open_transaction(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span) is None


@pytest.mark.parametrize("where", ["header", "record", "count"])
def test_roll_back_from_the_memory_alone_refuses_a_damaged_log(rig, where):
    died_inside_a_request(rig)
    if where == "count":  # a sound header counting a record the log does not hold
        log = rig.log
        _write_header(rig.mem.mm, rig.log_phys, OPEN, log.tid, log.count + 1, log.used)
    else:  # the header's tid, or the first record's old bytes
        at = rig.log_phys + (8 if where == "header" else 64 + 24)
        rig.mem.mm[at] ^= 0x04
    damaged = rig.memory()
    with pytest.raises(LogDamaged):
        roll_back(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span)
    assert rig.memory() == damaged  # nothing restored


def test_roll_back_from_the_memory_alone_refuses_an_irrevocable_transaction(rig):
    died_inside_a_request(rig)
    rig.log.irrevocable("the request wrote to the disk")
    with pytest.raises(Irrevocable):
        roll_back(rig.mem, rig.log_phys, param.TXLOG_BYTES, rig.span)
