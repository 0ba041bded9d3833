"""The FUSE wire protocol: message layouts, the INIT negotiation and the mount itself.

Promises to the FUSE server (kernel/core/fuse.py) and to whoever hands a connection over:

* the layouts of the requests and replies the server uses, as ``struct.Struct`` objects
  following the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.``MIN_MINOR`` up to
  7.``MAX_MINOR``, little-endian, as the host kernel speaks it), and the opcodes;
* ``negotiate(init_in)``: the INIT reply and the connection's ``ConnParams`` — what both
  ends agreed (protocol minor, flags, max_write, the request buffer size). No writeback
  cache is ever asked for: dirty data must stay in the emulated kernel;
* ``ConnParams.as_dict()`` / ``ConnParams.from_dict()``: the parameters of an initialised
  connection as plain data, so that another process can serve the same connection without
  an INIT exchange; ``from_dict`` rejects anything malformed with one line naming the field;
* ``mount(mountpoint, fsname)``: a fresh /dev/fuse descriptor mounted on ``mountpoint``
  with ``allow_other``, ``default_permissions``, ``nosuid``, ``nodev``, type
  ``fuse.crashbench``, source ``fsname`` — by the mount(2) syscall when root, else through
  ``fusermount3`` (which passes the descriptor back over a Unix socket).
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
import struct
import subprocess
from dataclasses import asdict, dataclass

MAX_MINOR = 38  # the newest protocol this server speaks (Linux 6.1's fuse.h)
MIN_MINOR = 28  # FUSE_MAX_PAGES: 1 MiB requests
MAX_WRITE = 1 << 20  # bytes per WRITE (and READ) request: max_pages 256, the kernel's limit
MAX_PAGES = MAX_WRITE // 4096
MAX_BACKGROUND = 12  # asynchronous requests (read-ahead, ...) in flight: libfuse's default
CONGESTION_THRESHOLD = 9
# A read of /dev/fuse must have room for the largest request: header + write_in + max_write
# (a buffer of exactly 1 MiB is refused with EINVAL).
BUF_SLACK = 4096
SUBTYPE = "crashbench"

# --- opcodes ---
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS = range(8, 18)
RELEASE, FSYNC = 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT = range(21, 27)
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY = 34, 35, 36, 38
BATCH_FORGET, READDIRPLUS, RENAME2 = 42, 44, 45

# --- INIT flags ---
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
MAX_PAGES_FLAG = 1 << 22
# What libfuse 3.14 asks for by default with the operations this server implements
# (atomic O_TRUNC and set-ID clearing are done by the server), never the writeback cache.
WANTED = (
    ASYNC_READ
    | ATOMIC_O_TRUNC
    | BIG_WRITES
    | AUTO_INVAL_DATA
    | DO_READDIRPLUS
    | READDIRPLUS_AUTO
    | ASYNC_DIO
    | PARALLEL_DIROPS
    | HANDLE_KILLPRIV
    | MAX_PAGES_FLAG
)

# --- setattr valid bits, open reply flags, fsync flags ---
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 128, 256
FSYNC_FDATASYNC = 1

# --- layouts (fuse.h; every struct padded to 8 bytes) ---
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_ATTR = "QQQQQQIIIIIIIIII"  # fuse_attr, 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)  # 128
ATTR_OUT = struct.Struct("<QII" + _ATTR)  # 104
INIT_IN = struct.Struct("<IIIII")  # major minor max_readahead flags flags2
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
WRITE_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")  # 80
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name
FORGET_ONE = struct.Struct("<QQ")
NOTIFY_RESEND = 7  # Linux >= 6.9: requests read but not answered are queued again


def notify_resend(fd: int) -> None:
    """Ask the host kernel to queue again every request of the connection that a server
    read and never answered (a server that died with them): a notification, unique 0."""
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))


U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
U32X2 = struct.Struct("<II")
U64U32 = struct.Struct("<QI")  # fsync_in / release_in: fh, flags
READ_IN = struct.Struct("<QQI")  # fh offset size
WRITE_IN = struct.Struct("<QQI")  # fh offset size (data after the 40-byte write_in)
WRITE_IN_SIZE = 40
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding


@dataclass(frozen=True)
class ConnParams:
    """What the two ends of a connection agreed at INIT; enough to serve it elsewhere."""

    minor: int
    flags: int
    max_write: int
    max_readahead: int
    mountpoint: str

    @property
    def bufsize(self) -> int:
        return self.max_write + BUF_SLACK

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ConnParams":
        if not isinstance(d, dict):
            raise ValueError(
                f"FUSE connection parameters: expected a mapping, got {type(d).__name__}"
            )
        want = {
            "minor": int,
            "flags": int,
            "max_write": int,
            "max_readahead": int,
            "mountpoint": str,
        }
        for k in d:
            if k not in want:
                raise ValueError(f"FUSE connection parameters: unknown field {k!r}")
        for k, t in want.items():
            v = d.get(k)
            if type(v) is not t:
                raise ValueError(f"FUSE connection parameters: {k} must be {t.__name__}, got {v!r}")
        if not MIN_MINOR <= d["minor"] <= MAX_MINOR:
            raise ValueError(
                f"FUSE connection parameters: minor {d['minor']} outside {MIN_MINOR}..{MAX_MINOR}"
            )
        if not 4096 <= d["max_write"] <= MAX_WRITE:
            raise ValueError(
                f"FUSE connection parameters: max_write {d['max_write']} outside 4096..{MAX_WRITE}"
            )
        if d["flags"] & WRITEBACK_CACHE or not 0 <= d["flags"] < 1 << 32:
            raise ValueError(f"FUSE connection parameters: flags {d['flags']:#x} not servable")
        if d["max_readahead"] < 0 or not os.path.isabs(d["mountpoint"]):
            raise ValueError(
                "FUSE connection parameters: max_readahead must be >= 0 and mountpoint absolute"
            )
        return cls(**d)


def negotiate(body, mountpoint: str) -> tuple[bytes, ConnParams]:
    """The INIT reply body for the kernel's fuse_init_in, and the agreed parameters."""
    major, minor, max_readahead, flags = INIT_IN.unpack_from(body)[:4]
    if major != 7:
        raise OSError(f"FUSE INIT: kernel speaks protocol {major}.{minor}, this server 7.x")
    if minor < MIN_MINOR:
        raise OSError(f"FUSE INIT: kernel protocol 7.{minor} is older than 7.{MIN_MINOR}")
    p = ConnParams(
        minor=min(minor, MAX_MINOR),
        flags=flags & WANTED,
        max_write=MAX_WRITE,
        max_readahead=max_readahead,
        mountpoint=mountpoint,
    )
    out = INIT_OUT.pack(
        7,
        p.minor,
        p.max_readahead,
        p.flags,
        MAX_BACKGROUND,
        CONGESTION_THRESHOLD,
        p.max_write,
        1,
        MAX_PAGES,
        0,
        0,
    )
    return out, p


# --- mounting ------------------------------------------------------------------------------
MS_NOSUID, MS_NODEV = 2, 4
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def mount(mountpoint: str, fsname: str) -> int:
    """A new connection's /dev/fuse descriptor (close-on-exec), mounted on ``mountpoint``."""
    opts = "allow_other,default_permissions"
    if os.geteuid() != 0:
        return _fusermount(mountpoint, fsname, opts)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        rootmode = stat.S_IFMT(os.stat(mountpoint).st_mode)
        data = f"fd={fd},rootmode={rootmode:o},user_id=0,group_id=0,{opts}"
        if (
            _c().mount(
                os.fsencode(fsname),
                os.fsencode(mountpoint),
                f"fuse.{SUBTYPE}".encode(),
                MS_NOSUID | MS_NODEV,
                data.encode(),
            )
            != 0
        ):
            e = ctypes.get_errno()
            raise OSError(e, f"mount FUSE on {mountpoint}: {os.strerror(e)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fusermount(mountpoint: str, fsname: str, opts: str) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        r = subprocess.run(
            ["fusermount3", "-o", f"{opts},fsname={fsname},subtype={SUBTYPE}", "--", mountpoint],
            pass_fds=(theirs.fileno(),),
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
        )
        if r.returncode != 0:
            raise OSError(f"fusermount3 on {mountpoint}: {r.stderr.strip()}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise OSError(f"fusermount3 on {mountpoint}: no descriptor passed back")
    os.set_inheritable(fds[0], False)
    return fds[0]
