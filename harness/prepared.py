"""A prepared data set: made once on a machine, copied into every later one.

Promises to the trials of a run and of a campaign (harness/driver.py
``Trial.prepare_data``): ``restore`` gives a machine just brought up the workload's
prepared data set — its disk images, and the files ``Workload.prepared`` names beside
them — copied from the store in this machine's scratch directory when one is there, else
made as the driver makes it (a kernel booted only for it, shut down cleanly) with the data
set's seed, then stored for the next machines. Every trial of a run, and every machine of
a campaign, thus starts from the same disk, and pays a copy (the images stay sparse)
instead of a file system's worth of writes through FUSE. A store is complete or absent: it
is written beside and renamed into place, so two trial processes preparing at once each
leave a whole one (the last wins). It goes with its scratch directory at the end of the
run (``scratch_store``) or the campaign. Every process that works in a scratch directory
stamps it (``stamp``); one whose stamps all name dead processes is an orphan, which
``orphan_stores`` lists for `crashbench down --all`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kernel import param

STORE = "prepared"
STORE_PREFIX = "crashbench-data-"  # a run's scratch store
CAMPAIGN_PREFIX = "crashbench-campaign-"  # a campaign's scratch directory on this machine
STAMPS = "owners"  # in a scratch directory: one stamp per process that works in it


@contextmanager
def scratch_store() -> Iterator[Path]:
    """A scratch directory for one run's store, removed when the run ends however it
    ends (Ctrl-C too); a SIGKILLed run's is an orphan, which ``orphan_stores`` finds and
    `crashbench down --all` removes."""
    d = Path(tempfile.mkdtemp(prefix=STORE_PREFIX))
    try:
        stamp(d, os.getpid())
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def stamp(scratch: Path, pid: int) -> Path:
    """Mark ``scratch`` as worked in by process ``pid`` (its pid and start time): while
    that process runs, the directory is not an orphan. A stamp is never removed; a dead
    process's simply stops counting."""
    from harness import owners

    d = scratch / STAMPS
    d.mkdir(exist_ok=True)
    p = d / f"{pid}.json"
    p.write_text(json.dumps(owners.owner(pid)))
    return p


def orphan_stores() -> list[Path]:
    """The scratch directories of runs and campaigns no live process has stamped (an
    unreadable stamp counts as dead: a scratch directory is never anyone's input, so a
    doubt removes it); one with a live stamp is never listed."""
    tmp = Path(tempfile.gettempdir())
    found = [*tmp.glob(STORE_PREFIX + "*"), *tmp.glob(CAMPAIGN_PREFIX + "*")]
    return sorted(d for d in found if d.is_dir() and not _stamped_alive(d))


def _stamped_alive(scratch: Path) -> bool:
    from harness import owners

    for p in (scratch / STAMPS).glob("*.json"):
        try:
            if owners.alive(json.loads(p.read_text())):
                return True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return False


def restore(trial, store_root: Path, seed: int) -> str:
    """Put the prepared data set into ``trial``'s machine: "copied" or "made" (and stored)."""
    store = store_root / STORE
    if store.is_dir():
        _copy_in(trial, store)
        return "copied"
    svc = trial.svc
    trial.svc = _with_seed(svc, seed)
    try:
        trial.make_data()
    finally:
        trial.svc = svc
    _store(trial, store)
    return "made"


def _with_seed(svc, seed: int):
    import dataclasses

    return dataclasses.replace(svc, data_seed=seed)


def _images(trial) -> list[Path]:
    return [trial.host.disk_image(d.name) for d in trial.host.machine.disks]


def _store(trial, store: Path) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepared-", dir=store.parent))
    try:
        for img in _images(trial):
            _sparse_copy(img, tmp / img.name)
        for f in trial.workload.prepared(trial.svc):
            shutil.copyfile(f, tmp / f.name)
        try:
            os.replace(tmp, store)
        except OSError:
            if not store.is_dir():
                raise
            shutil.rmtree(tmp)  # another trial process stored one first: it serves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_in(trial, store: Path) -> None:
    for img in _images(trial):
        _sparse_copy(store / img.name, img)
        os.chmod(img, param.OWNER_ONLY_MODE)  # what the machine's disks hold is its owner's
    for f in trial.workload.prepared(trial.svc):
        shutil.copyfile(store / f.name, f)


def _sparse_copy(src: Path, dst: Path) -> None:
    """A copy that keeps the image's holes (a 2 GiB image holds a few hundred MiB)."""
    r = subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise OSError(f"copying the prepared disk image {src} to {dst}: {r.stderr.strip()}")
