"""Otherworld: a crash kernel loaded in advance takes over the crashed kernel's own partition."""

import hashlib
import os
from pathlib import Path

import pytest

from harness.testbed import Testbed
from kernel import param
from kernel.core import crashimage
from kernel.hw import machine
from kernel.hw.physmem import PhysMem, partition_layout
from kernel.tools.fsck import fsck
from systems.base import check_report
from systems.otherworld import CRASH_KERNEL, CRASH_KERNEL_CODE, Otherworld
from systems.reboot import Reboot

PAGE = 4096
# the phases of a takeover by the crash kernel, in their order
PHASES = [
    "detect",
    "image check",
    "fence",
    "crash kernel boot",
    "cache migration",
    "mount + replay",
    "process resurrection",
    "first service",
]


@pytest.fixture
def otherworld():
    with Testbed(kind="test", delay=False) as bed:
        s = Otherworld()
        bed.deploy(s)
        yield bed.host, s


def mount(host) -> Path:
    return Path(host.kernels[0].mount)


def write(mnt: Path, tag: str, synced: bool = False, n: int = 4) -> dict[str, str]:
    """Files written (acknowledged) and, unless ``synced``, left dirty; name -> sha256."""
    out = {}
    for i in range(n):
        data = os.urandom(3 * PAGE * (i + 1) + i)
        with open(mnt / f"{tag}{i}", "wb") as f:
            f.write(data)
            if synced:
                f.flush()
                os.fsync(f.fileno())
        out[f"{tag}{i}"] = hashlib.sha256(data).hexdigest()
    return out


def digests(mnt: Path, names) -> dict[str, str | None]:
    return {
        n: hashlib.sha256((mnt / n).read_bytes()).hexdigest() if (mnt / n).exists() else None
        for n in names
    }


def crash(host, s, fault, **kw):
    reply = host.control(0, {"cmd": "inject", "fault": fault, **kw})
    assert reply["ok"], reply
    return check_report(s.on_crash(reply, timeout=30))


@pytest.mark.root
@pytest.mark.parametrize(
    "fault,via", [("panic", "dying message"), ("kill", "heartbeat"), ("hang", "heartbeat")]
)
def test_every_acknowledged_dirty_page_survives_and_reaches_the_disk(otherworld, fault, via):
    host, s = otherworld
    files = write(mount(host), "u")
    r = crash(host, s, fault)
    assert r.recovered and r.detected_by == via and r.verdict == "recovered"
    assert r.cache.dirty_pages_recovered == r.cache.dirty_pages_before > 0
    assert r.cache.dirty_pages_lost == 0 and r.rejected == []
    names = [p.name for p in r.phases]
    assert names == PHASES
    assert digests(mount(host), files) == files
    # the adopted dirty pages reach the disk: a clean shutdown, fsck, a fresh kernel reads them
    assert host.stop(0) == 0
    assert fsck(str(host.disk_image())).exit_code == 0
    assert digests(Path(host.boot(0).mount), files) == files


@pytest.mark.root
def test_a_second_crash_is_survived_by_the_freshly_loaded_crash_kernel(otherworld):
    host, s = otherworld
    first = write(mount(host), "a")
    r1 = crash(host, s, "panic")
    assert any("generation 1 loaded" in n for n in r1.notes)
    second = write(mount(host), "b")
    r2 = crash(host, s, "kill")
    assert r2.recovered and r2.cache.dirty_pages_lost == 0
    assert any("generation 2 loaded" in n for n in r2.notes)
    assert digests(mount(host), first | second) == first | second
    assert s.images_refused == 0


@pytest.mark.root
def test_a_corrupted_crash_kernel_image_is_refused_and_the_machine_reboots(otherworld):
    host, s = otherworld
    synced = write(mount(host), "s", synced=True)
    unsynced = write(mount(host), "u")
    r = crash(host, s, "wild-write", target="crash-kernel")
    assert r.recovered and s.images_refused == 1
    assert any("crash-kernel image" in why for why in r.rejected), r.rejected
    names = [p.name for p in r.phases]
    assert "crash kernel boot" not in names and "cache migration" not in names
    assert names[:3] == ["detect", "image check", "fence"] and "boot" in names
    # a plain reboot: what was synced is there whole, the dirty pages are counted as lost,
    # and nothing the dead kernel held unchecked reached the disk
    assert r.cache.dirty_pages_recovered == 0 and r.cache.dirty_pages_lost > 0
    assert digests(mount(host), synced) == synced
    got = digests(mount(host), unsynced)
    assert all(got[n] in (None, unsynced[n], hashlib.sha256(b"").hexdigest()) for n in got)
    # a fresh image was loaded: the next crash is the crash kernel's again
    later = write(mount(host), "l")
    r2 = crash(host, s, "panic")
    assert "cache migration" in [p.name for p in r2.phases] and r2.cache.dirty_pages_lost == 0
    assert digests(mount(host), later) == later
    assert host.stop(0) == 0
    assert fsck(str(host.disk_image())).exit_code == 0


@pytest.mark.root
def test_the_crash_kernel_spends_the_profiles_kernel_boot_and_a_fallback_the_firmware_too(
    tmp_path,
):
    from tests.test_machine import PROFILE
    from tests.test_machine import write as write_machine

    m = write_machine(tmp_path, PROFILE.replace("firmware_s = 1.5", "firmware_s = 0.3"))
    m.write_text(m.read_text().replace("kernel_boot_s = 2", "kernel_boot_s = 0.2"))
    with Testbed(kind="test", delay=False, machine_file=str(m)) as bed:
        s = Otherworld()
        bed.deploy(s)
        r = crash(bed.host, s, "panic")
        modeled = {p.name: p.seconds for p in r.phases if p.modeled}
        assert list(modeled) == ["kernel boot"] and modeled["kernel boot"] >= 0.2
        assert r.recovered and "cache migration" in [p.name for p in r.phases]
        r = crash(bed.host, s, "wild-write", target="crash-kernel")
        modeled = {p.name: p.seconds for p in r.phases if p.modeled}
        assert list(modeled) == ["firmware", "kernel boot"] and modeled["firmware"] >= 0.3


@pytest.mark.root
def test_a_partition_without_a_crash_kernel_has_no_image_to_corrupt():
    with Testbed(kind="test", delay=False) as bed:
        bed.deploy(Reboot())
        reply = bed.host.control(
            0, {"cmd": "inject", "fault": "wild-write", "target": "crash-kernel"}
        )
    assert not reply["ok"] and "no crash-kernel image" in reply["error"]


@pytest.fixture
def region(tmp_path):
    size = 64 << 20
    mem = PhysMem(str(tmp_path / "mem"), size, create=True)
    yield mem, partition_layout(0, 0, size)
    mem.close()


def params() -> dict:
    return {"module": CRASH_KERNEL, "modules": list(CRASH_KERNEL_CODE), "partition": 0}


def test_a_loaded_image_passes_its_check(region):
    mem, lay = region
    crashimage.load(mem, lay, params(), generation=3)
    got = crashimage.check(mem, lay)
    assert got.params == params() and got.generation == 3


@pytest.mark.parametrize(
    "where,why",
    [(0, "header"), (16, "header"), (crashimage.IMAGE.size + 2, "payload checksum")],
)
def test_a_corrupted_image_is_refused_with_its_reason(region, where, why):
    mem, lay = region
    crashimage.load(mem, lay, params())
    old = mem.read(lay.crashk + where, 1)[0]
    mem.write(lay.crashk + where, bytes([old ^ 0x10]))
    with pytest.raises(crashimage.ImageRefused, match=why):
        crashimage.check(mem, lay)


def test_an_image_whose_code_changed_since_it_was_loaded_is_refused(region, monkeypatch):
    mem, lay = region
    crashimage.load(mem, lay, params())
    real = crashimage.code_digest
    monkeypatch.setattr(crashimage, "code_digest", lambda mods: bytes(32) if mods else real(mods))
    with pytest.raises(crashimage.ImageRefused, match="code digest"):
        crashimage.check(mem, lay)


def test_no_image_is_refused_and_has_no_span(region):
    mem, lay = region
    with pytest.raises(crashimage.ImageRefused, match="magic"):
        crashimage.check(mem, lay)
    with pytest.raises(ValueError, match="no crash-kernel image"):
        crashimage.record_span(mem, lay)


def test_it_reserves_the_crash_kernel_area_and_no_core():
    res = Otherworld.reservation(machine.load())
    assert res.cores == 0 and res.cpus == () and res.memory_bytes == param.CRASHK_BYTES
    caps = Otherworld.capabilities
    assert caps.keeps_dirty_cache and caps.keeps_unmodified_processes and caps.keeps_processes
