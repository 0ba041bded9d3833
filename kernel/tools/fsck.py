"""fsck: check a crashbench file system image, read-only.

Promises to the CLI (``crashbench fsck``), tests and recovery schemes:

* ``fsck(path) -> FsckResult`` never writes the image (it is opened O_RDONLY, without the
  kernel's lock, so a live image can be checked too); a committed journal is replayed in
  memory first, so a crashed image is checked as the next mount would see it;
* ``exit_code`` as e2fsck: 0 clean, 4 errors left uncorrected, 8 operational error (not a
  crashbench file system, unreadable, superblock unusable). ``problems`` holds one message
  per error, naming the inode / block / entry; ``notes`` what is worth knowing but not an
  error (orphans with nlink 0, which the next mount frees; an unclean unmount; a journal
  to replay); ``counts`` the figures;
* checks: superblock; journal (damage is an error, and then the disk is checked without
  it); inode checksums; block pointers inside the data area; a block used twice; the
  bitmap against the references (used but marked free, marked used but unreferenced =
  leaked, the metadata area marked used); directory entries (well-formed, pointing at an
  in-use inode of the type they claim, "." and ".." right); nlink against the directory
  entries; inodes unreachable from the root;
* bounded on any input: each block is claimed by the first pointer met and never followed
  again (a loop or a block used twice is an error), a pointer outside the data area is
  never followed, so the walks of all inodes read each block at most once; a directory's or
  symlink's size counts for at most the file system's data blocks; per inode, MAX_LISTED
  problems of a kind are listed and the rest counted, and at most MAX_PROBLEMS in all.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from kernel import param
from kernel.core.bmap import ROOTS
from kernel.core.dir import parse_block
from kernel.core.disklayout import (
    FT_NAMES,
    NPTR,
    ROOT_INO,
    SB_BLOCK,
    STATE_CLEAN,
    SYMLINK_MAX,
    FsError,
    Superblock,
    ftype_of,
    unpack_inode,
)
from kernel.core.journal import JournalDamaged, scan_log

BSIZE = param.BLOCK_SIZE
ND = param.NDIRECT
MAX_LISTED = 20  # blocks listed one by one per kind of bitmap problem, and per inode
MAX_PROBLEMS = 2000  # problems listed in all; the rest are counted
_TYPES = {
    stat.S_IFREG,
    stat.S_IFDIR,
    stat.S_IFLNK,
    stat.S_IFIFO,
    stat.S_IFSOCK,
    stat.S_IFCHR,
    stat.S_IFBLK,
}


class _Walk:
    """What the walk of one inode's block tree gathers: which of its first `nb` file blocks
    are mapped, the data blocks it claimed among them, problems past MAX_LISTED per kind."""

    def __init__(self, ino: int, nb: int):
        self.ino = ino
        self.have = np.zeros(nb, dtype=bool)
        self.data: list[tuple[np.ndarray, np.ndarray]] = []  # (file blocks, disk blocks)
        self.listed: dict[str, int] = {}
        self.unlisted: dict[str, int] = {}

    def mapped(self, fblocks: np.ndarray, fresh_fblocks: np.ndarray, fresh: np.ndarray) -> None:
        nb = self.have.size
        if nb:
            self.have[fblocks[fblocks < nb]] = True
            keep = fresh_fblocks < nb
            self.data.append((fresh_fblocks[keep], fresh[keep]))

    def in_order(self) -> list[int]:
        """The claimed data blocks in file order (a block used twice is checked once)."""
        if not self.data:
            return []
        fbs = np.concatenate([f for f, _ in self.data])
        blocks = np.concatenate([b for _, b in self.data])
        return blocks[np.argsort(fbs, kind="stable")].tolist()

    def report(self, check: "_Check", kind: str, msg: str) -> None:
        n = self.listed.get(kind, 0)
        if n < MAX_LISTED:
            self.listed[kind] = n + 1
            check.problem(msg)
        else:
            self.unlisted[kind] = self.unlisted.get(kind, 0) + 1


@dataclass
class FsckResult:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    exit_code: int = 0


def fsck(path) -> FsckResult:
    path = str(path)
    res = FsckResult()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        res.problems.append(f"{path}: cannot open: {e.strerror}")
        res.exit_code = 8
        return res
    try:
        _Check(fd, path, res).run()
    except OSError as e:
        res.problems.append(f"{path}: {e.strerror or e}")
        res.exit_code = 8
    finally:
        os.close(fd)
    return res


class _Check:
    def __init__(self, fd: int, path: str, res: FsckResult):
        self.fd, self.path, self.res = fd, path, res
        self.dev_blocks = os.fstat(fd).st_size // BSIZE
        self.overlay: dict[int, bytes] = {}
        self.unlisted = 0  # problems past MAX_PROBLEMS, counted only

    def raw(self, b: int, n: int = 1) -> bytes:
        if b < 0 or b + n > self.dev_blocks:
            raise OSError(
                0, f"block {b}+{n} beyond the end of the image ({self.dev_blocks} blocks)"
            )
        data = os.pread(self.fd, n * BSIZE, b * BSIZE)
        return data.ljust(n * BSIZE, b"\0")

    def read(self, b: int, n: int = 1) -> bytes:
        data = self.raw(b, n)
        if self.overlay and any(x in self.overlay for x in range(b, b + n)):
            buf = bytearray(data)
            for x in range(b, b + n):
                if x in self.overlay:
                    buf[(x - b) * BSIZE : (x - b + 1) * BSIZE] = self.overlay[x]
            data = bytes(buf)
        return data

    def problem(self, msg: str) -> None:
        if len(self.res.problems) < MAX_PROBLEMS:
            self.res.problems.append(msg)
        else:
            self.unlisted += 1

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        res = self.res
        try:
            sb = Superblock.unpack(self.raw(SB_BLOCK), self.path)
        except FsError as e:
            res.problems.append(e.strerror)
            res.exit_code = 8
            return
        if sb.nblocks > self.dev_blocks:
            res.problems.append(
                f"{self.path}: superblock says {sb.nblocks} blocks, the image has {self.dev_blocks}"
            )
            res.exit_code = 8
            return
        js, jl = sb.journal_start, sb.journal_len
        try:
            scan = scan_log(
                self.raw,
                js,
                jl,
                sb.csum_seed,
                lambda b: 0 < b < sb.nblocks and not js <= b < js + jl,
            )
            # blocks overlaid before the scan (a transaction being checked before its commit,
            # kernel/tools/txncheck.py) are newer than the log's: they stay on top
            self.overlay = scan.blocks | self.overlay
            res.counts["journal_transactions"] = scan.transactions
            if scan.transactions:
                res.notes.append(
                    f"journal: {scan.transactions} committed transaction(s) "
                    f"({len(scan.blocks)} blocks) replayed in memory"
                )
        except JournalDamaged as e:
            self.problem(f"journal: {e.strerror}; checking the disk without it")
        try:
            sb = Superblock.unpack(self.read(SB_BLOCK), self.path)
        except FsError as e:
            res.problems.append(f"after journal replay: {e.strerror}")
            res.exit_code = 8
            return
        if sb.state != STATE_CLEAN:
            res.notes.append("the file system was not cleanly unmounted")
        self.sb = sb
        self.check_inodes()
        self.check_blocks()
        self.check_dirs()
        self.check_links()
        res.counts["problems"] = len(res.problems) + self.unlisted
        if self.unlisted:
            res.problems.append(f"... and {self.unlisted} more problems")
        res.exit_code = 4 if res.problems else 0

    # --- inodes and their blocks --------------------------------------------------------
    def check_inodes(self) -> None:
        sb = self.sb
        raw = self.read(sb.inode_start, sb.inode_len)
        rows = np.frombuffer(raw, np.uint8)[: sb.ninodes * param.INODE_SIZE].reshape(sb.ninodes, -1)
        nonzero = np.flatnonzero(rows.any(axis=1))
        self.inodes = {}
        for ino in nonzero.tolist():
            if ino == 0:
                self.problem("inode 0 (reserved for the block device) is not empty")
                continue
            off = ino * param.INODE_SIZE
            try:
                i = unpack_inode(ino, raw[off : off + param.INODE_SIZE], sb.csum_seed)
            except FsError as e:
                self.problem(e.strerror)
                i = unpack_inode(ino, raw[off : off + param.INODE_SIZE], sb.csum_seed, verify=False)
            if i.mode:
                if stat.S_IFMT(i.mode) not in _TYPES:
                    self.problem(f"inode {ino}: unknown file type in mode {i.mode:#o}")
                    continue
                self.inodes[ino] = i
        root = self.inodes.get(ROOT_INO)
        if root is None or not root.is_dir:
            self.problem(f"root inode {ROOT_INO} is not an in-use directory")
        self.owner = np.full(sb.nblocks, -1, dtype=np.int32)  # inode claiming each block
        self.dir_blocks: dict[int, list[int]] = {}
        self.res.counts.update(
            inodes_used=len(self.inodes),
            directories=sum(i.is_dir for i in self.inodes.values()),
            files=sum(i.is_reg for i in self.inodes.values()),
            symlinks=sum(i.is_symlink for i in self.inodes.values()),
        )
        for ino, i in self.inodes.items():
            if i.is_symlink:
                if not 0 < i.size <= SYMLINK_MAX:
                    self.problem(f"inode {ino}: symlink of {i.size} bytes")
                if i.inline:
                    continue
            self.tree(i)

    def tree(self, i) -> None:
        """Claim every block of inode i (indirect and data), each block once; a directory's
        data blocks are kept in order for check_dirs."""
        w = _Walk(i.ino, self.blocks_that_matter(i))
        self.take(w, np.asarray(i.addrs[:ND], dtype=np.int64), 0, 1, 0)
        for slot, depth, base in ROOTS:
            self.take(
                w, np.asarray(i.addrs[slot : slot + 1], dtype=np.int64), base, NPTR**depth, depth
            )
        for kind, n in w.unlisted.items():
            self.problem(f"inode {i.ino}: ... and {n} more {kind}")
        if w.have.size:
            holes = np.flatnonzero(~w.have)
            if holes.size:
                self.problem(
                    f"inode {i.ino}: {'directory' if i.is_dir else 'symlink'} block "
                    f"{int(holes[0])} is a hole"
                )
        if i.is_dir:
            self.dir_blocks[i.ino] = w.in_order()

    def blocks_that_matter(self, i) -> int:
        """How many file blocks of a directory or symlink its size covers, never more than the
        file system has (so no size read from disk sizes a buffer); 0 for other files."""
        if not (i.is_dir or i.is_symlink):
            return 0
        limit = self.sb.nblocks - self.sb.data_start
        nb = max(1, -(-i.size // BSIZE)) if i.is_symlink else i.size // BSIZE
        if i.is_dir and i.size % BSIZE:
            self.problem(f"directory inode {i.ino}: size {i.size} is not whole blocks")
        if nb > limit:
            self.problem(
                f"{'directory' if i.is_dir else 'symlink'} inode {i.ino}: size {i.size} "
                f"is more than the file system's {limit} data blocks"
            )
            nb = limit
        return nb

    def take(self, w: "_Walk", ptrs: np.ndarray, base: int, span: int, depth: int) -> None:
        """Claim the blocks `ptrs` point at (entry k maps file blocks base + k*span on) and,
        if they are `depth` > 0 levels of indirection above the data, walk the ones met for
        the first time. A pointer outside the data area or to a block already claimed is not
        followed, so all walks together read each block of the disk at most once."""
        sb = self.sb
        idx = np.flatnonzero(ptrs)
        p = ptrs[idx]
        bad = (p < sb.data_start) | (p >= sb.nblocks)
        for b in p[bad].tolist():
            w.report(
                self,
                "block pointers out of range",
                f"inode {w.ino}: block pointer {b} out of range "
                f"(data blocks {sb.data_start}..{sb.nblocks - 1})",
            )
        idx, p = idx[~bad], p[~bad]
        if not p.size:
            return
        uniq, first, counts = np.unique(p, return_index=True, return_counts=True)
        owner = self.owner[uniq]
        again = (counts > 1) | (owner >= 0)
        for b, o in zip(uniq[again].tolist(), owner[again].tolist()):
            by = (
                f"by inode {o} and inode {w.ino}"
                if 0 <= o != w.ino
                else f"both times by inode {w.ino}"
            )
            w.report(
                self,
                "blocks used twice",
                f"block {b} used twice ({by})"
                + (": an indirect block met again, not followed" if depth else ""),
            )
        fresh = owner < 0
        blocks, fblocks = uniq[fresh], base + idx[first[fresh]] * span
        self.owner[blocks] = w.ino
        if depth == 0:
            w.mapped(base + idx * span, fblocks, blocks)
            return
        for b, fb in zip(blocks.tolist(), fblocks.tolist()):
            self.take(
                w, np.frombuffer(self.read(b), "<u4").astype(np.int64), fb, span // NPTR, depth - 1
            )

    # --- bitmap ----------------------------------------------------------------------------
    def check_blocks(self) -> None:
        sb = self.sb
        raw = self.read(sb.bitmap_start, sb.bitmap_len)
        used = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: sb.nblocks]
        ref = self.owner >= 0
        meta_free = np.flatnonzero(used[: sb.data_start] == 0)
        if meta_free.size:
            self.problem(
                f"{meta_free.size} block(s) of the metadata area marked free in the "
                f"bitmap (first: {int(meta_free[0])})"
            )
        free_used = np.flatnonzero(ref & (used == 0))
        for b in free_used[:MAX_LISTED].tolist():
            self.problem(
                f"block {b} in use by inode {int(self.owner[b])} but marked free in the bitmap"
            )
        if free_used.size > MAX_LISTED:
            self.problem(
                f"... and {free_used.size - MAX_LISTED} more blocks in use but marked free"
            )
        leaked = np.flatnonzero((used == 1) & ~ref)
        leaked = leaked[leaked >= sb.data_start]
        for b in leaked[:MAX_LISTED].tolist():
            self.problem(f"block {b} marked in use in the bitmap but not referenced (leaked)")
        if leaked.size > MAX_LISTED:
            self.problem(f"... and {leaked.size - MAX_LISTED} more leaked blocks")
        self.res.counts.update(
            blocks=sb.nblocks,
            blocks_used=int(np.count_nonzero(used)),
            blocks_referenced=int(np.count_nonzero(ref)) + sb.data_start,
            leaked=int(leaked.size),
        )

    # --- directories -------------------------------------------------------------------------
    def check_dirs(self) -> None:
        self.refs: dict[int, int] = defaultdict(int)
        self.parents: dict[int, list[int]] = defaultdict(list)
        self.children: dict[int, list[int]] = defaultdict(list)
        self.dotdot: dict[int, int] = {}
        for d, blocks in self.dir_blocks.items():
            for fb, b in enumerate(blocks):
                where = f"directory inode {d} block {b}"
                try:
                    entries = parse_block(self.read(b), where)
                except FsError as e:
                    self.problem(e.strerror)
                    continue
                live = [e for e in entries if e[1]]
                if fb == 0:
                    if len(live) < 2 or live[0][4] != b"." or live[1][4] != b"..":
                        self.problem(f"{where}: does not start with '.' and '..'")
                    else:
                        if live[0][1] != d:
                            self.problem(f"directory inode {d}: '.' points at inode {live[0][1]}")
                        self.dotdot[d] = live[1][1]
                        live = live[2:]
                for off, ino, rec_len, ft, name in live:
                    self.entry(d, b, off, ino, ft, name)

    def entry(self, d: int, b: int, off: int, ino: int, ft: int, name: bytes) -> None:
        what = f"directory inode {d}: entry {name!r}"
        if name in (b".", b".."):
            self.problem(f"{what} (block {b} offset {off}) is not at the start of the directory")
            return
        if not 0 < ino < self.sb.ninodes:
            self.problem(f"{what} points at inode {ino}, out of range (1..{self.sb.ninodes - 1})")
            return
        i = self.inodes.get(ino)
        if i is None:
            self.problem(f"{what} points at free inode {ino}")
            return
        if ft != ftype_of(i.mode):
            self.problem(
                f"{what} has type {FT_NAMES.get(ft, ft)} but inode {ino} is a "
                f"{FT_NAMES[ftype_of(i.mode)]}"
            )
        self.refs[ino] += 1
        self.children[d].append(ino)
        if i.is_dir:
            self.parents[ino].append(d)

    # --- link counts and reachability ------------------------------------------------------
    def check_links(self) -> None:
        orphans = 0
        flagged: set[int] = set()
        for ino, i in self.inodes.items():
            if i.is_dir:
                parents = self.parents.get(ino, [])
                subdirs = sum(
                    1
                    for c in self.children.get(ino, [])
                    if c in self.inodes and self.inodes[c].is_dir
                )
                if ino == ROOT_INO:
                    if parents:
                        self.problem(f"root directory has {len(parents)} directory entries")
                    if self.dotdot.get(ino, ino) != ino:
                        self.problem(f"root directory: '..' points at inode {self.dotdot[ino]}")
                elif not parents:
                    if i.nlink == 0:
                        orphans += 1
                        self.res.notes.append(
                            f"inode {ino}: removed directory still allocated (orphan, nlink 0)"
                        )
                    else:
                        self.problem(
                            f"directory inode {ino} (nlink {i.nlink}) has no name: unreachable"
                        )
                    flagged.add(ino)
                    continue
                elif len(parents) > 1:
                    self.problem(
                        f"directory inode {ino} has {len(parents)} names "
                        f"(in directories {sorted(parents)})"
                    )
                elif ino in self.dotdot and self.dotdot[ino] != parents[0]:
                    self.problem(
                        f"directory inode {ino}: '..' points at inode {self.dotdot[ino]}, "
                        f"but its parent is inode {parents[0]}"
                    )
                if i.nlink != 2 + subdirs:
                    self.problem(f"directory inode {ino}: nlink {i.nlink}, expected {2 + subdirs}")
            else:
                refs = self.refs.get(ino, 0)
                if i.nlink == 0:
                    if refs:
                        self.problem(f"inode {ino} has nlink 0 but {refs} directory entries")
                    else:
                        orphans += 1
                        self.res.notes.append(
                            f"inode {ino}: orphan (nlink 0), freed at the next mount"
                        )
                        flagged.add(ino)
                elif refs == 0:
                    self.problem(f"inode {ino} (nlink {i.nlink}) is in no directory: unreachable")
                    flagged.add(ino)
                elif refs != i.nlink:
                    self.problem(f"inode {ino}: nlink {i.nlink} but {refs} directory entries")
        seen = {ROOT_INO}
        todo = deque([ROOT_INO])
        while todo:
            d = todo.popleft()
            for c in self.children.get(d, []):
                if c not in seen:
                    seen.add(c)
                    if c in self.inodes and self.inodes[c].is_dir:
                        todo.append(c)
        for ino in self.inodes:
            if ino not in seen and ino not in flagged:
                self.problem(f"inode {ino} is not reachable from the root directory")
        self.res.counts["orphans"] = orphans
