"""The Orthros backup kernel: a standby OS on its own CPU and memory that takes over.

Promises to the orthros scheme (systems/orthros/__init__.py): ``python -m
systems.orthros.backup --partition P --watch W`` boots a kernel on partition P in STANDBY
(mailbox, heartbeat, doorbell, every module it will need already loaded) and watches
partition W. When W's kernel dies (dying message on the doorbell) or stops beating, it
takes over, each step a measured phase of a RecoveryReport:

  detect → fence (W's kernel process group killed, its FUSE connection aborted) → device
  takeover (the disk's exclusive lock, which only a dead owner releases) → cache migration
  (walk and validate W's dirty-inode list, page descriptors and pages in raw memory;
  complete W's running journal transaction when no operation was in progress) → mount +
  replay (the validated pages adopted in place: W's memory is hot-added, nothing copied)
  → IP takeover (the NIC moves to P's namespace) → first service (the same mount path
  answers again).

It then is the active kernel: it serves, writes back the adopted dirty pages, takes faults
on its control socket, and writes the report to ``--report``.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from kernel import fuse, mailbox, param
from kernel import machine as machine_mod
from kernel.blockdev import BlockDevice, DeviceError
from kernel.kernel import Kernel, kernel_arguments, notify_ready
from kernel.physmem import CorruptObject, partition_layout
from systems.base import RecoveryReport
from systems.detect import Failure
from systems.orthros.adopt import collect, complete_transaction
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


def fence(pid: int, mount: str) -> None:
    """Make sure the dead kernel is gone: its whole process group, then its connection."""
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + FENCE_TIMEOUT_S
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break   # a zombie runs nothing; its parent reaps it
        except OSError:
            break
        time.sleep(0.0005)
    if fuse.is_mounted(mount):
        fuse.abort_and_unmount(mount)


MADV_POPULATE_READ = 22   # Linux 5.14+: fill the page tables without touching each page


def prefault(mem, mach) -> None:
    """Map the whole machine's memory into this process's page tables while in standby, so
    the takeover does not pay a page fault for every page of the dead kernel it reads."""
    try:
        mem.mm.madvise(MADV_POPULATE_READ)
    except OSError as e:
        log.info("memory not prefaulted (%s): the takeover will fault pages in", e)


def take_disk(k: Kernel, names: list[str], delay: bool) -> BlockDevice:
    disk = next(k.machine.disk(n) for n in names if n in {d.name for d in k.machine.disks})
    deadline = time.monotonic() + FENCE_TIMEOUT_S
    while True:
        try:
            return BlockDevice(k.disk_path(disk), disk.model, delay=delay)
        except DeviceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005)


def takeover(k: Kernel, f: Failure, args, net) -> tuple[RecoveryReport, object]:
    r = RecoveryReport.after("orthros", f)
    dead = f.mail
    t = time.monotonic()
    fence(dead.pid, args.mount)
    if args.tag:   # and everything else of the dead partition: its apps and their children
        from kernel.procset import ProcessSet
        ProcessSet(args.tag, args.watch).fence()
    r.phase("fence", t)
    t = time.monotonic()
    devices = [d for d in dead.devices.split(",") if d]
    dev = take_disk(k, devices, not args.no_delay)
    r.phase("device takeover", t)
    t = time.monotonic()
    zone = k.machine.partition(dead.zone)
    harvest = collect(k.mem, zone.base, zone.size, zone.id)
    txn = complete_transaction(dev, harvest.meta_blocks) if harvest.meta_blocks else 0
    r.phase("cache migration", t)
    t = time.monotonic()
    k.lay = partition_layout(zone.id, zone.base, zone.size)   # W's memory, hot-added
    vfs = k.boot(dev=dev, adopt=harvest.adopted, devices=dead.devices)
    lost = drop_orphans(vfs, harvest.adopted.inodes)
    r.phase("mount + replay", t)
    a = harvest.adopted
    r.cache.pages_before, r.cache.dirty_pages_before = harvest.pages_before, harvest.dirty_before
    r.cache.pages_recovered = len(a.frames)
    r.cache.dirty_pages_recovered = harvest.n_dirty - lost
    r.cache.pages_rejected = sum(1 for e in harvest.rejected
                                 if e.kind in ("page frame", "page descriptor"))
    r.rejected = [str(e) for e in harvest.rejected]
    if harvest.txn_refused:
        r.notes.append(f"running transaction not completed: {harvest.txn_refused}")
    elif txn:
        r.notes.append(f"completed the dead kernel's running transaction ({txn} metadata blocks)")
    if lost:
        r.notes.append(f"{lost} dirty pages belonged to files whose creation was never committed")
    if net is not None:
        t = time.monotonic()
        net.move_to(k.part.id)
        r.phase("IP takeover", t)
    return r, vfs


def drop_orphans(vfs, inodes: dict[int, dict]) -> int:
    """Adopted dirty pages of an inode the disk does not have (its creation was in a running
    transaction that could not be completed) have no home: they are dropped and counted."""
    lost = 0
    with vfs.lock:
        for ino, i in inodes.items():
            try:
                ok = vfs.fs.iget(ino).mode == i["mode"]
            except OSError:
                ok = False
            if not ok:
                lost += len(vfs.pc.dirty.get(ino, ()))
                vfs.pc.truncate(ino, 0)
                vfs.ic.drop(ino)
    return lost


def prepare_nic(k: Kernel, tag: str):
    """Everything the NIC takeover needs (netlink sockets and namespace handles), opened
    while in standby: attaching at takeover time cost ≈ 200 ms (measured in the lab)."""
    from kernel.net import Network
    net = Network(tag, k.machine.nics[0], [p.id for p in k.machine.partitions])
    if net.mode == "netns":
        net.attach()
    return net


def main(argv: list[str] | None = None) -> int:
    ap = kernel_arguments("python -m systems.orthros.backup", "The Orthros backup kernel")
    ap.add_argument("--watch", type=int, required=True, help="the partition to watch and take over")
    ap.add_argument("--report", required=True, help="file to write the recovery report to")
    ap.add_argument("--missed", type=int, default=param.HEARTBEAT_MISSED_BEATS,
                    help="beat intervals without a beat before the watched kernel is declared dead")
    ap.add_argument("--net-tag", help="the lab's network tag, to take the NIC over")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s backup[%(process)d] %(message)s")
    mach = machine_mod.load(args.machine)
    k = Kernel(mach, args.partition, args.physmem, args.workdir, delay=not args.no_delay)
    os.sched_setaffinity(0, k.part.cpus)
    k.join_partition(args.tag)
    k.start_mailbox(role=mailbox.ROLE_BACKUP)
    k.mailbox.set(state=mailbox.STANDBY, listening=1, watching=args.watch)
    bell = mailbox.Doorbell(args.workdir, args.partition)
    w = mach.partition(args.watch)
    prefault(k.mem, mach)
    net = prepare_nic(k, args.net_tag) if args.net_tag and mach.nics else None
    notify_ready(args.ready_fd)
    failure = watch(k, bell, partition_layout(w.id, w.base, w.size), args.missed)
    bell.close()
    if failure is None:
        log.info("partition %d shut down cleanly: nothing to take over", args.watch)
        k.mailbox.set(state=mailbox.SHUTDOWN)
        return 0
    log.info("partition %d failed (%s): fault %r, last beat %.1f ms before the verdict",
             args.watch, failure.how, failure.mail.fault,
             (failure.detected_at - failure.mail.beat_ns / 1e9) * 1e3)
    report, vfs = takeover(k, failure, args, net)
    t_serve = time.monotonic()

    specs = json.loads(open(args.apps).read()) if args.apps else []

    def serving() -> None:
        t = time.monotonic()
        report.phase("first service", t_serve, t)
        if specs:
            moved = restart_processes(k, args.watch, specs, with_state=True, netns=args.netns)
            report.processes_before = moved.before
            report.processes_recovered = moved.migrated + moved.restarted
            report.rejected += moved.rejected
            report.notes.append(f"{moved.migrated} processes migrated with their state, "
                                f"{moved.restarted} restarted")
            report.phase("process migration", t)
        report.service_at = time.monotonic()
        report.recovered = True
        tmp = args.report + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"partition": args.partition, "pid": os.getpid(), **report.to_dict()}, fh, indent=2)
        os.replace(tmp, args.report)
        log.info("took over partition %d's work in %.1f ms", args.watch, report.outage_s * 1e3)

    k.serve(args.mount, ready=serving)
    return 0


if __name__ == "__main__":
    sys.exit(main())
