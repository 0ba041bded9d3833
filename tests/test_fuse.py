"""The FUSE adapter (kernel/core/fuse.py): the emulated kernel's VFS used by ordinary os.* calls.

Each test mounts a fresh VFS (tests/stack.py) served by kernel.core.fuse in a child process, and
the fixture always takes the mount down again: clean stop, else SIGKILL, then
abort_and_unmount if anything is still mounted. Anything that could block on a dead or
hung mount runs in a thread with a deadline; a teardown abort releases it.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernel.hw import fusedev

pytestmark = [pytest.mark.root]
REPO = Path(__file__).resolve().parent.parent
NOBODY, NOGROUP = 65534, 65534
# An interpreter "nobody" may run (the venv's may live under root's home); stdlib only.
PLAIN_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable
# A request in flight when the connection dies fails ECONNABORTED, later ones ENOTCONN.
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)

# The daemon: a fresh Stack (physical memory + disk + VFS) served on a mount point. Two
# names make the VFS fail as only a broken kernel would: "__bug__" raises a plain bug,
# "__panic__" the fault layer's KernelPanic (defined here if kernel.core.faults has none yet).
DAEMON = r"""
import logging, signal, sys
from pathlib import Path
from kernel.core import faults, fuse
from tests.stack import Stack

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")
if not hasattr(faults, "KernelPanic"):
    class KernelPanic(Exception):
        pass
    faults.KernelPanic = KernelPanic

class TestPanic(faults.KernelPanic):
    def __init__(self):
        BaseException.__init__(self, "injected panic")

st = Stack(Path(sys.argv[1]), **({"disk": int(sys.argv[3]), "journal_blocks": 256} if len(sys.argv) > 3 else {}))
vfs = st.vfs
real_lookup = vfs.lookup

def lookup(parent, name):
    if name == b"__bug__":
        raise RuntimeError("injected bug")
    if name == b"__panic__":
        raise TestPanic()
    return real_lookup(parent, name)

vfs.lookup = lookup
signal.signal(signal.SIGTERM, lambda *_: fuse.stop())
fuse.serve(vfs, sys.argv[2], fsname="crashbench-test", ready=lambda: print("ready", flush=True))
st.close()
print("stopped", flush=True)
"""


def within(seconds: float, fn, *args):
    """fn(*args) in a thread; its result, or AssertionError if it did not return in time.
    (A thread left blocked on the mount is released by the fixture's abort.)"""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the test below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def errno_of(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


class Daemon:
    def __init__(
        self,
        work: Path,
        mnt: Path,
        disk: int | None = None,
        *,
        script: str = DAEMON,
        args: tuple = (),
        pass_fds: tuple = (),
        log: str = "daemon.log",
        wait: bool = True,
    ):
        self.work, self.mnt = work, mnt
        self.log = work / log
        self.logf = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(work),
                str(mnt),
                *([str(disk)] if disk else []),
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.logf,
            stdin=subprocess.DEVNULL,
            pass_fds=pass_fds,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                break
        if line.strip() != b"ready":
            self.teardown()
            raise RuntimeError(f"daemon did not come up: {line!r}\n{self.log.read_text()}")

    def path(self, *parts) -> Path:
        return self.mnt.joinpath(*parts)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def teardown(self) -> None:
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test stopped it
                try:
                    self.stop(10)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            if fusedev.is_mounted(str(self.mnt)):
                fusedev.abort_and_unmount(str(self.mnt))
            self.proc.stdout.close()
            self.logf.close()


@contextmanager
def reachable_mountdir():
    """A mount point everyone can reach (pytest's tmp_path is mode 700), removed after
    whatever the body did: a mount left on it is taken down first, and a directory that
    still cannot be removed is an error, never left behind in silence."""
    top = Path(tempfile.mkdtemp(prefix="crashbench-fuse-", dir="/tmp"))
    try:
        top.chmod(0o755)
        mnt = top / "mnt point"  # a space: mountinfo escapes it
        mnt.mkdir()
        yield mnt
    finally:
        fusedev.abort_and_unmount(str(top / "mnt point"))  # never stats: safe on a dead daemon
        shutil.rmtree(top)


@pytest.fixture
def mountdir():
    with reachable_mountdir() as mnt:
        yield mnt


def test_the_mount_point_is_removed_even_when_the_test_fails():
    with pytest.raises(RuntimeError), reachable_mountdir() as mnt:
        top = mnt.parent
        raise RuntimeError("a failing test")
    assert not top.exists()


@pytest.fixture
def daemon(tmp_path, mountdir):
    d = Daemon(tmp_path, mountdir)
    try:
        yield d
    finally:
        d.teardown()
    assert not fusedev.is_mounted(str(mountdir))


# --- files ------------------------------------------------------------------------------
def test_mount_is_listed_with_its_options(daemon):
    assert fusedev.is_mounted(str(daemon.mnt))
    [m] = fusedev.mounts_at(str(daemon.mnt))
    assert m["fstype"] == "fuse.crashbench" and m["source"] == "crashbench-test"
    dev = f" {m['major']}:{m['minor']} "
    opts = next(line for line in open("/proc/self/mountinfo") if dev in line)
    assert "allow_other" in opts and "default_permissions" in opts
    assert stat.S_ISDIR(os.stat(daemon.mnt).st_mode)


def test_create_write_read_append_truncate(daemon):
    p = daemon.path("f")
    data = os.urandom(3 * 1024 * 1024 + 123)
    p.write_bytes(data)
    assert p.read_bytes() == data
    assert os.stat(p).st_size == len(data)
    with open(p, "r+b") as f:  # overwrite in the middle, pread
        f.seek(5000)
        f.write(b"X" * 10)
        f.flush()
        assert os.pread(f.fileno(), 20, 4995) == data[4995:5000] + b"X" * 10 + data[5010:5015]
    with open(p, "ab") as f:  # O_APPEND
        f.write(b"tail")
    assert os.stat(p).st_size == len(data) + 4
    fd1 = os.open(p, os.O_WRONLY | os.O_APPEND)  # two appenders interleave, nothing lost
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd1, b"1")
        os.write(fd2, b"2")
        os.write(fd1, b"3")
    finally:
        os.close(fd1)
        os.close(fd2)
    assert p.read_bytes()[-7:] == b"tail123"
    os.truncate(p, 100)  # truncate(2) by path
    assert p.read_bytes() == data[:100]
    with open(p, "r+b") as f:  # ftruncate(2): grows with zeros
        os.ftruncate(f.fileno(), 8192)
    assert p.read_bytes() == data[:100] + bytes(8092)
    with open(p, "wb") as f:  # O_TRUNC at open
        f.write(b"new")
    assert p.read_bytes() == b"new"


def test_sparse_write_and_read_past_end(daemon):
    p = daemon.path("sparse")
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, b"end", 10 * 4096 + 7)
        assert os.pread(fd, 10, 0) == bytes(10)
        assert os.pread(fd, 100, 10 * 4096) == bytes(7) + b"end"
        assert os.pread(fd, 10, 1 << 20) == b""
    finally:
        os.close(fd)
    assert errno_of(os.open, p, os.O_RDWR | os.O_CREAT | os.O_EXCL) == errno.EEXIST


def test_every_read_after_open_reaches_the_kernel(daemon):
    """No keep_cache: the host drops a file's pages at open, so what a later open reads is
    what the emulated kernel has (here: a write through another descriptor)."""
    p = daemon.path("c")
    p.write_bytes(b"a" * 8192)
    assert p.read_bytes() == b"a" * 8192
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"b" * 4096, 0)
    os.close(fd)
    assert p.read_bytes() == b"b" * 4096 + b"a" * 4096


def test_namespace_operations(daemon):
    d = daemon.path("dir")
    d.mkdir()
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    assert sorted(os.listdir(d)) == ["a", "b"]
    assert os.stat(d).st_nlink == 2
    os.mkdir(d / "sub")
    assert os.stat(d).st_nlink == 3
    os.rename(d / "a", d / "sub" / "a2")  # across directories
    assert (d / "sub" / "a2").read_bytes() == b"A" and not (d / "a").exists()
    os.rename(d / "b", d / "sub" / "a2")  # over an existing file
    assert (d / "sub" / "a2").read_bytes() == b"B" and not (d / "b").exists()
    assert errno_of(os.rmdir, d / "sub") == errno.ENOTEMPTY
    os.symlink("sub/a2", d / "ln")
    assert os.readlink(d / "ln") == "sub/a2"
    assert stat.S_ISLNK(os.lstat(d / "ln").st_mode)
    assert (d / "ln").read_bytes() == b"B"
    os.link(d / "sub" / "a2", d / "hard")
    s1, s2 = os.stat(d / "hard"), os.stat(d / "sub" / "a2")
    assert s1.st_ino == s2.st_ino and s1.st_nlink == 2
    os.unlink(d / "sub" / "a2")
    assert os.stat(d / "hard").st_nlink == 1 and (d / "hard").read_bytes() == b"B"
    os.rename(d / "sub", d / "sub2")  # a directory
    os.rmdir(d / "sub2")
    assert sorted(os.listdir(d)) == ["hard", "ln"]
    assert errno_of(os.stat, d / "nothing") == errno.ENOENT
    assert errno_of(os.mkdir, d / "hard") == errno.EEXIST
    assert errno_of(os.rmdir, d / "hard") == errno.ENOTDIR
    assert errno_of(os.unlink, d / "nothing") == errno.ENOENT
    (d / "hard").write_bytes(b"")  # the name was looked up negative before
    assert errno_of(os.stat, d / "gone") == errno.ENOENT
    (d / "gone").write_bytes(b"now here")  # a cached negative entry does not hide it
    assert (d / "gone").read_bytes() == b"now here"


def test_attributes_and_fsync(daemon):
    p = daemon.path("f")
    p.write_bytes(b"x" * 5000)
    os.chmod(p, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    os.chown(p, 1234, 5678)
    s = os.stat(p)
    assert (s.st_uid, s.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    s = os.stat(p)
    assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    os.utime(p)  # UTIME_NOW
    assert abs(os.stat(p).st_mtime - time.time()) < 5
    assert os.stat(p).st_blocks * 512 >= 5000
    fd = os.open(p, os.O_RDWR)
    try:
        os.write(fd, b"y")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(daemon.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    v = os.statvfs(daemon.mnt)
    assert v.f_bsize == 4096 and v.f_blocks > v.f_bfree > 0 and v.f_files > v.f_ffree > 0
    assert v.f_namemax == 255


def test_set_id_bits_are_cleared_by_write_and_inherited_group(daemon):
    p = daemon.path("suid")
    p.write_bytes(b"#!/bin/sh\n")
    os.chmod(p, 0o6755)
    with open(p, "ab") as f:
        f.write(b"echo\n")
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o755
    d = daemon.path("sgid")
    d.mkdir()
    os.chown(d, 0, 4321)
    os.chmod(d, 0o2775)
    (d / "f").write_bytes(b"")
    (d / "sub").mkdir()
    assert os.stat(d / "f").st_gid == 4321
    assert os.stat(d / "sub").st_gid == 4321 and os.stat(d / "sub").st_mode & stat.S_ISGID


def test_special_files(daemon):
    os.mkfifo(daemon.path("fifo"))
    assert stat.S_ISFIFO(os.stat(daemon.path("fifo")).st_mode)
    dev = stat.S_IFCHR | 0o666
    assert errno_of(os.mknod, daemon.path("null"), dev, os.makedev(1, 3)) == errno.EPERM
    with socket.socket(socket.AF_UNIX) as srv, socket.socket(socket.AF_UNIX) as cli:
        srv.bind(str(daemon.path("sock")))  # a server's socket on the mount
        srv.listen()
        cli.connect(str(daemon.path("sock")))
        conn, _ = srv.accept()
        with conn:
            cli.sendall(b"ping")
            assert conn.recv(4) == b"ping"
    assert stat.S_ISSOCK(os.stat(daemon.path("sock")).st_mode)


def test_xattrs_are_unsupported_without_hanging(daemon):
    p = daemon.path("x")
    p.write_bytes(b"")
    unsupported = {errno.EOPNOTSUPP, errno.ENOSYS}
    for _ in range(2):  # the second round is answered by the host
        assert within(10, errno_of, os.getxattr, p, "user.a") in unsupported
        assert within(10, errno_of, os.setxattr, p, "user.a", b"1") in unsupported
        assert within(10, errno_of, os.removexattr, p, "user.a") in unsupported
        assert within(10, errno_of, os.listxattr, p) in unsupported


def test_large_directory_listing_and_removal_while_listing(daemon):
    d = daemon.path("many")
    d.mkdir()
    names = {f"{'n' * 100}-{i:04d}" for i in range(600)}  # several READDIRPLUS batches
    for n in names:
        (d / n).write_bytes(b"")
    assert set(os.listdir(d)) == names
    seen, removed = [], set()
    with os.scandir(d) as it:
        for i, e in enumerate(it):
            seen.append(e.name)
            if i % 3 == 0:  # remove ones not listed yet
                for n in sorted(names - set(seen) - removed)[:2]:
                    os.unlink(d / n)
                    removed.add(n)
    assert len(seen) == len(set(seen))  # nothing listed twice
    assert names - removed <= set(seen)  # nothing still there was skipped
    assert not set(seen) & (removed - set(seen))
    assert set(os.listdir(d)) == names - removed


def test_unlinked_open_file_stays_readable_until_closed(daemon):
    base = os.statvfs(daemon.mnt).f_ffree
    p = daemon.path("tmpfile")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"still here" * 1000)
        assert os.statvfs(daemon.mnt).f_ffree == base - 1
        os.unlink(p)
        assert not p.exists()
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 10, 0) == b"still here"
        os.pwrite(fd, b"more", 10_000)
        assert os.pread(fd, 10_004, 0) == b"still here" * 1000 + b"more"
        assert os.statvfs(daemon.mnt).f_ffree == base - 1  # held by the open file
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10  # RELEASE and FORGET are async
    while os.statvfs(daemon.mnt).f_ffree != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.statvfs(daemon.mnt).f_ffree == base  # freed once closed and forgotten


def test_file_renamed_over_while_open_stays_readable(daemon):
    base = os.statvfs(daemon.mnt).f_ffree
    daemon.path("victim").write_bytes(b"old")
    daemon.path("other").write_bytes(b"new")
    fd = os.open(daemon.path("victim"), os.O_RDONLY)
    try:
        os.rename(daemon.path("other"), daemon.path("victim"))
        assert daemon.path("victim").read_bytes() == b"new"
        assert os.pread(fd, 3, 0) == b"old"
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while os.statvfs(daemon.mnt).f_ffree != base - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.statvfs(daemon.mnt).f_ffree == base - 1  # only "victim" (new) is left


# --- permissions (default_permissions, allow_other) ---------------------------------------
AS_NOBODY = r"""
import errno, os, sys
mnt = sys.argv[1]
def try_(fn, *a):
    try:
        fn(*a)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
def create(p):
    with open(p, "wb") as f:
        f.write(b"mine")
print(try_(create, mnt + "/mine/f"), try_(os.mkdir, mnt + "/mine/d"),
      try_(lambda: open(mnt + "/mine/f", "rb").read()),
      try_(create, mnt + "/theirs/f"), try_(os.mkdir, mnt + "/theirs/d"),
      try_(os.unlink, mnt + "/theirs/keep"), try_(lambda: open(mnt + "/theirs/secret", "rb")),
      try_(os.chmod, mnt + "/theirs/keep", 0o777), try_(os.chown, mnt + "/mine/f", 0, 0))
print(os.stat(mnt + "/mine/f").st_uid, os.stat(mnt + "/mine/f").st_gid)
"""


def test_non_root_user_is_allowed_in_its_dir_and_refused_elsewhere(daemon):
    mine, theirs = daemon.path("mine"), daemon.path("theirs")
    mine.mkdir()
    os.chown(mine, NOBODY, NOGROUP)
    theirs.mkdir(mode=0o755)
    (theirs / "keep").write_bytes(b"k")
    (theirs / "secret").write_bytes(b"s")
    os.chmod(theirs / "secret", 0o600)
    out = subprocess.run(
        [PLAIN_PYTHON, "-c", AS_NOBODY, str(daemon.mnt)],
        user=NOBODY,
        group=NOGROUP,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.split() == [
        "ok",
        "ok",
        "ok",
        "EACCES",
        "EACCES",
        "EACCES",
        "EACCES",
        "EPERM",
        "EPERM",
    ]
    assert second.split() == [str(NOBODY), str(NOGROUP)]
    assert (mine / "f").read_bytes() == b"mine"


# --- failures inside the kernel -------------------------------------------------------------
def test_bug_in_a_request_is_eio_and_the_daemon_goes_on(daemon):
    assert within(10, errno_of, os.stat, daemon.path("__bug__")) == errno.EIO
    daemon.path("after").write_bytes(b"fine")
    assert daemon.path("after").read_bytes() == b"fine"
    log = daemon.log.read_text()
    assert "RuntimeError: injected bug" in log and "Traceback" in log
    assert daemon.proc.poll() is None


def test_kernel_panic_propagates_and_leaves_a_dead_mount(daemon):
    daemon.path("f").write_bytes(b"x")
    assert within(10, errno_of, os.stat, daemon.path("__panic__")) in DEAD
    assert daemon.proc.wait(10) != 0
    assert "injected panic" in daemon.log.read_text()
    assert fusedev.is_mounted(str(daemon.mnt))  # dead, as a crash leaves it
    assert within(10, errno_of, os.stat, daemon.path("f")) == errno.ENOTCONN
    assert within(20, fusedev.abort_and_unmount, str(daemon.mnt)) is True
    assert not fusedev.is_mounted(str(daemon.mnt))


def test_sigkill_leaves_a_dead_mount_that_abort_and_unmount_cleans(daemon):
    p = daemon.path("open")
    p.write_bytes(b"data")
    fd = os.open(p, os.O_RDONLY)
    try:
        daemon.kill()
        assert fusedev.is_mounted(str(daemon.mnt))
        assert within(10, errno_of, os.stat, daemon.path("x")) == errno.ENOTCONN
        assert within(20, fusedev.abort_and_unmount, str(daemon.mnt)) is True
        assert not fusedev.is_mounted(str(daemon.mnt))
        assert within(10, errno_of, os.pread, fd, 4, 0) == errno.ENOTCONN
    finally:
        os.close(fd)
    assert within(10, os.listdir, daemon.mnt) == []  # the bare directory again
    assert within(10, fusedev.abort_and_unmount, str(daemon.mnt)) is False


def test_hung_daemon_is_aborted_without_hanging(daemon):
    """A daemon that lives but does not answer (a hang fault): clients block on it;
    abort_and_unmount must neither block itself nor leave them blocked."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        res: dict = {}

        def client():
            try:
                os.stat(daemon.path("never-seen"))
            except OSError as e:
                res["errno"] = e.errno

        t = threading.Thread(target=client, daemon=True)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # really stuck on the mount
        assert within(20, fusedev.abort_and_unmount, str(daemon.mnt)) is True
        t.join(10)
        assert not t.is_alive() and res["errno"] in DEAD
        assert not fusedev.is_mounted(str(daemon.mnt))
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
        daemon.kill()


def test_stop_unmounts_cleanly(daemon):
    daemon.path("f").write_bytes(b"x")
    assert daemon.stop() == 0
    assert daemon.proc.stdout.read().strip() == b"stopped"
    assert not fusedev.is_mounted(str(daemon.mnt))


def test_is_mounted_and_abort_on_plain_directories(tmp_path):
    assert not fusedev.is_mounted(str(tmp_path))
    assert fusedev.abort_and_unmount(str(tmp_path)) is False
    assert not fusedev.is_mounted("/proc")  # mounted, but not FUSE
    assert fusedev.abort_and_unmount("/proc") is False and os.path.exists("/proc/self")


def test_full_device_keeps_acknowledged_writes_and_refuses_the_rest(tmp_path, mountdir):
    """A write the device cannot hold fails ENOSPC and changes nothing; every write that
    returned reads back after fsync; overwrites of written blocks still succeed."""
    d = Daemon(tmp_path, mountdir, disk=8 << 20)
    try:
        p = d.path("f")
        acked = bytearray()

        def fill():
            fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for k in range(4000):
                    piece = bytes([k % 251 + 1]) * (64 << 10)
                    try:
                        os.pwrite(fd, piece, len(acked))
                    except OSError as e:
                        assert e.errno == errno.ENOSPC
                        assert os.fstat(fd).st_size == len(acked)
                        break
                    acked.extend(piece)
                else:
                    raise AssertionError("no ENOSPC")
                os.fsync(fd)
                os.pwrite(fd, b"over" * 1000, 3 * 4096)  # blocks on the device: no space needed
                acked[3 * 4096 : 3 * 4096 + 4000] = b"over" * 1000
                os.fsync(fd)
            finally:
                os.close(fd)
            return p.read_bytes()

        assert within(120, fill) == bytes(acked)
        assert len(acked) > 4 << 20
    finally:
        d.teardown()
    assert "Traceback" not in d.log.read_text()


# --- a connection served by a second process (the takeover's foundation) --------------------
# "serve": a fresh Stack, mounted; once INIT is done, the connection's descriptor and
# parameters go out over the Unix socket whose number is argv[4]. "resume": the same disk
# (fsynced data only: memory is not adopted here) served on the connection received from it.
HANDOFF = r"""
import json, logging, signal, socket, sys
from pathlib import Path
from kernel.core import fuse
from tests.stack import Stack

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
mode, sock = sys.argv[3], socket.socket(fileno=int(sys.argv[4]))
signal.signal(signal.SIGTERM, lambda *_: fuse.stop())

def hand_over():
    fd, params = fuse.connection()
    socket.send_fds(sock, [json.dumps(params.as_dict()).encode()], [fd])
    print("ready", flush=True)

if mode == "serve":
    st = Stack(Path(sys.argv[1]))
    fuse.serve(st.vfs, sys.argv[2], fsname="crashbench-test", ready=hand_over)
else:
    msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    st = Stack(Path(sys.argv[1]), fresh=False)
    fuse.resume(fds[0], json.loads(msg), st.vfs, ready=lambda: print("ready", flush=True))
st.close()
print("stopped", flush=True)
"""


def test_a_second_process_resumes_the_connection_and_open_files_go_on(tmp_path, mountdir):
    """The first server is SIGKILLed while this process holds a file open on the mount and
    a duplicate of the connection's descriptor (as the machine will): the connection is
    not aborted, a request made meanwhile waits, and a second server handed the
    descriptor over a Unix socket answers it and the open file's next write and read."""
    from_a, to_host = socket.socketpair()
    host_b, to_b = socket.socketpair()
    a = Daemon(
        tmp_path,
        mountdir,
        script=HANDOFF,
        args=("serve", str(to_host.fileno())),
        pass_fds=(to_host.fileno(),),
        log="a.log",
    )
    b = listing = None
    fd = dup = -1
    try:
        msg, fds, _, _ = socket.recv_fds(from_a, 1 << 16, 1)
        dup = fds[0]
        # Started now, it waits for the descriptor: no process may fork (and close its
        # copy of a file on the mount, a FLUSH) while no server answers.
        b = Daemon(
            tmp_path,
            mountdir,
            script=HANDOFF,
            args=("resume", str(to_b.fileno())),
            pass_fds=(to_b.fileno(),),
            log="b.log",
            wait=False,
        )
        [conn] = fusedev.mounts_at(str(mountdir))
        p = a.path("held")
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"before")
        os.fsync(fd)  # the second server reads the disk
        names = _fill_dir(a.path("many"), 600)
        _fill_dir(a.path("other"), 3)
        listing = os.scandir(a.path("many"))  # a directory handle of the first server
        first = next(listing).name  # one batch of several read through it
        a.kill()
        assert fusedev.mounts_at(str(mountdir)) == [conn]  # same connection, still mounted
        waiting: dict = {}
        t = threading.Thread(
            target=lambda: waiting.update(e=errno_of(os.stat, a.path("new"))), daemon=True
        )
        t.start()
        t.join(0.5)
        assert t.is_alive()  # queued, not ENOTCONN
        socket.send_fds(host_b, [msg], [dup])
        b.wait_ready()
        t.join(20)
        assert not t.is_alive() and waiting["e"] == errno.ENOENT
        # Handles of the second server's own, as many as the first gave out: a server
        # counting from 1 again would reuse the listing's number for another directory.
        mine = [os.scandir(a.path("other")) for _ in range(3)]
        for it in mine:
            next(it)
        rest = within(20, lambda: [e.name for e in listing])
        for it in mine:
            it.close()
        listing.close()
        assert len(rest) + 1 == len(names) and {first, *rest} == names
        assert within(20, os.pwrite, fd, b"after", 6) == 5
        assert within(20, os.pread, fd, 64, 0) == b"beforeafter"
        within(20, os.fsync, fd)
        a.path("new").write_bytes(b"made by the second server")
        assert a.path("new").read_bytes() == b"made by the second server"
        assert b.proc.poll() is None and "Traceback" not in b.log.read_text()
    finally:
        if listing is not None:
            listing.close()
        for f in (fd, dup):
            if f >= 0:
                os.close(f)
        stopped = None
        if b is not None:
            try:
                stopped = b.stop()
            except subprocess.TimeoutExpired:
                pass
            b.teardown()
        a.teardown()
        for s in (from_a, to_host, host_b, to_b):
            s.close()
    assert stopped == 0 and not fusedev.is_mounted(str(mountdir))


def _fill_dir(d: Path, n: int) -> set[str]:
    """n empty files with 100-byte names in a new directory, durable on the disk."""
    d.mkdir()
    names = {f"{'n' * 100}-{i:04d}" for i in range(n)}
    for name in names:
        (d / name).write_bytes(b"")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return names
