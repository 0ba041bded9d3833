"""On-disk layouts of the crashbench file system: superblock, inode, directory entry.

Promises to fs.py, mkfs.py, fsck.py (the diagram of the whole disk is in kernel/core/fs.py):

* every structure is little-endian, packed, at a fixed offset;
* the superblock and every inode carry an xxh32 checksum; an inode's is seeded with the
  file system's ``csum_seed`` + its number, so an inode copied to the wrong slot is caught.
  An all-zero inode is a never-used one and is valid without a checksum;
* ``unpack_*`` raise FsError(EUCLEAN) naming the structure and what is wrong;
* ``pointers_outside(blocks, sb)``: every block pointer of an in-use inode, in the given
  inode-table blocks, that points outside the data area (inline symlinks have none), found
  in bulk.
"""

from __future__ import annotations

import errno
import stat
import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

from kernel import param

BSIZE = param.BLOCK_SIZE
FS_MAGIC = 0x53464243  # "CBFS"
FS_VERSION = 1
SB_BLOCK = 1  # block 0 is never used (boot block)
ROOT_INO = 1  # inode 0 is reserved for the block device in the page cache
STATE_CLEAN, STATE_MOUNTED = 1, 2
INODES_PER_BLOCK = BSIZE // param.INODE_SIZE
BITS_PER_BLOCK = BSIZE * 8
NPTR = BSIZE // 4  # block pointers in an indirect block
NADDR = param.NDIRECT + 3  # direct, single, double, triple indirect
INLINE_SYMLINK_MAX = NADDR * 4  # a symlink target this short lives in the inode's pointer area
SYMLINK_MAX = BSIZE - 1  # PATH_MAX - 1
LINK_MAX = 65000  # as ext4


class FsError(OSError):
    """The file system refuses: not ours, corrupted, or out of space."""


def corrupt(msg: str) -> FsError:
    return FsError(errno.EUCLEAN, msg)


# --- superblock ---------------------------------------------------------------------------
_SB = struct.Struct("<IIIIQIIIIIIIIII16sQ")
_U32 = struct.Struct("<I")


@dataclass
class Superblock:
    nblocks: int
    ninodes: int
    journal_start: int
    journal_len: int
    inode_start: int
    inode_len: int
    bitmap_start: int
    bitmap_len: int
    data_start: int
    csum_seed: int
    uuid: bytes
    mkfs_time_ns: int = 0
    state: int = STATE_CLEAN
    root_ino: int = ROOT_INO
    magic: int = FS_MAGIC
    version: int = FS_VERSION
    block_size: int = BSIZE

    def pack(self) -> bytes:
        body = _SB.pack(
            self.magic,
            self.version,
            self.block_size,
            self.state,
            self.nblocks,
            self.ninodes,
            self.root_ino,
            self.journal_start,
            self.journal_len,
            self.inode_start,
            self.inode_len,
            self.bitmap_start,
            self.bitmap_len,
            self.data_start,
            self.csum_seed,
            self.uuid,
            self.mkfs_time_ns,
        )
        return body + _U32.pack(xxhash.xxh32_intdigest(body))

    @classmethod
    def unpack(cls, buf, where: str) -> "Superblock":
        """Parse and check block 1; `where` (the image) prefixes every error."""
        buf = bytes(buf[: _SB.size + 4])
        (
            magic,
            version,
            bsize,
            state,
            nblocks,
            ninodes,
            root,
            js,
            jl,
            its,
            itl,
            bs,
            bl,
            ds,
            seed,
            uuid,
            t,
        ) = _SB.unpack_from(buf)
        if magic != FS_MAGIC:
            raise FsError(
                errno.EINVAL,
                f"{where}: not a crashbench file system "
                f"(bad magic {magic:#010x}, expected {FS_MAGIC:#010x})",
            )
        (stored,) = _U32.unpack_from(buf, _SB.size)
        computed = xxhash.xxh32_intdigest(buf[: _SB.size])
        if stored != computed:
            raise corrupt(
                f"{where}: superblock checksum mismatch "
                f"(stored {stored:#010x}, computed {computed:#010x})"
            )
        if version != FS_VERSION:
            raise FsError(
                errno.EINVAL,
                f"{where}: file system version {version} (this kernel knows {FS_VERSION})",
            )
        if bsize != BSIZE:
            raise FsError(errno.EINVAL, f"{where}: block size {bsize} (this kernel uses {BSIZE})")
        sb = cls(nblocks, ninodes, js, jl, its, itl, bs, bl, ds, seed, uuid, t, state, root)
        sb.check_geometry(where)
        return sb

    def check_geometry(self, where: str) -> None:
        order = [
            ("superblock", SB_BLOCK, 1),
            ("journal", self.journal_start, self.journal_len),
            ("inode table", self.inode_start, self.inode_len),
            ("bitmap", self.bitmap_start, self.bitmap_len),
        ]
        end = 0
        for name, start, length in order:
            if start < end or length < 1:
                raise corrupt(
                    f"{where}: superblock: {name} at block {start} (+{length}) "
                    f"overlaps what precedes it"
                )
            end = start + length
        if self.data_start < end or self.data_start >= self.nblocks:
            raise corrupt(
                f"{where}: superblock: data start {self.data_start} outside "
                f"{end}..{self.nblocks - 1}"
            )
        if self.inode_len * INODES_PER_BLOCK < self.ninodes or self.ninodes < 2:
            raise corrupt(
                f"{where}: superblock: {self.ninodes} inodes do not fit "
                f"{self.inode_len} inode table blocks"
            )
        if self.bitmap_len * BITS_PER_BLOCK < self.nblocks:
            raise corrupt(
                f"{where}: superblock: {self.bitmap_len} bitmap blocks cannot map "
                f"{self.nblocks} blocks"
            )
        if self.root_ino != ROOT_INO:
            raise corrupt(f"{where}: superblock: root inode {self.root_ino} (expected {ROOT_INO})")


# --- inode --------------------------------------------------------------------------------
_INO = struct.Struct(f"<4IQ3q2I{NADDR}IQ")  # 124 bytes, then the u32 checksum
assert _INO.size + 4 == param.INODE_SIZE
_ADDRS = struct.Struct(f"<{NADDR}I")
ZERO_INODE = bytes(param.INODE_SIZE)

INODE_DTYPE = np.dtype(
    [
        ("mode", "<u4"),
        ("uid", "<u4"),
        ("gid", "<u4"),
        ("nlink", "<u4"),
        ("size", "<u8"),
        ("atime_ns", "<i8"),
        ("mtime_ns", "<i8"),
        ("ctime_ns", "<i8"),
        ("generation", "<u4"),
        ("flags", "<u4"),
        ("addrs", "<u4", (NADDR,)),
        ("reserved", "<u8"),
        ("csum", "<u4"),
    ]
)
assert INODE_DTYPE.itemsize == param.INODE_SIZE


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    generation: int = 0
    flags: int = 0
    addrs: list = field(default_factory=lambda: [0] * NADDR)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def inline(self) -> bool:
        """A symlink whose target lives in the pointer area: no blocks."""
        return self.is_symlink and self.size <= INLINE_SYMLINK_MAX


def pointers_outside(blocks: dict[int, bytes], sb: "Superblock") -> list[tuple[int, int]]:
    """(inode, pointer) of each pointer outside ``sb``'s data area in the inode-table
    blocks among ``blocks`` (block number -> its bytes)."""
    first = sb.inode_start
    table = sorted(b for b in blocks if first <= b < first + sb.inode_len)
    if not table:
        return []
    a = np.frombuffer(b"".join(blocks[b] for b in table), INODE_DTYPE)
    inos = (np.repeat(np.array(table, np.int64) - first, INODES_PER_BLOCK)) * INODES_PER_BLOCK
    inos += np.tile(np.arange(INODES_PER_BLOCK), len(table))
    mode = a["mode"] & 0o170000  # the file type bits (stat.S_IFMT)
    inline = (mode == stat.S_IFLNK) & (a["size"] <= INLINE_SYMLINK_MAX)
    p = a["addrs"]
    bad = (p != 0) & ((p < sb.data_start) | (p >= sb.nblocks))
    bad &= ((a["mode"] != 0) & ~inline)[:, None]
    rows, cols = np.nonzero(bad)
    return list(zip(inos[rows].tolist(), p[rows, cols].tolist()))


def inode_csum(body, ino: int, seed: int) -> int:
    return xxhash.xxh32_intdigest(body, (seed + ino) & 0xFFFFFFFF)


def pack_inode(i: Inode, seed: int) -> bytes:
    body = _INO.pack(
        i.mode,
        i.uid,
        i.gid,
        i.nlink,
        i.size,
        i.atime_ns,
        i.mtime_ns,
        i.ctime_ns,
        i.generation,
        i.flags,
        *i.addrs,
        0,
    )
    return body + _U32.pack(inode_csum(body, i.ino, seed))


def unpack_inode(ino: int, buf, seed: int, *, verify: bool = True) -> Inode:
    buf = bytes(buf[: param.INODE_SIZE])
    if buf == ZERO_INODE:
        return Inode(ino)
    if verify:
        (stored,) = _U32.unpack_from(buf, _INO.size)
        computed = inode_csum(buf[: _INO.size], ino, seed)
        if stored != computed:
            raise corrupt(
                f"inode {ino}: bad checksum (stored {stored:#010x}, computed {computed:#010x})"
            )
    v = _INO.unpack_from(buf)
    return Inode(ino, *v[:10], addrs=list(v[10 : 10 + NADDR]))


def inline_target(i: Inode) -> bytes:
    return _ADDRS.pack(*i.addrs)[: i.size]


def inline_addrs(target: bytes) -> list:
    return list(_ADDRS.unpack(target.ljust(INLINE_SYMLINK_MAX, b"\0")))


# --- directory entries (ext2 style) ---------------------------------------------------------
DIRENT = struct.Struct("<IHBB")  # ino, rec_len, name_len, file type; then the name
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
_FT = {
    stat.S_IFREG: FT_REG,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHR,
    stat.S_IFBLK: FT_BLK,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}
FT_NAMES = {
    FT_REG: "file",
    FT_DIR: "directory",
    FT_CHR: "char device",
    FT_BLK: "block device",
    FT_FIFO: "fifo",
    FT_SOCK: "socket",
    FT_SYMLINK: "symlink",
    FT_UNKNOWN: "unknown",
}


def ftype_of(mode: int) -> int:
    return _FT.get(stat.S_IFMT(mode), FT_UNKNOWN)


def rec_size(name_len: int) -> int:
    return (DIRENT.size + name_len + 3) & ~3
