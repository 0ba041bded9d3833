"""The name space: lookups and changes of directories, links and symlinks.

Part of FileSystem (kernel/core/fs.py, a mixin). Promises to the VFS, as Linux does:

* ``lookup``/``readdir`` by directory inode and name (bytes; "." and ".." are found, and
  readdir leaves them out); ``create`` (regular file, fifo, socket), ``mkdir``,
  ``symlink`` (targets <= 60 bytes inline in the inode, longer ones in a block, at most
  4095), ``link``, ``unlink``, ``rmdir``, ``rename`` (over an existing file or empty
  directory: the replaced inode is returned with its nlink dropped; RENAME_NOREPLACE;
  RENAME_EXCHANGE and other flags -> EINVAL), ``release_inode`` once an unlinked inode is
  no longer used;
* every change is one handle, atomic in the journal; all checks come before the first
  change, and the only step that can fail late (a directory block for the new name: ENOSPC)
  gives back what it took, so an error leaves nothing half done;
* errors: ENOENT (no such name; a removed directory), EEXIST, ENOTDIR, EISDIR,
  ENOTEMPTY, ENAMETOOLONG (name > NAME_MAX, symlink target > 4095), EINVAL (moving a
  directory into itself, '/' or NUL in a name, unsupported flags), EPERM (hard link to a
  directory), EMLINK (LINK_MAX links), ESTALE (an inode not in use).
"""

from __future__ import annotations

import errno
import stat
import time

from kernel import param
from kernel.core.dir import first_dir_block
from kernel.core.disklayout import (
    FT_DIR,
    INLINE_SYMLINK_MAX,
    LINK_MAX,
    ROOT_INO,
    SYMLINK_MAX,
    FsError,
    Inode,
    corrupt,
    ftype_of,
    inline_addrs,
    inline_target,
)

BSIZE = param.BLOCK_SIZE
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _err(code: int, msg: str) -> OSError:
    return OSError(code, msg)


class NamespaceMixin:
    # provided by FileSystem: handle, _iget, _iput, _alloc_inode, _map, _trim, _free_meta,
    # bufs, ialloc, _dirs and the DirMixin methods
    def _dir_inode(self, ino: int) -> Inode:
        d = self._iget(ino)
        if not d.is_dir:
            raise _err(errno.ENOTDIR, f"inode {ino} is not a directory")
        return d

    @staticmethod
    def _check_name(name: bytes, new: bool = True) -> None:
        if not isinstance(name, bytes):
            raise TypeError("names are bytes")
        if not name:
            raise _err(errno.ENOENT, "empty name")
        if len(name) > param.NAME_MAX:
            raise _err(errno.ENAMETOOLONG, f"name of {len(name)} bytes (NAME_MAX {param.NAME_MAX})")
        if b"/" in name or b"\0" in name:
            raise _err(errno.EINVAL, f"name {name!r} contains '/' or NUL")
        if new and name in (b".", b".."):
            raise _err(errno.EEXIST, f"{name!r} always exists")

    def _target_dir(self, dir_ino: int, name: bytes):
        """The directory a new entry `name` goes into, checked: (inode, cache)."""
        self._check_name(name)
        d = self._dir_inode(dir_ino)
        if d.nlink == 0:
            raise _err(errno.ENOENT, f"directory inode {dir_ino} was removed")
        ds = self._dir_state(d)
        if name in ds.names:
            raise _err(errno.EEXIST, f"{name!r} exists in directory inode {dir_ino}")
        return d, ds

    def _touch(self, d: Inode, now: int | None = None) -> None:
        d.mtime_ns = d.ctime_ns = now or time.time_ns()
        self._iput(d)

    def lookup(self, dir_ino: int, name: bytes) -> int:
        with self._lock:
            self._check_name(name, new=False)
            return self._dir_get(self._dir_state(self._dir_inode(dir_ino)), name, dir_ino)[0]

    def readdir(self, dir_ino: int) -> list[tuple[bytes, int]]:
        with self._lock:
            ds = self._dir_state(self._dir_inode(dir_ino))
            items = sorted(
                (v[2], v[3], n, v[0]) for n, v in ds.names.items() if n not in (b".", b"..")
            )
            return [(n, ino) for _, _, n, ino in items]

    def _link_new(self, d: Inode, ds, name: bytes, i: Inode, setup=None) -> int:
        """Write a new inode and its entry; give the inode back if anything fails."""
        try:
            if setup is not None:
                setup(i)
            self._dir_add(d, ds, name, i.ino, ftype_of(i.mode))
        except BaseException:
            for k, a in enumerate(i.addrs if not i.inline else ()):
                if a and k < param.NDIRECT:
                    self._free_meta(a)
            self.ialloc.release(i.ino)
            raise
        self._iput(i)
        self._touch(d)
        return i.ino

    def create(self, dir_ino: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EINVAL, f"create: file type {fmt:#o} not supported")
        with self.handle():
            d, ds = self._target_dir(dir_ino, name)
            return self._link_new(
                d, ds, name, self._alloc_inode(fmt | (mode & 0o7777), uid, gid, 1)
            )

    def mkdir(self, dir_ino: int, name: bytes, mode: int, uid: int, gid: int) -> int:
        with self.handle():
            d, ds = self._target_dir(dir_ino, name)
            i = self._alloc_inode(stat.S_IFDIR | (mode & 0o7777), uid, gid, 2)

            def setup(i):
                b = int(self._map(i, 0, 1, alloc=True, data=False)[0][0])
                self.bufs.write(b, 0, first_dir_block(i.ino, d.ino))
                i.size = BSIZE

            ino = self._link_new(d, ds, name, i, setup)
            d.nlink += 1
            self._iput(d)
            return ino

    def symlink(self, dir_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> int:
        if not target:
            raise _err(errno.ENOENT, "empty symlink target")
        if len(target) > SYMLINK_MAX:
            raise _err(
                errno.ENAMETOOLONG, f"symlink target of {len(target)} bytes (max {SYMLINK_MAX})"
            )
        if b"\0" in target:
            raise _err(errno.EINVAL, "symlink target contains NUL")
        with self.handle():
            d, ds = self._target_dir(dir_ino, name)
            i = self._alloc_inode(stat.S_IFLNK | 0o777, uid, gid, 1)
            i.size = len(target)

            def setup(i):
                if len(target) <= INLINE_SYMLINK_MAX:
                    i.addrs = inline_addrs(target)
                else:
                    b = int(self._map(i, 0, 1, alloc=True, data=False)[0][0])
                    self.bufs.write(b, 0, target.ljust(BSIZE, b"\0"))

            return self._link_new(d, ds, name, i, setup)

    def readlink(self, ino: int) -> bytes:
        with self._lock:
            i = self._iget(ino)
            if not i.is_symlink:
                raise _err(errno.EINVAL, f"inode {ino} is not a symlink")
            if i.inline:
                return inline_target(i)
            b = self._check_ptr(i, i.addrs[0])
            if not b or i.size > SYMLINK_MAX:
                raise corrupt(f"inode {ino}: symlink of {i.size} bytes without a block")
            return bytes(self.bufs.read(b)[: i.size])

    def link(self, ino: int, dir_ino: int, name: bytes) -> None:
        with self.handle():
            i = self._iget(ino)
            if i.is_dir:
                raise _err(errno.EPERM, f"inode {ino}: hard link to a directory")
            if i.nlink == 0:
                raise _err(errno.ENOENT, f"inode {ino} has no links left")
            if i.nlink >= LINK_MAX:
                raise _err(errno.EMLINK, f"inode {ino} has {i.nlink} links")
            d, ds = self._target_dir(dir_ino, name)
            self._dir_add(d, ds, name, ino, ftype_of(i.mode))
            i.nlink += 1
            i.ctime_ns = time.time_ns()
            self._iput(i)
            self._touch(d)

    def unlink(self, dir_ino: int, name: bytes) -> int:
        with self.handle():
            self._check_name(name, new=False)
            d = self._dir_inode(dir_ino)
            ds = self._dir_state(d)
            if name in (b".", b".."):
                raise _err(errno.EISDIR, f"unlink of {name!r}")
            ino, _ = self._dir_get(ds, name, dir_ino)
            i = self._iget(ino)
            if i.is_dir:
                raise _err(errno.EISDIR, f"{name!r} is a directory")
            self._dir_remove(d, ds, name)
            i.nlink -= 1
            now = time.time_ns()
            i.ctime_ns = now
            self._iput(i)
            self._touch(d, now)
            return ino

    def rmdir(self, dir_ino: int, name: bytes) -> int:
        with self.handle():
            self._check_name(name, new=False)
            if name == b".":
                raise _err(errno.EINVAL, "rmdir of '.'")
            if name == b"..":
                raise _err(errno.ENOTEMPTY, "rmdir of '..'")
            d = self._dir_inode(dir_ino)
            ds = self._dir_state(d)
            ino, _ = self._dir_get(ds, name, dir_ino)
            c = self._iget(ino)
            if not c.is_dir:
                raise _err(errno.ENOTDIR, f"{name!r} is not a directory")
            if not self._dir_empty(self._dir_state(c)):
                raise _err(errno.ENOTEMPTY, f"directory {name!r} is not empty")
            self._dir_remove(d, ds, name)
            now = time.time_ns()
            c.nlink, c.ctime_ns = 0, now
            self._iput(c)
            d.nlink -= 1
            self._touch(d, now)
            return ino

    def rename(
        self, odir: int, oname: bytes, ndir: int, nname: bytes, flags: int = 0
    ) -> int | None:
        if flags & ~RENAME_NOREPLACE:
            raise _err(errno.EINVAL, f"rename flags {flags:#x} not supported")
        with self.handle():
            for nm in (oname, nname):
                self._check_name(nm, new=False)
                if nm in (b".", b".."):
                    raise _err(errno.EINVAL, f"rename of or onto {nm!r}")
            od = self._dir_inode(odir)
            ods = self._dir_state(od)
            ino, ft = self._dir_get(ods, oname, odir)
            nd = od if ndir == odir else self._dir_inode(ndir)
            nds = self._dir_state(nd)
            if nd.nlink == 0:
                raise _err(errno.ENOENT, f"directory inode {ndir} was removed")
            existing = nds.names.get(nname)
            if existing is not None and flags & RENAME_NOREPLACE:
                raise _err(errno.EEXIST, f"{nname!r} exists in directory inode {ndir}")
            if existing is not None and existing[0] == ino:
                return None
            src = self._iget(ino)
            if src.is_dir and ndir != odir:
                p = ndir
                while p != ROOT_INO:
                    if p == ino:
                        raise _err(errno.EINVAL, f"moving directory inode {ino} into itself")
                    p = self._dir_get(self._dir_state(self._dir_inode(p)), b"..", p)[0]
            tgt = None
            if existing is not None:
                tgt = self._iget(existing[0])
                if src.is_dir and not tgt.is_dir:
                    raise _err(errno.ENOTDIR, f"{nname!r} is not a directory")
                if not src.is_dir and tgt.is_dir:
                    raise _err(errno.EISDIR, f"{nname!r} is a directory")
                if tgt.is_dir and not self._dir_empty(self._dir_state(tgt)):
                    raise _err(errno.ENOTEMPTY, f"directory {nname!r} is not empty")
            now = time.time_ns()
            if tgt is not None:
                self._dir_set(nd, nds, nname, ino, ft)
                if tgt.is_dir:
                    tgt.nlink = 0
                    nd.nlink -= 1
                else:
                    tgt.nlink -= 1
                tgt.ctime_ns = now
                self._iput(tgt)
            else:
                self._dir_add(nd, nds, nname, ino, ft)
            self._dir_remove(od, ods, oname)
            if src.is_dir and ndir != odir:
                self._dir_set(src, self._dir_state(src), b"..", ndir, FT_DIR)
                od.nlink -= 1
                nd.nlink += 1
            src.ctime_ns = now
            self._iput(src)
            self._touch(od, now)
            if nd is not od:
                self._touch(nd, now)
            return tgt.ino if tgt is not None else None

    def release_inode(self, ino: int) -> None:
        """Free an inode whose last link is gone, and all its blocks."""
        with self.handle():
            i = self._iget(ino)
            if i.nlink:
                raise FsError(errno.EBUSY, f"inode {ino} still has {i.nlink} link(s)")
            self._release(i)

    def _release(self, i: Inode) -> None:
        if i.is_dir:
            self._dirs.pop(i.ino, None)
            self._trim(i, 0, meta=True)
        elif i.is_symlink:
            if not i.inline:
                self._trim(i, 0, meta=True)
        else:
            self._trim(i, 0)
        self._iput(Inode(i.ino, generation=i.generation))
        self.ialloc.release(i.ino)
