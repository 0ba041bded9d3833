"""The machine's files and sockets belong to its owner: another user reads, panics and rings nothing."""

import json
import os
import pwd
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from kernel.hw import machine, mailbox, vmm
from kernel.hw.control import ctl_path
from kernel.hw.host import Host
from kernel.hw.physmem import partition_layout
from kernel.tools.mkfs import format_disks

pytestmark = [pytest.mark.root]


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_host():
    """Partition 0 booted and the watchdog's doorbell listening, all made under ``umask 000``,
    where nothing but an explicit mode keeps the files and sockets owner-only."""
    base = tempfile.mkdtemp(prefix="crashbench-sec-")
    os.chmod(base, 0o755)  # traversable, as a lab's parent directory is
    old = os.umask(0)
    wd = Path(base) / "machine"  # made by the Host itself
    h = Host(wd, machine.load(), delay=False)
    bell = None
    try:
        h.create_memory()
        h.disk_image().write_bytes(b"")  # an image left world-readable by an older mkfs
        os.chmod(h.disk_image(), 0o644)
        format_disks(h.machine, h.workdir, force=True)
        h.boot(0)
        bell = mailbox.Doorbell(str(wd), mailbox.WATCHDOG)
        yield h, bell
    finally:
        os.umask(old)
        if bell is not None:
            bell.close()
        h.close()
        shutil.rmtree(base, ignore_errors=True)


def test_images_memory_region_and_sockets_are_owner_only_under_umask_000(open_host, tmp_path):
    h, bell = open_host
    wd = h.workdir
    assert mode(wd) == 0o755  # servers on the mount run as other users
    assert mode(h.disk_image()) == 0o600
    os.chmod(h.disk_image(), 0o644)  # formatted before images were owner-only
    format_disks(h.machine, wd)  # kept, not formatted again
    assert mode(h.disk_image()) == 0o600
    assert mode(h.physmem) == 0o600
    assert mode(ctl_path(str(wd), 0)) == 0o600
    assert mode(bell.path) == 0o600
    region = tmp_path / "vmm"
    region.write_bytes(b"")
    os.chmod(region, 0o644)  # a region file left by an older run
    old = os.umask(0)
    try:
        p = h.machine.partition(0)
        vmm.Region.create(str(region), partition_layout(0, p.base, p.size), 1024).close()
    finally:
        os.umask(old)
    assert mode(region) == 0o600


def attempts(image: str, memory: str, ctl: str, bell: str) -> dict:
    """What another user gets trying each way in; run in a child that became `nobody`."""
    out = {}
    for name, path in (("image", image), ("memory", memory)):
        try:
            with open(path, "rb") as f:
                out[name] = f"read {len(f.read(4096))} bytes"
        except OSError as e:
            out[name] = type(e).__name__
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    try:
        s.connect(ctl)
    except OSError as e:
        out["control"] = type(e).__name__
    else:
        try:
            s.sendall(
                json.dumps({"cmd": "inject", "fault": "panic", "site": "now"}).encode() + b"\n"
            )
            reply = s.recv(4096)
        except (BrokenPipeError, ConnectionResetError):  # closed before the request was read
            reply = b""
        out["control"] = f"answered {reply!r}"
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        d.sendto(b"panic", bell)
        out["doorbell"] = "rang"
    except OSError as e:
        out["doorbell"] = type(e).__name__
    return out


def as_nobody(h, bell) -> dict:
    """Fork a child that drops to `nobody` (no supplementary groups) and tries everything."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            got = attempts(str(h.disk_image()), h.physmem, ctl_path(str(h.workdir), 0), bell.path)
            os.write(w, json.dumps(got).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    assert os.waitpid(pid, 0)[1] == 0
    return json.loads(raw)


def still_running(h, bell) -> None:
    assert bell.wait(0.5) is None  # no doorbell reached the watchdog
    assert h.kernels[0].alive()
    assert h.mail(0).state_name == "running"
    assert h.control(0, {"cmd": "status"})["ok"]


def test_another_user_reads_panics_and_rings_nothing(open_host):
    h, bell = open_host
    got = as_nobody(h, bell)
    assert got == {
        "image": "PermissionError",
        "memory": "PermissionError",
        "control": "PermissionError",
        "doorbell": "PermissionError",
    }
    still_running(h, bell)


def test_control_socket_checks_the_peer_even_when_its_mode_lets_everyone_in(open_host):
    h, bell = open_host
    os.chmod(ctl_path(str(h.workdir), 0), 0o777)  # the file's mode is not the only guard
    got = as_nobody(h, bell)
    assert got["control"] == "answered b''"  # closed unanswered, nothing injected
    still_running(h, bell)
    st = h.control(0, {"cmd": "status"})
    assert st["refused_peers"] == 1 and st["armed"] is False
    log = Path(h.kernels[0].log_path).read_text()
    assert "control: refused a connection from uid 65534" in log
