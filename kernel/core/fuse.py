"""The FUSE server: the emulated kernel's VFS served to real, unmodified programs.

With kernel/core/fuseproto.py (the wire protocol and the mount), the only code of crashbench
that knows FUSE. It speaks the raw protocol on /dev/fuse itself, so that a connection one
process initialised can be served by another (libfuse answers every request before its
own INIT with EIO): a backup kernel can take over the very connection, and the open files
on it, of a kernel that died. Inode numbers are the VFS's own, root 1.

Promises to the kernel daemon (kernel/core/kernel.py), the host side (kernel/hw/host.py) and tests:

* ``serve(vfs, mountpoint, fsname=, ready=)`` mounts with ``allow_other``,
  ``default_permissions``, ``fsname=<fsname>``, type ``fuse.crashbench``, answers INIT,
  then requests until the file system is unmounted or ``stop()`` is called, then closes
  its descriptor, unmounts and returns. ``ready()`` is called once, after INIT, when the
  mount serves; ``connection()`` then gives the descriptor and the ``ConnParams`` to hand
  over.
* ``resume(fd, params, vfs, ready=)`` serves a connection another process initialised:
  ``fd`` is a descriptor of its /dev/fuse (a dup passed over a Unix socket or taken with
  pidfd_getfd), ``params`` its ``ConnParams`` (or their ``as_dict()``); no INIT exchange.
  With ``resend`` the requests the previous server read but never answered are queued
  again first (FUSE_NOTIFY_RESEND), so a request in flight at its death is answered once,
  by this server: with ``answers`` (the dead server's in-flight table, kernel/core/inflight.py
  ``read_inflight``) a re-sent request the dead server had applied is answered with the
  reply it recorded, never executed twice; one that cannot be told safely is answered EIO.
  Requests are answered from the first one queued; a
  directory handle this server never saw lists its directory afresh, and its own
  directory handles carry its pid, so handles the previous server gave out stay valid and
  are never reused. Otherwise as ``serve``.
* File handles: the inode number in the low 32 bits, an open-file id in the high 32 bits,
  a new id for every OPEN and CREATE (from the in-flight table when there is one, which a
  backup continues), so each open file of the host has its own handle.
* ``inflight`` (of ``serve`` and ``resume``): the kernel's in-flight request table
  (kernel/core/inflight.py ``InflightTable``): each request of ``RECORDED`` is recorded
  started before it is handled and applied, with its reply, before it is answered; a
  name-space change runs as one file-system operation (``vfs.operation()``) with its
  record inside. The fault site ``fuse.reply`` lies between the record and the reply.
* ``files`` (of ``serve`` and ``resume``): told of every successful OPEN and CREATE
  (``opened(pid, fh, flags)``, the caller's thread id as the host reports it) and every
  RELEASE (``released(pid, fh)``, pid 0 when the host sends it from a kernel thread): the
  kernel's open-file table (kernel/core/proc.py), whose records are keyed by the handle.
* ``around`` (of ``serve``, ``resume`` and ``Server``): given the table of request
  handlers {opcode: handler}, returns the table requests are dispatched to — a kernel
  whose requests are transactions (systems/txipc_sim) wraps each handler; None: the
  handlers themselves, at no cost.
* ``stop()`` (alias ``request_stop``) may be called from a signal handler or any thread.
* Every request is one synchronous VFS call made by the one serving thread (the VFS takes
  its big lock itself).
* Caching stays in the emulated kernel: no writeback cache (every write(2) reaches the VFS
  before it returns; only pages dirtied through a shared writable mmap wait in the host
  until it writes them back), no keep_cache (the host's page cache of a file is dropped at
  each open, so the first read of a page after an open reaches the VFS; re-reads through
  the same open file may be answered by the host), entry/attribute timeouts of
  ``TIMEOUT_S``; negative lookups are cached as long (every name is created through this
  mount, which invalidates them).
* Lookup counts: every reply that hands an inode to the host kernel (lookup, create,
  mknod, mkdir, symlink, link, each readdirplus entry) calls ``vfs.ref(ino)``; FORGET and
  BATCH_FORGET call ``vfs.forget(ino, n)``.
* Errors: an OSError from the VFS is answered with its errno (ENOSYS becomes EOPNOTSUPP,
  because ENOSYS would make the host kernel stop sending that request for good); any
  other exception is logged with its traceback and answered EIO, and the server keeps
  serving. The one exception that is let through is ``kernel.core.faults.KernelPanic`` (if that
  module defines it; see ``_panic_types``): it ends ``serve()`` without unmounting, so the
  mount is left dead (ENOTCONN, unless another process holds the connection) as a crashed
  kernel leaves it.
* Extended attributes, FLUSH and ACCESS answer ENOSYS (the host kernel then stops asking;
  with default_permissions it checks access itself); INTERRUPT is ignored, as the protocol
  allows. mknod makes regular files, FIFOs and sockets; device nodes are refused with EPERM.
* The mount seen from outside (``is_mounted``, ``abort_and_unmount``) is the machine's:
  kernel/hw/fusedev.py.

Speed: 1 MiB WRITE and READ requests (max_pages 256, the kernel's limit); the host caps
read-ahead at 128 KiB in INIT, so after INIT the mount's read-ahead is raised through
/sys/class/bdi. Requests are read into one reused buffer and answered with one writev.

Semantics the server supplies because the host kernel leaves them to the file system:
O_TRUNC at open (atomic_o_trunc), clearing set-user/group-ID bits on write, truncate and
chown (handle_killpriv), and the group of a new entry in a set-group-ID directory (and the
bit itself on new subdirectories).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import select
import stat
import sys
import threading
import time
from collections import namedtuple
from typing import Callable

from kernel.core import fuseproto as P
from kernel.core.fuseproto import ConnParams
from kernel.core.inflight import IN_OPERATION, RECORDED, RESEND_BIT
from kernel.hw.fusedev import _tune, _umount_detach

log = logging.getLogger(__name__)

TIMEOUT_S = 1.0  # entry and attribute cache lifetime in the host kernel
BLKSIZE = 4096  # st_blksize reported to programs: the emulated FS block size
MALLOC_MMAP_THRESHOLD = 4 << 20  # large replies (up to 1 MiB) come from the heap, not mmap
MALLOC_TRIM_THRESHOLD = 64 << 20
FUSE_DEV = os.makedev(10, 229)  # /dev/fuse
FH_INO = 0xFFFF_FFFF  # a file handle's inode number; the high half is the open-file id
SLOT = 0  # the serving thread's slot of the in-flight table: one thread serves
# replies that hand an inode to the host (an entry_out first): a lookup reference each
HANDS_INODE = frozenset({P.MKNOD, P.MKDIR, P.SYMLINK, P.LINK, P.CREATE})

Ctx = namedtuple("Ctx", "uid gid pid")


class FuseError(Exception):
    """A protocol-level answer (not a VFS error): sent with this errno as it is."""

    def __init__(self, err: int):
        super().__init__(err)
        self.errno = err


def _panic_types() -> tuple[type, ...]:
    """The exception types that must crash the kernel instead of becoming EIO.

    This is the single place that knows about it: ``kernel.core.faults.KernelPanic`` if that
    module defines it (looked up when an error happens, so no import cycle at load time).
    """
    faults = sys.modules.get("kernel.core.faults")
    if faults is None:
        try:
            from kernel.core import faults
        except Exception:  # no fault layer (or a broken one): nothing is special
            return ()
    t = getattr(faults, "KernelPanic", None)
    return (t,) if isinstance(t, type) and issubclass(t, BaseException) else ()


def _errno_of(e: OSError) -> int:
    n = e.errno
    if not isinstance(n, int) or n <= 0:
        return errno.EIO
    return errno.EOPNOTSUPP if n == errno.ENOSYS else n


def _name(body) -> bytes:
    """A NUL-terminated name at the start of body."""
    b = bytes(body)
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def _two_names(body) -> tuple[bytes, bytes]:
    a, _, rest = bytes(body).partition(b"\0")
    return a, rest.split(b"\0", 1)[0]


def _split_s(t: float) -> tuple[int, int]:
    return int(t), int(round((t - int(t)) * 1e9))


class Server:
    """FUSE requests over a VFS. File handles are inode numbers; directory handles index
    a snapshot of the directory taken at the start of each listing."""

    def __init__(
        self,
        vfs,
        fd: int,
        params: ConnParams,
        *,
        timeout: float = TIMEOUT_S,
        files=None,
        inflight=None,
        answers=None,
        around: Callable[[dict], dict] | None = None,
    ):
        self.vfs, self.fd, self.params = vfs, fd, params
        self.files = files or NoFileTable()
        self.inflight, self.answers = inflight, answers
        self._open_id = inflight.next_open_id if inflight else itertools.count(1).__next__
        self.valid_s, self.valid_ns = _split_s(timeout)
        self._dirs: dict[int, list] = {}  # dir handle -> [ino, snapshot or None]
        # the pid in the high half: handles a previous server gave out never collide
        self._dir_fh = itertools.count((os.getpid() << 32) + 1)
        self._killpriv: set[int] = set()  # regular files with set-ID bits to clear on write
        self.unmounted = False  # the host ended the connection (ENODEV)
        self.destroyed = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self.handlers = {
            P.LOOKUP: self.lookup,
            P.FORGET: self.forget,
            P.GETATTR: self.getattr,
            P.SETATTR: self.setattr,
            P.READLINK: self.readlink,
            P.SYMLINK: self.symlink,
            P.MKNOD: self.mknod,
            P.MKDIR: self.mkdir,
            P.UNLINK: self.unlink,
            P.RMDIR: self.rmdir,
            P.RENAME: self.rename,
            P.RENAME2: self.rename2,
            P.LINK: self.link,
            P.OPEN: self.open,
            P.READ: self.read,
            P.WRITE: self.write,
            P.STATFS: self.statfs,
            P.RELEASE: self.release,
            P.FSYNC: self.fsync,
            P.OPENDIR: self.opendir,
            P.READDIR: self.readdir,
            P.READDIRPLUS: self.readdirplus,
            P.RELEASEDIR: self.releasedir,
            P.FSYNCDIR: self.fsyncdir,
            P.CREATE: self.create,
            P.BATCH_FORGET: self.batch_forget,
            P.INTERRUPT: self.interrupt,
            P.DESTROY: self.destroy,
        }
        if around is not None:
            self.handlers = around(self.handlers)

    # --- the loop ----------------------------------------------------------------------------
    def wake(self) -> None:
        """Make ``run`` return after the request in hand. Safe from a signal handler."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # full (already woken) or closed (already returned)
            pass

    def run(self) -> None:
        """Answer requests until woken, unmounted or destroyed; a KernelPanic propagates."""
        fd, buf = self.fd, bytearray(self.params.bufsize)
        mv = memoryview(buf)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        unpack, handlers, reply = P.IN_HEADER.unpack_from, self.handlers, self._reply
        while not self._stopping:
            if self.answers is not None and not self.answers.settled.is_set():
                if not poller.poll(0):  # what was re-sent came first, and is answered
                    self.answers.settled.set()
            poller.poll()  # EINTR is retried after the signal handler (a stop) ran
            if self._stopping:
                break
            try:
                n = os.readv(fd, [buf])
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EAGAIN, errno.EINTR):
                    continue  # interrupted before it was read, or taken by another reader
                if e.errno == errno.ENODEV:
                    self.unmounted = True
                    break
                raise
            _, op, unique, nodeid, uid, gid, pid, _, _ = unpack(buf)
            if self.answers is not None:
                if unique & RESEND_BIT:
                    if self._answer_resent(op, unique, nodeid):
                        continue
                else:
                    self.answers.settled.set()
            h = handlers.get(op)
            if op in RECORDED and self.inflight is not None:
                self._recorded(h, op, unique, nodeid, mv[40:n], uid, gid, pid)
                continue
            try:
                if h is None:
                    raise FuseError(errno.ENOSYS)
                out = h(nodeid, mv[40:n], uid, gid, pid)
            except FuseError as e:
                reply(P.OUT_HEADER.pack(16, -e.errno, unique))
                continue
            except OSError as e:
                if isinstance(e, _panic_types()):
                    raise
                reply(P.OUT_HEADER.pack(16, -_errno_of(e), unique))
                continue
            except Exception as e:
                if isinstance(e, _panic_types()):
                    raise
                log.exception("FUSE opcode %d on inode %d failed; answered EIO", op, nodeid)
                reply(P.OUT_HEADER.pack(16, -errno.EIO, unique))
                continue
            if out is not None:
                reply(P.OUT_HEADER.pack(16 + len(out), 0, unique), out)

    # --- the in-flight table -----------------------------------------------------------------
    def _recorded(self, h, op, unique, nodeid, body, uid, gid, pid) -> None:
        """Handle a request whose re-execution is not harmless, recorded in the table."""
        t = self.inflight
        t.started(SLOT, unique, nodeid, op)
        if op in IN_OPERATION:  # its record and its change: undone together, or kept
            with self.vfs.operation() as gen:
                err, out = self._call(h, op, nodeid, body, uid, gid, pid)
                t.applied(SLOT, unique, nodeid, op, err, out, gen)
        else:
            err, out = self._call(h, op, nodeid, body, uid, gid, pid)
            t.applied(SLOT, unique, nodeid, op, err, out)
        self.vfs.faults.at("fuse.reply")
        self._answer(unique, err, out)

    def _call(self, h, op, nodeid, body, uid, gid, pid) -> tuple[int, bytes]:
        """(errno, reply body) of one request; a KernelPanic propagates."""
        try:
            if h is None:
                raise FuseError(errno.ENOSYS)
            return 0, h(nodeid, body, uid, gid, pid)
        except FuseError as e:
            return e.errno, b""
        except OSError as e:
            if isinstance(e, _panic_types()):
                raise
            return _errno_of(e), b""
        except Exception as e:
            if isinstance(e, _panic_types()):
                raise
            log.exception("FUSE opcode %d on inode %d failed; answered EIO", op, nodeid)
            return errno.EIO, b""

    def _answer(self, unique: int, err: int, out: bytes) -> None:
        if err:
            self._reply(P.OUT_HEADER.pack(16, -err, unique))
        else:
            self._reply(P.OUT_HEADER.pack(16 + len(out), 0, unique), out)

    def _answer_resent(self, op: int, unique: int, nodeid: int) -> bool:
        """Answer a request the previous server read and never answered, from its table
        when it had applied it; False: handle it as a new request."""
        action, e = self.answers.for_resent(op, unique, nodeid)
        if action == "execute":
            return False
        if action == "eio":
            self.answers.refused += 1
            log.warning("re-sent opcode %d on inode %d: its record was rejected; EIO", op, nodeid)
            self._answer(unique, errno.EIO, b"")
            return True
        self.answers.answered += 1
        err, out = e["error"], e["reply"]
        if not err and op in HANDS_INODE:
            self.vfs.ref(P.U64.unpack_from(out)[0])
        if self.inflight is not None:  # a crash before the reply: the next one knows too
            self.inflight.applied(SLOT, unique, nodeid, op, err, out)
        self._answer(unique, err, out)
        return True

    def _reply(self, *bufs) -> None:
        try:
            os.writev(self.fd, bufs)
        except OSError as e:
            # ENOENT: the request was interrupted or aborted meanwhile; nothing waits for it
            if e.errno != errno.ENOENT:
                log.error("FUSE reply (%d bytes) not delivered: %s", sum(map(len, bufs)), e)

    def close(self) -> None:
        for f in (self._wake_r, self._wake_w):
            try:
                os.close(f)
            except OSError:
                pass

    # --- conversions -----------------------------------------------------------------------
    def _attr_fields(self, a) -> tuple:
        m = a.mode
        if (m & stat.S_ISUID or m & stat.S_ISGID and m & stat.S_IXGRP) and stat.S_ISREG(m):
            self._killpriv.add(a.ino)
        elif self._killpriv:
            self._killpriv.discard(a.ino)
        at, an = divmod(a.atime_ns, 1_000_000_000)
        mt, mn = divmod(a.mtime_ns, 1_000_000_000)
        ct, cn = divmod(a.ctime_ns, 1_000_000_000)
        return (
            a.ino,
            a.size,
            a.blocks,
            at,
            mt,
            ct,
            an,
            mn,
            cn,
            m,
            a.nlink,
            a.uid,
            a.gid,
            0,
            BLKSIZE,
            0,
        )

    def _entry(self, a) -> bytes:
        s, ns = self.valid_s, self.valid_ns
        return P.ENTRY_OUT.pack(a.ino, a.generation, s, s, ns, ns, *self._attr_fields(a))

    def _attr_out(self, a) -> bytes:
        return P.ATTR_OUT.pack(self.valid_s, self.valid_ns, 0, *self._attr_fields(a))

    def _handed(self, a) -> bytes:
        """The host kernel now holds one more lookup of a.ino."""
        self.vfs.ref(a.ino)
        return self._entry(a)

    def _new_owner(self, parent: int, uid: int, gid: int, mode: int, is_dir: bool):
        """uid, gid and mode of a new entry (Linux inode_init_owner: set-group-ID dirs)."""
        p = self.vfs.getattr(parent)
        if p.mode & stat.S_ISGID:
            gid = p.gid
            if is_dir:
                mode |= stat.S_ISGID
        return uid, gid, mode

    def _kill_priv(self, ino: int) -> None:
        a = self.vfs.getattr(ino)
        mode = a.mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            mode &= ~stat.S_ISGID
        if mode != a.mode:
            self.vfs.setattr(ino, mode=mode)
        self._killpriv.discard(ino)

    # --- names -----------------------------------------------------------------------------
    def lookup(self, parent, body, uid, gid, pid):
        name = _name(body)
        try:
            a = self.vfs.lookup(parent, name)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
            # node id 0: a negative entry the host caches for the entry timeout
            return P.ENTRY_OUT.pack(0, 0, self.valid_s, 0, self.valid_ns, 0, *(0,) * 16)
        if name in (b".", b".."):
            return self._entry(a)
        return self._handed(a)

    def forget(self, ino, body, uid, gid, pid):
        self.vfs.forget(ino, P.U64.unpack_from(body)[0])

    def batch_forget(self, _ino, body, uid, gid, pid):
        count = P.U32.unpack_from(body)[0]
        for i in range(count):
            ino, n = P.FORGET_ONE.unpack_from(body, 8 + 16 * i)
            self.vfs.forget(ino, n)

    def interrupt(self, _ino, body, uid, gid, pid):
        return None  # requests are answered in order; the interrupted one soon enough

    def destroy(self, _ino, body, uid, gid, pid):
        self.destroyed = self._stopping = True
        return b""

    def getattr(self, ino, body, uid, gid, pid):
        return self._attr_out(self.vfs.getattr(ino))

    def setattr(self, ino, body, uid, gid, pid):
        (
            valid,
            _,
            _fh,
            size,
            _lo,
            atime,
            mtime,
            _ct,
            atimensec,
            mtimensec,
            _ctn,
            mode,
            _u4,
            new_uid,
            new_gid,
            _u5,
        ) = P.SETATTR_IN.unpack_from(body)
        kw = {}
        if valid & P.FATTR_SIZE:
            kw["size"] = size
        if valid & P.FATTR_MODE:
            kw["mode"] = mode
        if valid & P.FATTR_UID:
            kw["uid"] = new_uid
        if valid & P.FATTR_GID:
            kw["gid"] = new_gid
        if valid & (P.FATTR_ATIME_NOW | P.FATTR_MTIME_NOW):
            now = time.time_ns()
        if valid & P.FATTR_ATIME:
            kw["atime_ns"] = now if valid & P.FATTR_ATIME_NOW else atime * 10**9 + atimensec
        if valid & P.FATTR_MTIME:
            kw["mtime_ns"] = now if valid & P.FATTR_MTIME_NOW else mtime * 10**9 + mtimensec
        if not kw:
            return self._attr_out(self.vfs.getattr(ino))
        if (
            ino in self._killpriv
            and "mode" not in kw
            and ("size" in kw or "uid" in kw or "gid" in kw)
        ):
            self._kill_priv(ino)
        return self._attr_out(self.vfs.setattr(ino, **kw))

    def readlink(self, ino, body, uid, gid, pid):
        return self.vfs.readlink(ino)

    def mknod(self, parent, body, uid, gid, pid):
        mode = P.MKNOD_IN.unpack_from(body)[0]
        name = _name(body[P.MKNOD_IN.size :])
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            log.info(
                "mknod %r type %#o refused: no device nodes on this file system",
                name,
                stat.S_IFMT(mode),
            )
            raise FuseError(errno.EPERM)
        uid, gid, mode = self._new_owner(parent, uid, gid, mode, False)
        return self._handed(self.vfs.create(parent, name, mode, uid, gid))

    def mkdir(self, parent, body, uid, gid, pid):
        mode = P.U32.unpack_from(body)[0]
        uid, gid, mode = self._new_owner(parent, uid, gid, mode, True)
        return self._handed(self.vfs.mkdir(parent, _name(body[8:]), mode, uid, gid))

    def symlink(self, parent, body, uid, gid, pid):
        name, target = _two_names(body)
        uid, gid, _ = self._new_owner(parent, uid, gid, 0, False)
        return self._handed(self.vfs.symlink(parent, name, target, uid, gid))

    def link(self, new_parent, body, uid, gid, pid):
        ino = P.U64.unpack_from(body)[0]
        return self._handed(self.vfs.link(ino, new_parent, _name(body[8:])))

    def unlink(self, parent, body, uid, gid, pid):
        self.vfs.unlink(parent, _name(body))
        return b""

    def rmdir(self, parent, body, uid, gid, pid):
        self.vfs.rmdir(parent, _name(body))
        return b""

    def rename(self, parent, body, uid, gid, pid):
        old, new = _two_names(body[8:])
        self.vfs.rename(parent, old, P.U64.unpack_from(body)[0], new, 0)
        return b""

    def rename2(self, parent, body, uid, gid, pid):
        newdir, flags = P.RENAME2_IN.unpack_from(body)[:2]
        old, new = _two_names(body[P.RENAME2_IN.size :])
        self.vfs.rename(parent, old, newdir, new, flags)
        return b""

    # --- files -----------------------------------------------------------------------------
    def _open(self, ino: int, flags: int) -> bytes:
        self.vfs.open(ino, flags)
        if flags & os.O_TRUNC:  # atomic_o_trunc: the host left it to us
            try:
                if ino in self._killpriv:
                    self._kill_priv(ino)
                self.vfs.setattr(ino, size=0)
            except BaseException:
                self.vfs.release(ino)
                raise
        return P.OPEN_OUT.pack(self._open_id() << 32 | ino, 0, 0)  # no keep_cache, no direct_io

    def open(self, ino, body, uid, gid, pid):
        flags = P.U32.unpack_from(body)[0]
        out = self._open(ino, flags)
        self.files.opened(pid, P.U64.unpack_from(out)[0], flags)
        return out

    def create(self, parent, body, uid, gid, pid):
        flags, mode = P.CREATE_IN.unpack_from(body)[:2]
        name = _name(body[P.CREATE_IN.size :])
        uid, gid, mode = self._new_owner(parent, uid, gid, mode, False)
        try:
            a = self.vfs.create(parent, name, mode, uid, gid)
        except OSError as e:
            # Two creators raced past the host's negative lookup: without O_EXCL the loser
            # opens what the winner made, as open(2) would.
            if e.errno != errno.EEXIST or flags & os.O_EXCL:
                raise
            a = self.vfs.lookup(parent, name)
            if not stat.S_ISREG(a.mode):
                raise
            if not _may_open(a, Ctx(uid, gid, pid), flags):
                raise FuseError(errno.EACCES) from None
            fi = self._open(a.ino, flags)
            a = self.vfs.getattr(a.ino)
        else:
            fi = self._open(a.ino, flags & ~os.O_TRUNC)
        self.files.opened(pid, P.U64.unpack_from(fi)[0], flags)
        return self._handed(a) + fi

    def read(self, _ino, body, uid, gid, pid):
        fh, off, size = P.READ_IN.unpack_from(body)
        return self.vfs.read(fh & FH_INO, off, size)

    def write(self, _ino, body, uid, gid, pid):
        fh, off, size = P.WRITE_IN.unpack_from(body)
        ino = fh & FH_INO
        if ino in self._killpriv:
            self._kill_priv(ino)
        data = body[P.WRITE_IN_SIZE : P.WRITE_IN_SIZE + size]
        return P.WRITE_OUT.pack(self.vfs.write(ino, off, data), 0)

    def release(self, _ino, body, uid, gid, pid):
        fh = P.U64.unpack_from(body)[0]
        self.vfs.release(fh & FH_INO)
        self.files.released(pid, fh)
        return b""

    def fsync(self, _ino, body, uid, gid, pid):
        fh, flags = P.U64U32.unpack_from(body)
        self.vfs.fsync(fh & FH_INO, bool(flags & P.FSYNC_FDATASYNC))
        return b""

    # --- directories -----------------------------------------------------------------------
    def opendir(self, ino, body, uid, gid, pid):
        fh = next(self._dir_fh)
        self._dirs[fh] = [ino, None]
        return P.OPEN_OUT.pack(fh, 0, 0)

    def readdirplus(self, ino, body, uid, gid, pid):
        return self._listing(ino, body, plus=True)

    def readdir(self, ino, body, uid, gid, pid):
        return self._listing(ino, body, plus=False)

    def _listing(self, ino, body, plus: bool) -> bytes:
        # Offsets index a snapshot taken when a listing starts (offset 0). Later batches
        # look each name up again, so an entry removed meanwhile is skipped, never handed
        # out stale, and no other entry moves: none is skipped or repeated. A handle this
        # server did not open (a takeover) starts a snapshot of the request's directory.
        fh, start, size = P.READ_IN.unpack_from(body)
        d = self._dirs.get(fh)
        if d is None or d[0] != ino:
            d = self._dirs[fh] = [ino, None]
        snap = d[1]
        fresh = start == 0 or snap is None
        if fresh:
            snap = d[1] = self.vfs.readdir(d[0])
        vfs, out, used = self.vfs, [], 0
        fixed = (P.ENTRY_OUT.size if plus else 0) + P.DIRENT.size
        for i in range(start, len(snap)):
            name, a = snap[i]
            if not fresh:
                try:
                    a = vfs.lookup(d[0], name)
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        continue
                    raise
            rec = fixed + (len(name) + 7) // 8 * 8
            if used + rec > size:
                break
            dirent = P.DIRENT.pack(a.ino, i + 1, len(name), stat.S_IFMT(a.mode) >> 12)
            pad = b"\0" * (rec - fixed - len(name))
            if plus:
                out += (self._entry(a), dirent, name, pad)
                vfs.ref(a.ino)
            else:
                out += (dirent, name, pad)
            used += rec
        return b"".join(out)

    def releasedir(self, _ino, body, uid, gid, pid):
        self._dirs.pop(P.U64.unpack_from(body)[0], None)
        return b""

    def fsyncdir(self, ino, body, uid, gid, pid):
        self.vfs.fsyncdir(ino)
        return b""

    def statfs(self, _ino, body, uid, gid, pid):
        s = self.vfs.statfs()
        return P.STATFS_OUT.pack(
            s["blocks"],
            s["bfree"],
            s.get("bavail", s["bfree"]),
            s["files"],
            s["ffree"],
            s["bsize"],
            s["namemax"],
            s.get("frsize", s["bsize"]),
            0,
        )


def _may_open(a, ctx, flags: int) -> bool:
    """Owner/group/other check for the rare create race (primary group only)."""
    if ctx.uid == 0:
        return True
    acc = flags & os.O_ACCMODE
    want = {os.O_RDONLY: 4, os.O_WRONLY: 2}.get(acc, 6)
    shift = 6 if ctx.uid == a.uid else 3 if ctx.gid == a.gid else 0
    return (a.mode >> shift) & want == want


# --- serving ---------------------------------------------------------------------------------
_server: Server | None = None
_stop_requested = False
_lock = threading.Lock()


def stop() -> None:
    """Ask ``serve()``/``resume()`` to return. Safe from a signal handler or any thread,
    and before the loop runs (it then stops as soon as it starts)."""
    global _stop_requested
    _stop_requested = True
    s = _server
    if s is not None:
        s.wake()


request_stop = stop


def connection() -> tuple[int, ConnParams] | None:
    """The descriptor and parameters of the connection being served, to hand over."""
    s = _server
    return None if s is None else (s.fd, s.params)


class NoFileTable:
    """Where the server reports each open and release (by the caller's pid and the file
    handle) when nobody keeps an open-file table: nowhere."""

    def opened(self, pid: int, fh: int, flags: int) -> None:
        pass

    def released(self, pid: int, fh: int) -> None:
        pass


def serve(
    vfs,
    mountpoint: str,
    *,
    fsname: str = "crashbench",
    ready: Callable[[], None] | None = None,
    files=None,
    inflight=None,
    around: Callable[[dict], dict] | None = None,
) -> None:
    """Mount ``vfs`` on ``mountpoint`` and serve it until unmounted or ``stop()``.

    Blocks. One connection per process. Raises the KernelPanic of the fault layer, if one
    is raised by a request, leaving the mount dead for the caller.
    """
    mountpoint = os.path.abspath(mountpoint)
    _tune_allocator()
    fd = P.mount(mountpoint, fsname)
    try:
        params = _init(fd, mountpoint)
    except BaseException:
        os.close(fd)
        _umount_detach(mountpoint)
        raise
    try:
        _tune(mountpoint)
    except Exception:
        log.exception("tuning the FUSE mount failed (serving anyway)")
    _run(Server(vfs, fd, params, files=files, inflight=inflight, around=around), ready)


def resume(
    fd: int,
    params,
    vfs,
    *,
    ready: Callable[[], None] | None = None,
    resend: bool = False,
    files=None,
    inflight=None,
    answers=None,
    around: Callable[[dict], dict] | None = None,
) -> None:
    """Serve the initialised connection on ``fd`` (see the module's promises). Takes
    ownership of ``fd``. ``resend``: first ask the host to queue again the requests the
    previous server read and never answered (FUSE_NOTIFY_RESEND, Linux >= 6.9)."""
    if not isinstance(params, ConnParams):
        params = ConnParams.from_dict(params)
    st = os.fstat(fd)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEV:
        raise ValueError(f"resume: descriptor {fd} is not a /dev/fuse connection")
    _tune_allocator()
    if resend:
        P.notify_resend(fd)
    server = Server(vfs, fd, params, files=files, inflight=inflight, answers=answers, around=around)
    _run(server, ready)


def _init(fd: int, mountpoint: str) -> ConnParams:
    """Answer the kernel's INIT, the connection's first request."""
    while True:
        try:
            req = os.read(fd, P.MAX_WRITE + P.BUF_SLACK)
            break
        except InterruptedError:
            continue
    _, op, unique = P.IN_HEADER.unpack_from(req)[:3]
    if op != P.INIT:
        raise OSError(f"FUSE on {mountpoint}: first request is opcode {op}, not INIT")
    body, params = P.negotiate(memoryview(req)[40:], mountpoint)
    os.writev(fd, [P.OUT_HEADER.pack(16 + len(body), 0, unique), body])
    return params


def _run(server: Server, ready) -> None:
    global _server, _stop_requested
    with _lock:
        if _server is not None:
            raise RuntimeError("a FUSE connection is already served by this process")
        _server = server
    if _stop_requested:
        server.wake()
    unmount = True
    try:
        if ready is not None:
            try:
                ready()
            except Exception:
                log.exception("ready() callback failed")
        server.run()
    except BaseException as e:
        if isinstance(e, _panic_types()):
            unmount = False
        raise
    finally:
        _server = None
        _stop_requested = False
        server.close()
        os.close(server.fd)  # the connection ends here unless another process holds it
        if unmount and not server.unmounted:
            _umount_detach(server.params.mountpoint)


def _tune_allocator() -> None:
    """Keep 1 MiB reply buffers in the heap. glibc serves blocks that large with a fresh
    mmap (page faults and zeroing on every READ reply, then munmap): measured with an
    in-memory VFS, 1 MiB cached reads went from 0.55 to 2.4 GB/s with this."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, MALLOC_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


# --- the mount seen from outside: /proc/self/mountinfo, fusectl ---------------------------------
