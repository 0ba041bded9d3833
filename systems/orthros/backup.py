"""The Orthros backup kernel: a standby OS on its own CPU and memory that takes over.

Promises to the orthros scheme (systems/orthros/__init__.py): ``python -m
systems.orthros.backup --partition P --watch W`` boots a kernel on partition P in STANDBY
(mailbox, heartbeat, doorbell, every module it will need already loaded) and watches
partition W. When W's kernel dies (dying message on the doorbell) or stops beating, it
takes over, each step a measured phase of a RecoveryReport:

  detect → fence (W's kernel killed, every thread of it exiting: it stores nothing more)
  → cache migration (walk and validate W's superblock, dirty-inode list and in-core
  inodes in raw memory, choose the pages to adopt from its page descriptors, while the
  host releases W's kernel, its apps and its mount; when keeping processes, read W's
  in-flight request table, kernel/core/inflight.py, before this kernel's takes its place) → device takeover (the disk's
  exclusive lock, which only a dead owner releases) → mount + replay (W's running journal
  transaction completed, the operation in progress undone and what fsck would reject
refused; the pages adopted in place:
  W's memory is hot-added, nothing copied; each page, clean or dirty, is checked before
  it is used or written back — kernel/core/pageadopt.py) → IP takeover (the NIC moves to P's
  namespace) → first service (the same mount path answers again).

It then is the active kernel: it serves, checks the adopted pages no request has used yet
(with the checker on W's CPU), writes back the adopted dirty pages, takes faults on its
control socket, and writes the report to ``--report`` once every adopted page is checked
and counted; the report names each dirty page (or file) whose data was lost, which reads
as EIO from then on (kernel/core/pageadopt.py ``Lost``).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from kernel import param
from kernel.core.cachewalk import collect
from kernel.core.kernel import Kernel, kernel_arguments, notify_ready
from kernel.core.pageadopt import Unchecked
from kernel.hw import fusedev, mailbox, priority
from kernel.hw import machine as machine_mod
from kernel.hw.physmem import CorruptObject, partition_layout
from kernel.hw.procset import fence_partition
from kernel.tools.txncomplete import complete_transaction
from systems import keep
from systems.adoption import (
    check_rest,
    drop_orphans,
    report_adoption,
    report_lost,
    take_disk,
)
from systems.base import RecoveryReport

if TYPE_CHECKING:
    from kernel.core.inflight import Answers
from systems.detect import Failure
from systems.orthros.checker import Checker
from systems.procmigrate import restart_processes

log = logging.getLogger("backup")
FENCE_TIMEOUT_S = 5.0


def watch(k: Kernel, bell: mailbox.Doorbell, wlay, missed: int) -> Failure | None:
    """Wait for the watched kernel to fail; None if it shut down cleanly instead."""
    beats = mailbox.BeatMonitor(missed)
    while True:
        if bell.wait(k.heartbeat_s / 4) is not None:
            how = "dying message"
        else:
            try:
                m = mailbox.read_mail(k.mem, wlay)
            except CorruptObject:
                continue
            if m.state == mailbox.SHUTDOWN:
                return None
            if not beats.stopped(m):
                continue
            how = "heartbeat"
        now = time.monotonic()
        m = mailbox.read_mail(k.mem, wlay)
        return Failure(how, now, (m.activated_ns or m.panic_ns or m.beat_ns) / 1e9, m)


PF_EXITING = 0x4  # task flag (field 9 of /proc/<pid>/task/<tid>/stat): in do_exit, never runs again


def fence(pid: int) -> None:
    """Make sure the dead kernel can do nothing more: killed, and every one of its threads
    exiting (PF_EXITING) or gone. From then on it stores nothing into memory, so its memory
    can be read; its address space and its disk lock are released later by the host (tens of
    ms on its own CPU for a kernel with its memory mapped), which the device takeover waits for."""
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + FENCE_TIMEOUT_S
    while not _exiting(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"kernel process {pid} still runs {FENCE_TIMEOUT_S} s after SIGKILL")
        time.sleep(0.0002)


def _exiting(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # reaped
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                rest = f.read().rsplit(b") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # this thread is gone
        if rest[0] not in (b"Z", b"X") and not int(rest[6]) & PF_EXITING:
            return False
    return True


class Background(threading.Thread):
    """Host work that waits rather than computes (the rest of the fence, the detach of the
    dead mount), done by a thread while this one migrates the cache; ``wait()`` joins it
    and raises what it raised, so nothing that depends on it goes ahead after a failure."""

    def __init__(self, fn, *args):
        super().__init__(name=fn.__name__, daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.start()

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except BaseException as e:  # handed to wait()
            self.error = e

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


MADV_POPULATE_READ = 22  # Linux 5.14+: fill the page tables without touching each page


def prefault(mem, mach) -> None:
    """Map the whole machine's memory into this process's page tables while in standby, so
    the takeover does not pay a page fault for every page of the dead kernel it reads."""
    try:
        mem.mm.madvise(MADV_POPULATE_READ)
    except OSError as e:
        log.info("memory not prefaulted (%s): the takeover will fault pages in", e)


def warm_heap(nbytes: int) -> None:
    """Grow this process's heap by nbytes and touch it while in standby, and keep it: the
    takeover builds tens of MB of tables, and fresh memory costs a page fault per 4 KiB."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_CHUNK)  # blocks this big come from the heap
        libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes)  # and the heap is not given back
    except (OSError, AttributeError):  # not glibc: the takeover pays its faults
        return
    chunks = [bytearray(HEAP_CHUNK - 4096) for _ in range(nbytes // HEAP_CHUNK)]
    for c in chunks:
        memoryview(c)[::4096] = bytes(len(range(0, len(c), 4096)))
    del chunks


def normal_priority(*pids: int) -> None:
    """Every thread of this process, and the checker, back to SCHED_OTHER once in standby,
    and this session's autogroup back to nice 0. The host starts a backup behind
    everything else (kernel/hw/priority.py ``start_idle``): booted for re-pairing right
    after a failover, at normal priority its start-up took CPU from the service and the
    clients (docs/PERFORMANCE.md, "Re-pairing, and why the backup starts at idle
    priority"). Threads inherit the policy, so the heartbeat thread is reset here too: a
    standby must not starve once it serves."""
    tids = [int(t) for t in os.listdir("/proc/self/task")] + list(pids)
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError as e:
            log.info("thread %d left at its priority (%s)", tid, e)
    try:
        priority.raise_group()
    except OSError as e:
        log.warning("this session's scheduling group left at its idle share (%s)", e)


def warm_imports() -> None:
    """Load in standby what the takeover would otherwise import on first use: numpy
    imports ``numpy.ma`` lazily inside ``np.unique``, which was ≈ 9 % of the cache
    migration's samples in a py-spy profile of `crashbench bench failover`; the FUSE
    server (kernel/core/fuse.py, fuseproto.py), which ``Kernel.serve`` imports when it
    starts, took ≈ 27 ms to import, inside the first service; the in-flight table's reader
    (kernel/core/inflight.py), which the takeover uses, imports the same protocol module."""
    from kernel.core import fuse, inflight  # noqa: F401

    np.unique(np.zeros(2, np.int64))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
HEAP_CHUNK = 16 << 20  # under glibc's largest mmap threshold (32 MiB)


def takeover(
    k: Kernel, f: Failure, args, net, checker: Checker
) -> tuple[RecoveryReport, object, Unchecked | None, Answers | None, str]:
    """The dead kernel's work taken over; also why its running transaction was refused
    ("" when it was completed): then its processes are not kept (``not_kept``)."""
    r = RecoveryReport.after("orthros", f)
    dead = f.mail
    t = time.monotonic()
    fence(dead.pid)
    if args.keep_apps:  # its apps stop where they are; the connection and mount stay
        keep.freeze(args.tag, args.watch)
        apps = unmounting = Background(_nothing)
    else:
        apps = Background(fence_partition, args.tag, args.watch)  # its apps and their children
        unmounting = Background(fusedev.abort_and_unmount, args.mount)
    r.phase("fence", t)
    t = time.monotonic()
    zone = k.machine.partition(dead.zone)
    lay = partition_layout(zone.id, zone.base, zone.size)
    cpus = k.machine.partition(args.watch).cpus  # idle now: a second checker runs there
    harvest = collect(
        k.mem,
        zone.base,
        zone.size,
        zone.id,  # reads memory only
        check=lambda frames: checker.check(k.mem, lay, frames, cpus),
    )
    if args.keep_apps and harvest.txn_refused:
        apps, unmounting = not_kept(args, r, harvest.txn_refused)
    # before this kernel's superblock and table take their place in W's memory (boot)
    answers = _read_inflight(k.mem, lay) if args.keep_apps and not harvest.txn_refused else None
    if answers is not None:
        r.rejected += [str(e) for e in answers.rejected]
    r.phase("cache migration", t)
    t = time.monotonic()
    apps.wait()
    devices = [d for d in dead.devices.split(",") if d]
    dev = take_disk(k, devices, not args.no_delay)
    r.phase("device takeover", t)
    t = time.monotonic()
    txn = complete_transaction(dev, harvest.meta_blocks)
    k.lay = lay  # W's memory, hot-added
    # no collection during the outage: the takeover runs with collections off, and freezes
    # its heap once every adopted page is checked (main's finish)
    vfs = k.boot(dev=dev, adopt=harvest.adopted, devices=dead.devices, settle=False)
    lost, lost_unchecked = drop_orphans(vfs, harvest.adopted.inodes)
    unmounting.wait()  # the mount point is free for the new mount
    r.phase("mount + replay", t)
    report_adoption(r, harvest, txn, lost, lost_unchecked)
    if net is not None and not args.keep_apps:  # kept apps keep the NIC beside them
        t = time.monotonic()
        net.move_to(k.part.id)
        r.phase("IP takeover", t)
    return r, vfs, harvest.adopted.unchecked, answers, harvest.txn_refused


def not_kept(args, r: RecoveryReport, refused: str) -> tuple[Background, Background]:
    """The frozen processes are killed and the held connection aborted instead of kept:
    the refused transaction undid what they were told since the last commit (a write
    answered, a file created or cut), so a kept server would go on from a state the disk
    no longer has — the rest of a PUT written after a hole where its acknowledged first
    part was, say — and a request it sent before the crash, answered from the in-flight
    table or executed on the connection, would change files on that same wrong footing.
    They are started again on a new mount, as without keeping; what they had not
    finished is lost to their clients, never half done."""
    r.notes.append(keep.not_kept_note(refused))
    return (
        Background(keep.discard, args.tag, args.watch),
        Background(fusedev.abort_and_unmount, args.mount),
    )


def _nothing() -> None:
    pass


def _read_inflight(mem, lay) -> Answers:
    from kernel.core.inflight import read_inflight  # loaded in standby (warm_imports)

    return read_inflight(mem, lay)


def prepare_nic(k: Kernel, tag: str):
    """Everything the NIC takeover needs (netlink sockets and namespace handles), opened
    while in standby: attaching at takeover time cost ≈ 200 ms (measured in the lab)."""
    from kernel.hw.net import Network

    net = Network(tag, k.machine.nics[0], [p.id for p in k.machine.partitions])
    if net.mode == "netns":
        net.attach()
    return net


def main(argv: list[str] | None = None) -> int:
    ap = kernel_arguments("python -m systems.orthros.backup", "The Orthros backup kernel")
    ap.add_argument("--watch", type=int, required=True, help="the partition to watch and take over")
    ap.add_argument("--report", required=True, help="file to write the recovery report to")
    ap.add_argument(
        "--missed",
        type=int,
        default=param.HEARTBEAT_MISSED_BEATS,
        help="beat intervals without a beat before the watched kernel is declared dead",
    )
    ap.add_argument("--net-tag", help="the lab's network tag, to take the NIC over")
    ap.add_argument(
        "--hold-pid", type=int, help="with --keep-apps: the process holding the FUSE connection"
    )
    ap.add_argument(
        "--hold-fd", type=int, help="with --keep-apps: its descriptor of the connection"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s backup[%(process)d] %(message)s")
    mach = machine_mod.load(args.machine, shape_checked=True)  # checked by whoever started it
    k = Kernel(mach, args.partition, args.physmem, args.workdir, delay=not args.no_delay)
    k.keep_apps = args.keep_apps
    os.sched_setaffinity(0, k.part.cpus)
    k.join_partition(args.tag)
    if args.keep_apps and (k.pset is None or k.pset.mode == "pids"):
        raise SystemExit("keeping processes needs cgroup process sets (freeze, move)")
    k.start_mailbox(role=mailbox.ROLE_BACKUP)
    k.mailbox.set(state=mailbox.STANDBY, listening=1, watching=args.watch)
    bell = mailbox.Doorbell(args.workdir, args.partition)
    w = mach.partition(args.watch)
    prefault(k.mem, mach)
    warm_heap(param.BACKUP_HEAP_WARM_BYTES)
    warm_imports()
    checker = Checker.start(args.physmem)
    if k.pset is not None:
        k.pset.add(checker.proc.pid)
    net = prepare_nic(k, args.net_tag) if args.net_tag and mach.nics else None
    conn = (
        keep.Connection.take(args.hold_pid, args.hold_fd, args.workdir) if args.keep_apps else None
    )
    normal_priority(checker.proc.pid)
    notify_ready(args.ready_fd)
    failure = watch(k, bell, partition_layout(w.id, w.base, w.size), args.missed)
    bell.close()
    if failure is None:
        checker.close()
        log.info("partition %d shut down cleanly: nothing to take over", args.watch)
        k.mailbox.set(state=mailbox.SHUTDOWN)
        return 0
    log.info(
        "partition %d failed (%s): fault %r, last beat %.1f ms before the verdict",
        args.watch,
        failure.how,
        failure.mail.fault,
        (failure.detected_at - failure.mail.beat_ns / 1e9) * 1e3,
    )
    gc.disable()  # the adoption makes many objects and frees none: no collections
    report, vfs, unchecked, answers, refused = takeover(k, failure, args, net, checker)
    kept = args.keep_apps and not refused
    t_serve = time.monotonic()

    specs = json.loads(open(args.apps).read()) if args.apps else []

    def serving() -> None:
        t = time.monotonic()
        report.phase("first service", t_serve, t)
        # kept apps, and apps not kept after all, keep the NIC where it is
        netns = net.netns(net.owner()) if net is not None and args.keep_apps else args.netns
        if kept:  # with no apps too: the frozen set is fenced and thawed
            keep.into_report(report, k, args.watch, args.tag, specs, netns)
            report.phase("process keeping", t)
        elif specs:  # a state segment written on a footing the refusal undid is not trusted
            moved = restart_processes(k, args.watch, specs, with_state=not refused, netns=netns)
            report.processes_before = moved.before
            report.processes_recovered = moved.migrated + moved.restarted
            report.rejected += moved.rejected
            report.notes.append(
                f"{moved.migrated} processes migrated with their state, {moved.restarted} restarted"
            )
            report.phase("process migration", t)
        report.service_at = time.monotonic()
        report.recovered = True
        log.info("took over partition %d's work in %.1f ms", args.watch, report.outage_s * 1e3)
        threading.Thread(target=finish, name="check-rest", daemon=True).start()

    def finish() -> None:
        cpus = mach.partition(args.watch).cpus
        try:
            check_rest(
                vfs, report, unchecked, lambda frames: checker.check(k.mem, k.lay, frames, cpus)
            )
        except Exception as e:  # the report still says what happened
            log.exception("checking the adopted pages failed")
            report.notes.append(f"checking the adopted pages failed: {e!r}")
        finally:
            report_lost(vfs, report)
            if answers is not None:
                report.notes.append(answers.note())
            checker.close()
            gc.freeze()  # no collection ever walks the page cache's tables
            gc.enable()
        tmp = args.report + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(
                {"partition": args.partition, "pid": os.getpid(), **report.to_dict()}, fh, indent=2
            )
        os.replace(tmp, args.report)

    if conn is not None and kept:
        k.resume(conn.fd, conn.params, ready=serving, answers=answers)
    else:
        if conn is not None:  # aborted: the new mount's connection is the one to hold next
            os.close(conn.fd)
        k.serve(args.mount, ready=serving)
    return 0


if __name__ == "__main__":
    sys.exit(main())
