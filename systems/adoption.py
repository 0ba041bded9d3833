"""Adopting a dead kernel's file cache: the steps every adopting scheme shares.

Promises to the schemes that adopt a dead kernel's page cache (the Orthros backup on another
partition, the Otherworld crash kernel on the same one): ``take_disk`` takes the dead
kernel's disk once its exclusive lock is released (only a dead owner releases it);
``drop_orphans`` drops, and counts, adopted dirty pages of a file the disk does not have;
``report_adoption`` puts the adoption's counts into the report (pages before and
recovered, rejected objects with their reasons, dirty pages of files never created) and
``report_transaction`` what became of the dead kernel's running transaction into the
report (every refusal with its reason); ``check_rest`` checks, after first service, the
adopted pages no request has used yet and counts them all; ``report_lost`` names every page
(or file) whose unsynced data was lost and now reads as EIO.
"""

from __future__ import annotations

import time

import numpy as np

from kernel import param
from kernel.core.pageadopt import WHOLE_FILE, Unchecked
from kernel.hw.blockdev import BlockDevice, DeviceError
from systems.base import RecoveryReport

FENCE_TIMEOUT_S = 5.0  # the dead kernel's disk lock must be released by then
CHECK_ROUND = 16384  # adopted pages checked at once after first service (fits the checker's pipes)


def take_disk(k, names: list[str], delay: bool) -> BlockDevice:
    disk = next(k.machine.disk(n) for n in names if n in {d.name for d in k.machine.disks})
    deadline = time.monotonic() + FENCE_TIMEOUT_S
    while True:
        try:
            return BlockDevice(k.disk_path(disk), disk.model, delay=delay, timing=disk.timing)
        except DeviceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005)


def report_adoption(r: RecoveryReport, harvest, txn, lost: int, lost_unchecked: int) -> None:
    """The cache figures of an adoption: ``harvest`` as the memory walk found it, ``txn``
    the running transaction's completion, ``lost`` and ``lost_unchecked`` the adopted dirty
    pages, checked and unchecked, whose file the disk does not have (``drop_orphans``). Only
    the checked ones are taken from the dirty pages recovered now: the unchecked ones are
    counted when checked (``check_rest``), and a dropped one never is."""
    a, c = harvest.adopted, r.cache
    c.pages_before, c.dirty_pages_before = harvest.pages_before, harvest.dirty_before
    c.pages_recovered = len(a.frames)
    # only the pages checked now count as recovered here; an unchecked one counts once its
    # check passes (check_rest), and an orphan was dropped unchecked: never counted at all
    c.dirty_pages_recovered = harvest.n_dirty - lost
    c.pages_rejected = sum(
        1 for e in harvest.rejected if e.kind in ("page frame", "page descriptor")
    )
    r.rejected += [str(e) for e in harvest.rejected]
    if a.unchecked is not None and a.unchecked.left:
        r.notes.append(
            f"{a.unchecked.left} pages ({a.unchecked.left_dirty} dirty) adopted unchecked, "
            "each checked on first use or after first service"
        )
    if harvest.txn_refused:
        r.notes.append(f"running transaction not completed: {harvest.txn_refused}")
    report_transaction(r, txn, harvest.undone)
    if lost + lost_unchecked:
        r.notes.append(
            f"{lost + lost_unchecked} dirty pages belonged to files whose creation was never "
            "committed"
        )


def report_transaction(r: RecoveryReport, txn, undone: int) -> None:
    """What became of the dead kernel's running transaction, in the report: what fsck
    would have rejected is counted and each reason listed, as any refused object is."""
    r.cache.metadata_rejected += txn.rejected_blocks
    r.rejected += [f"running transaction: {p}" for p in txn.refused]
    if undone:
        r.notes.append(
            f"the kernel died inside a file-system operation: its {undone} metadata "
            "blocks put back as before it, from its undo record"
        )
    if txn.reverted:
        r.notes.append(
            f"inodes {', '.join(map(str, txn.reverted))} of the running transaction "
            "put back as on the disk: the rest passed the check"
        )
    if txn.committed:
        r.notes.append(
            f"completed the dead kernel's running transaction ({txn.committed} metadata blocks)"
        )
    elif txn.refused:
        r.notes.append("running transaction not completed: fsck would reject it")


def check_rest(vfs, r: RecoveryReport, u: Unchecked | None, check) -> None:
    """After first service: check the adopted pages no request has used yet, then count
    them all. The checksums are computed without the kernel lock by ``check(frames)``
    (shared with the helper on the dead kernel's CPU, idle by now); the verdicts are
    applied a batch at a time under the lock, so requests go on between batches."""
    if u is None:
        return
    t = time.monotonic()
    with vfs.lock:
        pos = np.flatnonzero(u.open)
        frames = u.frames[pos]
    for lo in range(0, len(pos), CHECK_ROUND):
        desc_ok, ok = check(frames[lo : lo + CHECK_ROUND])
        for i in range(0, len(ok), param.ADOPT_CHECK_BATCH):
            j = i + param.ADOPT_CHECK_BATCH
            with vfs.lock:
                vfs.pc.settle_checked(pos[lo + i : lo + j], desc_ok[i:j], ok[i:j])
    if u.left:  # every entry open at the snapshot was settled, and none opens later
        raise RuntimeError(f"{u.left} adopted pages left unchecked")
    took = time.monotonic() - t
    r.cache.pages_recovered += u.good
    r.cache.dirty_pages_recovered += u.good_dirty
    r.cache.dirty_pages_superseded += u.superseded_dirty
    r.cache.pages_rejected += len(u.rejected)
    r.rejected += [str(e) for e in u.rejected]
    r.notes.append(
        f"pages checked after first service: {u.good + len(u.rejected)} "
        f"(the rest in the background in {took * 1e3:.1f} ms); "
        f"{u.dropped} dropped unread (written, truncated or reclaimed first), "
        f"{u.superseded_dirty} of them dirty: superseded by a truncation after the takeover"
    )


def report_lost(vfs, r: RecoveryReport) -> None:
    """Name in the report every page (or file) whose unsynced data was lost and now reads
    as EIO (kernel/core/pageadopt.py ``Lost``), once every adopted page has been checked."""
    with vfs.lock:
        why = list(vfs.pc.lost.why)
    r.notes += [f"lost, reads fail with EIO until overwritten or truncated: {w}" for w in why]


def drop_orphans(vfs, inodes: dict[int, dict]) -> tuple[int, int]:
    """Adopted dirty pages of an inode the disk does not have (its creation was in a running
    transaction that could not be completed) have no home: they are dropped and counted,
    checked and unchecked ones apart."""
    lost = lost_unchecked = 0
    u = vfs.pc.unchecked
    with vfs.lock:
        for ino, i in inodes.items():
            try:
                ok = vfs.fs.iget(ino).mode == i["mode"]
            except OSError:
                ok = False
            if not ok:
                lost += len(vfs.pc.dirty.get(ino, ()))
                if u is not None:
                    pos = u.find(ino, 0, WHOLE_FILE)
                    lost_unchecked += int(np.count_nonzero(u.dirty[pos]))
                vfs.pc.truncate(ino, 0, orphaned=True)
                vfs.ic.drop(ino)
    return lost, lost_unchecked
