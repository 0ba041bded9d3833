"""The Otherworld crash kernel: started on the dead kernel's own partition and CPU.

Promises to the otherworld scheme (systems/otherworld/__init__.py), which starts it with
``python -m systems.otherworld.crashkernel --partition P --report FILE`` once the dead kernel
is fenced and the image in P's reserved area passed its check: it checks that image again
(it refuses to run from a corrupted one: exit status 2, the reason in its log), reads the
dead kernel's mailbox, walks the dead kernel's memory and chooses the file pages to adopt,
clean and dirty (kernel/core/cachewalk.py), takes the disk, completes the dead kernel's
running transaction if fsck would accept it (kernel/tools/txncomplete.py), mounts with the
pages adopted in place (kernel/core/pageadopt.py: each checked before it is used or written
back), becomes P's main kernel (its own mailbox, heartbeat and control socket), resurrects
the dead kernel's processes (systems/keep.py ``resurrect``: the table is read from raw
memory before this kernel takes the partition's table; each process whose entry is valid
goes on where it is, with the same pid and open files, after its crash procedure if it
registered one; the rest is killed and its application started again), serves the same
FUSE connection the dead kernel served (``--hold-pid``/``--hold-fd``: the host's copy of
it; the requests the dead kernel read and never answered are sent again, and one it had
already applied is answered from its in-flight table, kernel/core/inflight.py), and loads a
fresh crash-kernel image (the next generation) into the reserved area before it says it
is ready, so a second crash is survived too. After first service it checks the adopted pages no request has used yet and
writes its part of the RecoveryReport (phases, cache counts, every refusal's reason) to
``--report``. All of it after the image check is ``take_over``, which the successor of a
txipc_sim kernel runs too (systems/txipc_sim/server.py), after its roll-back.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time

from kernel.core import crashimage
from kernel.core.cachewalk import collect
from kernel.core.inflight import read_inflight
from kernel.core.kernel import Kernel, kernel_arguments, notify_ready
from kernel.core.memreader import check_pages
from kernel.core.proc import read_proc_table
from kernel.hw import fusedev, mailbox
from kernel.hw import machine as machine_mod
from kernel.hw.physmem import CorruptObject
from kernel.tools.txncomplete import complete_transaction
from systems import keep
from systems.adoption import check_rest, drop_orphans, report_adoption, report_lost, take_disk
from systems.base import RecoveryReport

log = logging.getLogger("crashkernel")
REFUSED_EXIT = 2  # the image failed its check: this crash kernel does not run


def dead_devices(k: Kernel) -> list[str]:
    """The devices the dead kernel owned, from its mailbox (the partition's, if unreadable)."""
    try:
        owned = mailbox.read_mail(k.mem, k.mlay).devices
    except CorruptObject as e:
        log.warning("dead kernel's mailbox unreadable (%s): taking the partition's devices", e)
        owned = ""
    return [d for d in owned.split(",") if d] or list(k.part.devices)


def adopt(k: Kernel, r: RecoveryReport, delay: bool, t: float):
    """Walk (from ``t``, when the walk of the dead kernel's memory began), take the disk,
    complete the transaction, mount with the pages adopted."""
    devices = dead_devices(k)  # before this kernel's own mailbox replaces the dead one's
    harvest = collect(k.mem, k.lay.base, k.lay.size, k.lay.part_id)  # reads memory only
    r.phase("cache migration", t)
    t = time.monotonic()
    dev = take_disk(k, devices, delay)
    txn = complete_transaction(dev, harvest.meta_blocks)
    vfs = k.boot(dev=dev, adopt=harvest.adopted, devices=",".join(devices))
    lost, lost_unchecked = drop_orphans(vfs, harvest.adopted.inodes)
    r.phase("mount + replay", t)
    report_adoption(r, harvest, txn, lost, lost_unchecked)
    return vfs, harvest.adopted.unchecked, harvest.txn_refused


def idle_check(k: Kernel, frames):
    """The checksums of adopted pages no request has used yet, computed at SCHED_IDLE: they
    share the one CPU with the restarted applications, and each page is checked on its
    first use anyway (at normal priority, 3 `files` trials showed this check taking 1.8-1.9 s
    of that CPU right after first service). The verdicts are applied at normal priority,
    under the kernel lock, so no request waits behind an idle thread holding it."""
    idle, normal = (os.SCHED_IDLE, os.sched_param(0)), (os.SCHED_OTHER, os.sched_param(0))
    try:
        os.sched_setscheduler(0, *idle)  # 0: this thread
    except OSError as e:
        log.info("background check left at normal priority (%s)", e)
    try:
        return check_pages(k.mem, k.lay, frames)
    finally:
        os.sched_setscheduler(0, *normal)


def write_report(path: str, r: RecoveryReport, extra: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump({**extra, **r.to_dict()}, fh, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = kernel_arguments("python -m systems.otherworld.crashkernel", __doc__.splitlines()[0])
    take_over_arguments(ap)
    args = ap.parse_args(argv)
    if args.report is None or args.hold_pid is None or args.hold_fd is None:
        ap.error("--report, --hold-pid and --hold-fd are required")
    started = time.monotonic()  # control reached the crash kernel's code
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s crashkernel[%(process)d] %(message)s"
    )
    mach = machine_mod.load(args.machine, shape_checked=True)  # checked by whoever started it
    k = Kernel(mach, args.partition, args.physmem, args.workdir, delay=not args.no_delay)
    if k.part.cpus:
        os.sched_setaffinity(0, k.part.cpus)
    try:
        image = crashimage.check(k.mem, k.mlay)
    except crashimage.ImageRefused as e:
        log.error("refusing to run: %s", e)
        return REFUSED_EXIT
    r = RecoveryReport("otherworld", None, started)

    def next_image(r: RecoveryReport) -> None:
        nxt = crashimage.load(k.mem, k.mlay, image.params, image.generation + 1)
        r.notes.append(f"crash-kernel image generation {nxt.generation} loaded for the next crash")

    take_over(k, args, r, {"started": started, "generation": image.generation}, next_image)
    return 0


def take_over(k: Kernel, args, r: RecoveryReport, extra: dict, before_ready=None) -> None:
    """The dead kernel's partition taken over in place by ``k`` (not booted yet), from the
    memory as it is now: its processes' table and in-flight requests read, its cache
    adopted, its processes resurrected, its connection served (``--hold-pid``/``--hold-fd``)
    — or, when it refuses the dead kernel's running transaction, none resurrected, the
    connection aborted and the apps started again on a new mount (systems/orthros/backup.py
    ``not_kept`` says why);
    ``before_ready(r)`` once it serves, before it says it is ready; then the report, with
    ``extra``, to ``--report``. Returns when the service stops. Shared by every kernel that
    takes a dead one's place on its own partition (this one; systems/txipc_sim/server.py)."""
    conn = keep.Connection.take(args.hold_pid, args.hold_fd, args.workdir)
    t = time.monotonic()
    table = read_proc_table(k.mem, k.mlay)  # before this kernel's own table replaces it
    answers = read_inflight(k.mem, k.mlay)  # and before its superblock replaces the table
    r.rejected += [str(e) for e in answers.rejected]
    k.keep_apps = True  # what it starts or resurrects outlives it in turn
    k.join_partition(args.tag)
    gc.disable()  # the adoption makes many objects and frees none: no collections
    vfs, unchecked, refused = adopt(k, r, not args.no_delay, t)
    specs = json.loads(open(args.apps).read()) if args.apps else []
    t = time.monotonic()
    if refused:  # nothing resurrected; started again once the new mount serves (below)
        keep.resurrect_into_report(r, k, [], [], [], args.netns)
        r.notes.append(keep.not_kept_note(refused, "resurrected"))
    else:
        keep.resurrect_into_report(r, k, *table, specs, args.netns)
    r.phase("process resurrection", t)
    resurrected = r.phases[-1].end

    def serving() -> None:
        r.phase("first service", resurrected)
        if refused:
            k.start_apps(specs, args.netns)
        if before_ready is not None:
            before_ready(r)
        notify_ready(args.ready_fd)
        threading.Thread(target=finish, name="check-rest", daemon=True).start()

    def finish() -> None:
        try:
            check_rest(vfs, r, unchecked, lambda frames: idle_check(k, frames))
        except Exception as e:  # the report still says what happened
            log.exception("checking the adopted pages failed")
            r.notes.append(f"checking the adopted pages failed: {e!r}")
        finally:
            report_lost(vfs, r)
            r.notes.append(answers.note())
            gc.freeze()  # no collection ever walks the page cache's tables
            gc.enable()
        write_report(args.report, r, {"pid": os.getpid(), **extra})

    if refused:  # the held connection carries requests made on the undone footing
        fusedev.abort_and_unmount(args.mount)
        os.close(conn.fd)
        k.serve(args.mount, ready=serving)
    else:
        k.resume(conn.fd, conn.params, ready=serving, answers=answers)


def take_over_arguments(ap) -> None:
    """The arguments ``take_over`` reads, beside ``kernel_arguments``'."""
    ap.add_argument("--report", help="file to write the recovery report to")
    ap.add_argument("--hold-pid", type=int, help="the process holding the FUSE connection")
    ap.add_argument("--hold-fd", type=int, help="its descriptor of the connection")


if __name__ == "__main__":
    sys.exit(main())
