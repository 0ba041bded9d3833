"""The FUSE connection as the machine sees it: its mounts, its abort, its tuning.

Promises to the host (kernel/hw/host.py), the kernel's FUSE server (kernel/core/fuse.py),
the lab and the tests: ``mounts_at``, ``is_mounted`` and ``abort_and_unmount`` read
/proc/self/mountinfo (the caller's mount namespace) and never touch the mount itself, so
they do not hang on a dead or hung connection; ``abort_and_unmount`` aborts a connection
through fusectl (waking every process blocked on it with ENOTCONN) and detaches the mount.
A connection belongs to the machine, not to the kernel that serves it: this is the part of
FUSE that outlives a kernel, so it lives with the hardware. ``fuse_fd_of(pid)`` finds the
/dev/fuse descriptor a process serves, and ``duplicate(pid, fd)`` takes a copy of another
process's descriptor (pidfd_getfd, no help from that process): while one copy is open the
connection is not aborted when its server dies, and the requests of the programs using the
mount wait in the host's queue for whoever serves it next.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import subprocess

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024  # host read-ahead window for the mount (default 128 KiB)
FUSECTL = "/sys/fs/fuse/connections"
MNT_DETACH = 2


# --- the mount seen from outside: /proc/self/mountinfo, fusectl ---------------------------------
def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_at(mountpoint: str) -> list[dict]:
    """The mounts stacked on ``mountpoint`` (bottom first), from /proc/self/mountinfo:
    dicts with id, major, minor, fstype, source. Never touches the mount itself."""
    want = _canonical(mountpoint)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            p = pre.split()
            q = post.split()
            if len(p) < 5 or len(q) < 2 or _unescape(p[4]) != want:
                continue
            major, minor = (int(x) for x in p[2].split(":"))
            found.append(
                {
                    "id": int(p[0]),
                    "major": major,
                    "minor": minor,
                    "fstype": q[0],
                    "source": _unescape(q[1]),
                }
            )
    return found


def _canonical(path: str) -> str:
    """Absolute path with symlinks resolved in the parent only: the last component may be
    a (dead) mount that must not be touched."""
    path = os.path.abspath(path)
    parent, base = os.path.split(path)
    return os.path.join(os.path.realpath(parent), base) if base else path


def is_mounted(mountpoint: str) -> bool:
    """Whether a FUSE file system is mounted on ``mountpoint`` (alive or dead)."""
    return any(m["fstype"].startswith("fuse") for m in mounts_at(mountpoint))


def connection_id(m: dict) -> int:
    """The /sys/fs/fuse/connections/<N> name of a mount: its device number."""
    return (m["major"] << 20) | m["minor"]


def _ensure_fusectl() -> str:
    """ "present", "mounted" (by this call: the caller unmounts it when done), or ""."""
    if os.path.isdir(FUSECTL) and os.listdir(FUSECTL):
        return "present"
    with open("/proc/self/mountinfo") as f:
        if any(" - fusectl " in line for line in f):
            return "present"
    try:
        subprocess.run(
            ["mount", "-t", "fusectl", "fusectl", FUSECTL],
            check=True,
            capture_output=True,
            timeout=10,
        )
        return "mounted"
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot mount fusectl on %s: %s", FUSECTL, e)
        return ""


def _conn_file(m: dict, name: str) -> str:
    return os.path.join(FUSECTL, str(connection_id(m)), name)


def _tune(mountpoint: str) -> None:
    """Raise the host's read-ahead for the mount (the host offers 128 KiB in INIT and a reply
    can only lower it; larger windows mean fewer, larger READ requests). Best effort, root."""
    for m in mounts_at(mountpoint):
        if m["fstype"].startswith("fuse"):
            bdi = f"/sys/class/bdi/{m['major']}:{m['minor']}/read_ahead_kb"
            try:
                with open(bdi, "w") as f:
                    f.write(str(READ_AHEAD_KB))
            except OSError as e:
                log.info("cannot set %s: %s", bdi, e)


_libc = None
SYS_PIDFD_GETFD = 438  # the same number on every architecture Linux has (since 5.6)
FUSE_DEV = os.makedev(10, 229)


def _libc_handle():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def duplicate(pid: int, fd: int) -> int:
    """A descriptor (close-on-exec) of the same open file as ``fd`` of process ``pid``;
    OSError when the process is gone or may not be inspected (ptrace rules)."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc_handle().syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"pidfd_getfd({pid}, {fd}): {os.strerror(e)}")
    finally:
        os.close(pidfd)
    return new


def is_fuse_device(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == FUSE_DEV


def fuse_fd_of(pid: int) -> int | None:
    """The lowest descriptor number of process ``pid`` open on /dev/fuse, or None."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return min(found) if found else None


def _umount_detach(path: str) -> bool:
    if os.geteuid() == 0:
        if _libc_handle().umount2(os.fsencode(path), MNT_DETACH) == 0:
            return True
        log.warning("umount2(%s, MNT_DETACH): %s", path, os.strerror(ctypes.get_errno()))
    for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("%s: %s", " ".join(cmd), e)
            continue
        if r.returncode == 0:
            return True
        log.warning("%s: %s", " ".join(cmd), r.stderr.strip())
    return False


def abort_and_unmount(mountpoint: str) -> bool:
    """Clean up the FUSE mount(s) on ``mountpoint`` whatever state the daemon is in:
    abort the connection through fusectl (waking every process blocked on it with
    ENOTCONN), then detach the mount lazily. Returns whether a FUSE mount was found.
    Never stats the mount point, so it cannot hang on a dead or hung daemon; mounts
    of other types are left alone. A fusectl mounted here for the abort is unmounted
    again, so nothing of the cleanup stays behind."""
    path = _canonical(mountpoint)
    found = False
    ctl = ""
    try:
        for _ in range(16):  # stacked mounts: top one first, until none
            fuse_mounts = [m for m in mounts_at(path) if m["fstype"].startswith("fuse")]
            if not fuse_mounts:
                break
            found = True
            m = fuse_mounts[-1]
            ctl = ctl or _ensure_fusectl()
            if ctl:
                try:
                    with open(_conn_file(m, "abort"), "w") as f:
                        f.write("1")
                except OSError as e:
                    # gone already (the connection ended with its daemon) or not ours to see
                    log.info("abort of FUSE connection %d: %s", connection_id(m), e)
            if not _umount_detach(path):
                raise OSError(errno.EBUSY, f"cannot unmount {path}")
        else:
            raise OSError(errno.EBUSY, f"{path}: FUSE mounts remain after 16 unmounts")
    finally:
        if ctl == "mounted":
            _umount_detach(FUSECTL)
    return found
