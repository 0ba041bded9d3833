"""Directories: ext2-style variable-length entries in directory blocks.

Part of FileSystem (kernel/core/fs.py, a mixin). Promises to the rest of the file system:

* a directory is a file of whole blocks (size = nblocks x BLOCK_SIZE) that are metadata;
  each block is a chain of entries covering it exactly:

      +0 ino u32 | +4 rec_len u16 | +6 name_len u8 | +7 file type u8 | +8 name (name_len)
      rec_len = multiple of 4, >= 8 + name_len; ino 0 = unused space

  the first block starts with "." (itself) and ".." (the parent); entries never span
  blocks; a removed entry is merged into its predecessor (or gets ino 0 if first);
  directories never shrink;
* a per-directory cache (name -> ino, type, block index, offset; free space per block) is
  built on first use by parsing every block, and then kept in step with every change, so a
  lookup is a dict access and an insert parses one block. The truth stays in the metadata
  buffers: the cache can be dropped at any time (``drop_caches``);
* a malformed entry is corruption: FsError(EUCLEAN) "directory inode D block B offset O:
  bad entry (rec_len R, name_len N)"; so is a size of more blocks than the file system has
  ("directory inode D: size S is more than the file system's N data blocks"), refused
  before anything is sized by it.
"""

from __future__ import annotations

import errno

from kernel import param
from kernel.core.disklayout import DIRENT, FT_DIR, Inode, corrupt, rec_size

BSIZE = param.BLOCK_SIZE
DIRCACHE_DIRS = 4096  # directories whose name cache is kept (LRU)
EMPTY_DIR_BLOCK = DIRENT.pack(0, BSIZE, 0, 0).ljust(BSIZE, b"\0")


def first_dir_block(ino: int, parent: int) -> bytes:
    dot = DIRENT.pack(ino, 12, 1, FT_DIR) + b".\0\0\0"
    dotdot = DIRENT.pack(parent, BSIZE - 12, 2, FT_DIR) + b"..\0\0"
    return (dot + dotdot).ljust(BSIZE, b"\0")


def parse_block(buf, where: str) -> list[tuple[int, int, int, int, bytes]]:
    """[(offset, ino, rec_len, file type, name)] of one directory block; checks the chain."""
    out = []
    off = 0
    mv = memoryview(buf)
    while off < BSIZE:
        if off + DIRENT.size > BSIZE:
            raise corrupt(f"{where} offset {off}: bad entry (truncated header)")
        ino, rec_len, name_len, ft = DIRENT.unpack_from(mv, off)
        if (
            rec_len < DIRENT.size
            or rec_len % 4
            or off + rec_len > BSIZE
            or (ino and (name_len == 0 or rec_size(name_len) > rec_len))
        ):
            raise corrupt(
                f"{where} offset {off}: bad entry (rec_len {rec_len}, name_len {name_len})"
            )
        out.append((off, ino, rec_len, ft, bytes(mv[off + 8 : off + 8 + name_len]) if ino else b""))
        off += rec_len
    return out


def _free_slots(entries) -> dict[int, int]:
    """{offset: bytes a new entry could take there} for the entries with room after them."""
    out = {}
    for off, ino, rec_len, ft, name in entries:
        room = rec_len if ino == 0 else rec_len - rec_size(len(name))
        if room >= DIRENT.size + 4:
            out[off] = room
    return out


class DirState:
    __slots__ = ("names", "blocks", "free", "hint")

    def __init__(self):
        self.names: dict[bytes, tuple[int, int, int, int]] = {}  # name -> ino, ftype, fblock, off
        self.blocks: list[int] = []
        self.free: list[dict[int, int]] = []  # per block: offset -> room
        self.hint = 0


class DirMixin:
    # provided by FileSystem: sb, bufs, _map, _iput, _dirs (OrderedDict), _handles

    def _dir_state(self, d: Inode) -> DirState:
        ds = self._dirs.get(d.ino)
        if ds is not None:
            self._dirs.move_to_end(d.ino)
            return ds
        ds = DirState()
        nb = d.size // BSIZE
        limit = self.sb.nblocks - self.sb.data_start  # a size read from disk sizes no buffer
        if nb > limit:
            raise corrupt(
                f"directory inode {d.ino}: size {d.size} is more than the file "
                f"system's {limit} data blocks"
            )
        blocks, _ = self._map(d, 0, nb) if nb else ([], None)
        for fb, b in enumerate(int(x) for x in blocks):
            if b == 0:
                raise corrupt(f"directory inode {d.ino}: hole at block {fb}")
            entries = parse_block(self.bufs.read(b), f"directory inode {d.ino} block {b}")
            for off, ino, rec_len, ft, name in entries:
                if ino:
                    ds.names[name] = (ino, ft, fb, off)
            ds.blocks.append(b)
            ds.free.append(_free_slots(entries))
        if nb and (ds.names.get(b".", (0,))[0] != d.ino or b".." not in ds.names):
            raise corrupt(f"directory inode {d.ino}: first block lacks '.' or '..'")
        self._dirs[d.ino] = ds
        if not self._handles:  # inside an operation, a cache in use must not be dropped
            self._trim_dircache()
        return ds

    def _trim_dircache(self) -> None:
        while len(self._dirs) > DIRCACHE_DIRS:
            self._dirs.popitem(last=False)

    def _reparse(self, d: Inode, ds: DirState, fb: int) -> None:
        entries = parse_block(
            self.bufs.read(ds.blocks[fb]), f"directory inode {d.ino} block {ds.blocks[fb]}"
        )
        ds.free[fb] = _free_slots(entries)

    @staticmethod
    def _room_in(ds: DirState, fb: int, need: int) -> int | None:
        for off, room in ds.free[fb].items():
            if room >= need:
                return off
        return None

    def _dir_add(self, d: Inode, ds: DirState, name: bytes, ino: int, ft: int) -> None:
        need = rec_size(len(name))
        fb, at = -1, None
        if ds.hint < len(ds.free):
            at = self._room_in(ds, ds.hint, need)
            fb = ds.hint if at is not None else -1
        if at is None:
            for i in range(len(ds.free) - 1, -1, -1):
                at = self._room_in(ds, i, need)
                if at is not None:
                    fb = i
                    break
        if at is None:  # grow the directory by one block
            fb = len(ds.blocks)
            before = list(d.addrs)
            try:
                blocks, _ = self._map(d, fb, 1, alloc=True, data=False)
            except BaseException:
                if d.addrs != before:  # an indirect block was taken: keep it referenced
                    self._iput(d)
                raise
            b = int(blocks[0])
            self.bufs.write(b, 0, EMPTY_DIR_BLOCK)
            ds.blocks.append(b)
            ds.free.append({0: BSIZE})
            d.size = (fb + 1) * BSIZE
            at = 0
        blk = ds.blocks[fb]
        buf = self.bufs.read(blk)
        off = at
        eino, rec_len, name_len, _ = DIRENT.unpack_from(buf, off)
        used = 0 if eino == 0 else rec_size(name_len)
        if rec_len - used != ds.free[fb][off] or off + rec_len > BSIZE:
            raise corrupt(
                f"directory inode {d.ino} block {blk} offset {off}: entry changed "
                f"behind the cache (rec_len {rec_len}, name_len {name_len})"
            )
        new_rec = rec_len - used
        entry = DIRENT.pack(ino, new_rec, len(name), ft) + name
        if used:  # shorten the entry that had the room, append after it
            self.bufs.write(
                blk, off + 4, used.to_bytes(2, "little") + bytes(buf[off + 6 : off + used]) + entry
            )
        else:
            self.bufs.write(blk, off, entry)
        del ds.free[fb][off]
        pos = off + used
        if new_rec - need >= DIRENT.size + 4:
            ds.free[fb][pos] = new_rec - need
        ds.names[name] = (ino, ft, fb, pos)
        ds.hint = fb
        self.faults.at("fs.dir-update")

    def _dir_remove(self, d: Inode, ds: DirState, name: bytes) -> int:
        ino, ft, fb, off = ds.names.pop(name)
        blk = ds.blocks[fb]
        entries = parse_block(self.bufs.read(blk), f"directory inode {d.ino} block {blk}")
        prev = None
        for e in entries:
            if e[0] + e[2] == off:
                prev = e
                break
        if prev is not None:
            rec_len = next(e[2] for e in entries if e[0] == off)
            self.bufs.write(blk, prev[0] + 4, (prev[2] + rec_len).to_bytes(2, "little"))
        else:
            self.bufs.write(blk, off, b"\0\0\0\0")
        self._reparse(d, ds, fb)
        ds.hint = fb
        self.faults.at("fs.dir-update")
        return ino

    def _dir_set(self, d: Inode, ds: DirState, name: bytes, ino: int, ft: int) -> None:
        _, _, fb, off = ds.names[name]
        blk = ds.blocks[fb]
        self.bufs.write(blk, off, ino.to_bytes(4, "little"))
        self.bufs.write(blk, off + 7, bytes([ft]))
        ds.names[name] = (ino, ft, fb, off)

    def _dir_empty(self, ds: DirState) -> bool:
        return all(n in (b".", b"..") for n in ds.names)

    def _dir_get(self, ds: DirState, name: bytes, dino: int) -> tuple[int, int]:
        e = ds.names.get(name)
        if e is None:
            raise OSError(errno.ENOENT, f"{name!r} not found in directory inode {dino}")
        return e[0], e[1]

    def drop_caches(self) -> None:
        """Forget the per-directory name caches (they are rebuilt from the buffers)."""
        self._dirs.clear()
