"""The emulated kernel as a real process, serving its file system through FUSE.

Raw-memory read-back: files written through the mount and never fsynced are found, page by
page with the right content and checksum, by a separate process that decodes the physical
memory of the kernel after it was killed.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel import param
from kernel.tools.fsck import fsck

PAGE = param.PAGE_SIZE
pytestmark = [pytest.mark.root]

DECODE = r"""
import hashlib, json, sys
from kernel.hw import machine
from kernel.core.memreader import PartitionReader
from kernel.hw.physmem import PhysMem
m = machine.load(); p = m.partition(0)
r = PartitionReader(PhysMem(sys.argv[1], readonly=True), p.base, p.size, 0)
walk = r.walk_dirty()
out = {"rejected": walk.n_rejected, "pages": {}}
for di in walk.inodes:
    for d in di.pages:
        out["pages"][f"{d['ino']}:{d['index']}"] = hashlib.sha256(r.page(d)).hexdigest()
print(json.dumps(out))
"""


def pages_of(data: bytes) -> list[str]:
    return [
        hashlib.sha256(data[i : i + PAGE].ljust(PAGE, b"\0")).hexdigest()
        for i in range(0, len(data), PAGE)
    ]


def test_dirty_pages_read_back_from_a_dead_kernels_memory(host):
    mnt = Path(host.kernels[0].mount)
    files = {
        f"f{i}": os.urandom(n) for i, n in enumerate([1, PAGE, PAGE + 1, 10 * PAGE + 7, 300_000])
    }
    inos = {}
    for name, data in files.items():
        (mnt / name).write_bytes(data)
        inos[name] = os.stat(mnt / name).st_ino
    host.crash(0)
    out = subprocess.run(
        [sys.executable, "-c", DECODE, host.physmem],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    found = json.loads(out.stdout)
    assert found["rejected"] == 0
    want = {f"{inos[n]}:{i}": h for n, d in files.items() for i, h in enumerate(pages_of(d))}
    assert {k: v for k, v in found["pages"].items() if k in want} == want
    others = {k for k in set(found["pages"]) - set(want) if not k.startswith("0:")}
    assert (
        others == set()
    )  # no other file page was dirty (ino 0: metadata of the running transaction)


def test_clean_shutdown_persists_and_fsck_is_clean(host):
    mnt = Path(host.kernels[0].mount)
    (mnt / "d").mkdir()
    (mnt / "d" / "x").write_bytes(b"hello" * 1000)
    os.symlink("d/x", mnt / "ln")
    assert host.stop(0) == 0
    assert fsck(str(host.disk_image())).exit_code == 0
    kp = host.boot(0)
    assert Path(kp.mount, "ln").read_bytes() == b"hello" * 1000


def test_fsynced_file_survives_a_crash(host):
    mnt = Path(host.kernels[0].mount)
    with open(mnt / "synced", "wb") as f:
        f.write(b"s" * 50_000)
        f.flush()
        os.fsync(f.fileno())
    (mnt / "unsynced").write_bytes(b"u" * 50_000)
    host.crash(0)
    kp = host.boot(0)
    assert Path(kp.mount, "synced").read_bytes() == b"s" * 50_000


def test_bench_detect_reports_every_fault_kind():
    from harness.benchdetect import run

    rows = [d.summary() for d in run(1)]
    assert [r["fault"] for r in rows] == ["panic", "hang", "kill"]
    assert rows[0]["detected_by"].startswith("doorbell")
    assert all(r["trials"] == 1 and r["min_ms"] > 0 for r in rows)


def test_cleanup_of_a_dead_mount_leaves_no_control_mount_behind(host):
    from kernel.hw import fusedev

    ctl = "/sys/fs/fuse/connections"
    if " fusectl " in Path("/proc/mounts").read_text():
        subprocess.run(["umount", ctl], check=True)
    mnt = host.kernels[0].mount
    host.crash(0)
    assert fusedev.abort_and_unmount(mnt)
    assert not fusedev.is_mounted(mnt)
    assert " fusectl " not in Path("/proc/mounts").read_text()
