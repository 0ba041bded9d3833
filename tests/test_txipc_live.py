"""txipc_sim on a live machine: a request fault is rolled back and the mount never stops;
a fault outside any request falls back to a reboot, reported so."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from harness.testbed import Testbed
from kernel.tools.fsck import fsck
from systems.base import check_report
from systems.txipc_sim import TxIPCSim

pytestmark = pytest.mark.root


@pytest.fixture
def txipc():
    with Testbed(kind="test", delay=False) as bed:
        s = TxIPCSim()
        bed.deploy(s)
        yield bed.host, s


def files(mnt: Path, tag: str, n: int = 3) -> dict[str, str]:
    out = {}
    for i in range(n):
        data = os.urandom(9000 * (i + 1))
        (mnt / f"{tag}{i}").write_bytes(data)
        out[f"{tag}{i}"] = hashlib.sha256(data).hexdigest()
    return out


def fsync_quietly(path: Path) -> None:
    with open(path, "rb+") as f:
        try:
            os.fsync(f.fileno())
        except OSError:
            pass


def check_files(mnt: Path, want: dict[str, str]) -> None:
    for n, h in want.items():
        assert hashlib.sha256((mnt / n).read_bytes()).hexdigest() == h, n


@pytest.mark.parametrize("site", ["vfs.create", "vfs.write", "vfs.rename", "fs.dir-update"])
def test_a_request_fault_is_rolled_back_and_the_service_never_stops(txipc, site):
    host, s = txipc
    mnt = Path(host.kernels[0].mount)
    pid = host.kernels[0].pid
    before = files(mnt, "a")
    reply = s.inject("exception-in-request", site=site)
    assert reply["ok"], reply
    after = files(mnt, "b")  # reaches the site: rolled back, executed again, acknowledged
    os.rename(mnt / "b0", mnt / "c0")
    after["c0"] = after.pop("b0")
    r = check_report(s.on_crash(reply, timeout=30))
    assert r.recovered and r.figures["rolled_back"] == 1 and r.figures["re_executed"] == 1
    assert r.figures["answered_error"] == 0 and r.figures["stores_logged"] > 0
    steps = ["detect", "roll-back", "cache walk", "journal completion", "tables rebuilt"]
    assert [p.name for p in r.phases] == steps
    assert host.kernels[0].pid == pid  # the same kernel process serves on
    check_files(mnt, before | after)
    host.control(0, {"cmd": "sync"})
    check_files(mnt, before | after)


def test_a_fault_in_write_back_falls_back_to_a_reboot(txipc):
    host, s = txipc
    mnt = Path(host.kernels[0].mount)
    files(mnt, "a")
    reply = s.inject("exception-in-request", site="writeback")
    # fsync writes back: outside any request's transaction. The connection outlives the
    # kernel (the host holds it), so the fsync waits until the reboot's fence ends it.
    syncing = threading.Thread(target=fsync_quietly, args=(mnt / "a0",))
    syncing.start()
    r = check_report(s.on_crash(reply, timeout=30))
    syncing.join(30)
    assert not syncing.is_alive(), "the fsync in hand at the death was never answered"
    assert r.recovered and r.figures["not_recovered"] == 1
    assert any("not recovered by the transaction" in n and "writeback" in n for n in r.notes)
    assert [p.name for p in r.phases][-1] == "first service"  # the reboot's
    os.listdir(host.kernels[0].mount)  # the rebooted kernel serves
    disk = host.workdir / host.machine.disks[0].image
    host.close()
    assert fsck(disk).problems == []
