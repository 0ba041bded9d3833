"""Checking a journal transaction before it is committed: would fsck reject the result?

Promises to a kernel that commits metadata it did not write itself (the Orthros backup
completing a dead kernel's running transaction, kernel/tools/txncomplete.py):
``check_transaction(read, dev_blocks, blocks)`` compares the disk as it is (``read``, after
journal replay) with the disk as it would be with ``blocks`` overlaid and returns one
``Problem`` per thing fsck (kernel/tools/fsck.py, whose checks it reuses) would reject — an empty
list when the transaction may be committed. The disk is presumed consistent before the
transaction (every committed transaction was checked or written by a live kernel), so only
what the transaction changes is checked, in bulk (numpy), and the check is sparse: it reads
the transaction's inodes, their block trees, the bitmap blocks holding the bits of the blocks
those trees reference and the bitmap blocks the transaction writes, and the touched
directory blocks, each once; what it holds (the blocks each changed inode claims, the bits it
looks at) follows the transaction, not the size of the disk:

* every inode whose bytes change: checksum, file type, symlink size, block pointers inside
  the data area, directory and symlink blocks without holes (fsck's ``tree``);
* the blocks those inodes reference after the transaction: each marked in use in the
  bitmap, none referenced twice, none newly referenced that was in use before (another
  inode's block: freed blocks are not reused before their free commits);
* every bitmap bit the transaction sets is a block it newly references, every block it
  stops referencing is marked free (else leaked), the metadata area stays marked in use —
  looked at in the bitmap blocks the transaction writes only: a bitmap block it does not
  write keeps its bits, so a free metadata-area bit there was on the disk before and is no
  longer reported (it was before the check became sparse; fsck of the disk reports it);
* directory blocks it changes: well formed, "." and "..", entries naming in-use inodes of
  the type they claim (fsck's ``entry``).

A transaction block in the data area that no changed inode references before or after
cannot be judged from the delta: then the whole overlaid disk is checked as fsck does.
"""

from __future__ import annotations

import stat
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from kernel import param
from kernel.core.dir import parse_block
from kernel.core.disklayout import (
    BITS_PER_BLOCK,
    INODES_PER_BLOCK,
    SB_BLOCK,
    SYMLINK_MAX,
    FsError,
    Superblock,
    unpack_inode,
)
from kernel.tools.fsck import _TYPES, MAX_LISTED, FsckResult, _Check

ISIZE = param.INODE_SIZE


@dataclass(frozen=True)
class Problem:
    msg: str
    ino: int = 0  # the inode whose change causes it, when one does (0: none known)

    def __str__(self) -> str:
        return self.msg


class _Disk(_Check):
    """fsck's checks over a block device, with blocks overlaid."""

    def __init__(self, read, dev_blocks: int, overlay: dict[int, bytes]):
        self._dev_read, self.dev_blocks, self.overlay = read, dev_blocks, overlay
        self.path, self.res = "transaction", FsckResult()
        self.dir_blocks: dict[int, list[int]] = {}
        self.owner_of: dict[int, np.ndarray] = {}  # changed inode -> its blocks after
        self.unlisted = 0  # fsck's problems past its cap

    def raw(self, b: int, n: int = 1) -> bytes:
        if b < 0 or b + n > self.dev_blocks:
            raise FsError(
                0, f"block {b}+{n} beyond the end of the device ({self.dev_blocks} blocks)"
            )
        return bytes(self._dev_read(b, n))

    def read(self, b: int, n: int = 1) -> bytes:
        if n == 1 and b in self.overlay:  # no device request for what the overlay has
            return self.overlay[b]
        return super().read(b, n)

    def blocks_of(self, i) -> np.ndarray:
        """The blocks (indirect and data) fsck's walk claims for inode i; one claimed before
        by another inode is reported as used twice by the walk, not listed again."""
        self.tree(i)
        return self.owner.of(i.ino)

    def inode(self, ino: int, verify: bool = True):
        sb = self.sb
        b, off = sb.inode_start + ino // INODES_PER_BLOCK, (ino % INODES_PER_BLOCK) * ISIZE
        return unpack_inode(ino, self.read(b)[off : off + ISIZE], sb.csum_seed, verify=verify)


class _Owners:
    """fsck's owner array (the inode that claimed each block, -1 for none) holding only the
    blocks claimed: sorted runs, a run merged into the next one added when that one is as
    large, so a lookup searches a few runs and the size follows the trees walked."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted blocks, their inodes)

    def __getitem__(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks, np.int64)
        out = np.full(blocks.size, -1, np.int32)
        for keys, inos in self.runs:
            at = np.minimum(np.searchsorted(keys, blocks), keys.size - 1)
            hit = keys[at] == blocks
            out[hit] = inos[at[hit]]
        return out

    def __setitem__(self, blocks: np.ndarray, ino: int) -> None:
        keys = np.asarray(blocks, np.int64)  # never claimed before: fsck's walk sees to it
        if not keys.size:
            return
        inos = np.full(keys.size, ino, np.int32)
        while self.runs and self.runs[-1][0].size <= keys.size:
            k, v = self.runs.pop()
            keys, inos = np.concatenate([k, keys]), np.concatenate([v, inos])
        order = np.argsort(keys, kind="stable")
        self.runs.append((keys[order], inos[order]))

    def of(self, ino: int) -> np.ndarray:
        """The blocks inode ino claimed, in order."""
        mine = [k[v == ino] for k, v in self.runs]
        return np.sort(np.concatenate(mine)) if mine else np.zeros(0, np.int64)


class _InUse:
    """fsck's ``inodes`` table, read on demand: the in-use inode of a number, or None."""

    def __init__(self, disk: _Disk, changed: dict):
        self.disk, self.changed = disk, changed

    def get(self, ino: int):
        if ino in self.changed:
            return self.changed[ino]
        try:
            i = self.disk.inode(ino)
        except FsError:
            return None
        return i if i.mode else None

    def __contains__(self, ino: int) -> bool:
        return self.get(ino) is not None

    def __getitem__(self, ino: int):
        return self.get(ino)


def check_transaction(read, dev_blocks: int, blocks: dict[int, bytes]) -> list[Problem]:
    """What fsck would reject in the disk read by ``read(b, n)`` once ``blocks`` are on it."""
    once = _read_once(read)  # the disk before and after share what is not overlaid
    old, new = _Disk(once, dev_blocks, {}), _Disk(once, dev_blocks, blocks)
    try:
        old.sb = Superblock.unpack(old.read(SB_BLOCK), "the disk")
        new.sb = sb = Superblock.unpack(new.read(SB_BLOCK), "the transaction")
    except FsError as e:
        return [Problem(e.strerror)]
    for d in (old, new):  # fsck's walk claims each block for one inode, once
        d.owner = _Owners()
    geometry = (
        "nblocks",
        "ninodes",
        "inode_start",
        "inode_len",
        "bitmap_start",
        "bitmap_len",
        "data_start",
        "journal_start",
        "journal_len",
        "csum_seed",
    )
    if any(getattr(old.sb, k) != getattr(sb, k) for k in geometry):
        return [Problem("the transaction changes the superblock's geometry")]
    changed = _changed_inodes(old, new, blocks)
    problems: list[Problem] = []
    trees_new, trees_old, live = [], [], {}
    for ino in changed:

        def report(msg: str, ino=ino) -> None:
            problems.append(Problem(msg, ino))

        new.problem = report
        try:
            i = new.inode(ino)
        except FsError as e:
            report(e.strerror)
            continue
        old.problem = lambda msg: None  # the disk before is presumed consistent
        oi = old.inode(ino, verify=False)
        if oi.mode and not (oi.is_symlink and oi.inline):
            old.owner_of[ino] = old.blocks_of(oi)
            trees_old.append(old.owner_of[ino])
        if not i.mode:
            continue
        if stat.S_IFMT(i.mode) not in _TYPES:
            report(f"inode {ino}: unknown file type in mode {i.mode:#o}")
            continue
        if i.is_symlink and not 0 < i.size <= SYMLINK_MAX:
            report(f"inode {ino}: symlink of {i.size} bytes")
        live[ino] = i
        if not (i.is_symlink and i.inline):
            new.owner_of[ino] = new.blocks_of(i)
            trees_new.append(new.owner_of[ino])
    in_data = np.array([b for b in blocks if b >= sb.data_start], np.int64)
    ref_new = np.concatenate(trees_new) if trees_new else np.zeros(0, np.int64)
    ref_old = np.unique(np.concatenate(trees_old)) if trees_old else np.zeros(0, np.int64)
    if np.setdiff1d(in_data, np.r_[ref_new, ref_old]).size:
        return _whole_disk(read, dev_blocks, blocks)
    problems += _bitmap(old, new, ref_new, ref_old)
    problems += _directories(new, blocks, live)
    return problems


def _read_once(read):
    """``read`` with each extent asked of the device once: the two views of the disk read
    the same superblock, inode-table, bitmap and indirect blocks, each a device request
    (modeled time) during the takeover. Holds only what the delta check reads."""
    got: dict[tuple[int, int], bytes] = {}

    def cached(b: int, n: int = 1) -> bytes:
        k = (b, n)
        if k not in got:
            got[k] = bytes(read(b, n))
        return got[k]

    return cached


def _changed_inodes(old: _Disk, new: _Disk, blocks: dict[int, bytes]) -> list[int]:
    sb = new.sb
    out = []
    for b in sorted(blocks):
        if not sb.inode_start <= b < sb.inode_start + sb.inode_len:
            continue
        rows_old = np.frombuffer(old.read(b), np.uint8).reshape(INODES_PER_BLOCK, ISIZE)
        rows_new = np.frombuffer(blocks[b], np.uint8).reshape(INODES_PER_BLOCK, ISIZE)
        first = (b - sb.inode_start) * INODES_PER_BLOCK
        out += (np.flatnonzero((rows_old != rows_new).any(axis=1)) + first).tolist()
    return [i for i in out if 0 < i < sb.ninodes]


def _bitmap(old: _Disk, new: _Disk, ref_new: np.ndarray, ref_old: np.ndarray) -> list[Problem]:
    out: list[Problem] = []

    def owner(b: int) -> int:
        """The changed inode that references b after the transaction, or did before."""
        for d in (new.owner_of, old.owner_of):
            i = next((i for i, t in d.items() if b in t), 0)
            if i:
                return i
        return 0

    def listed(blocks: np.ndarray, msg) -> None:
        for b in blocks[:MAX_LISTED].tolist():
            o = owner(b)
            out.append(Problem(msg(b, o), o))

    uniq, counts = np.unique(ref_new, return_counts=True)
    listed(
        uniq[counts > 1], lambda b, o: f"block {b} used twice (by inode {o} and another it changes)"
    )
    listed(
        uniq[_used(new, uniq) == 0],
        lambda b, o: f"block {b} in use by inode {o} but marked free in the bitmap",
    )
    added = np.setdiff1d(uniq, ref_old)
    listed(
        added[_used(old, added) == 1],
        lambda b, o: (
            f"block {b} used twice (by inode {o} and an inode the transaction does not change)"
        ),
    )
    dropped = np.setdiff1d(ref_old, uniq)
    set_bits, meta_free = _written_bits(old, new)
    leaked = np.union1d(np.setdiff1d(set_bits, added), dropped[_used(new, dropped) == 1])
    listed(
        leaked, lambda b, o: f"block {b} marked in use in the bitmap but not referenced (leaked)"
    )
    if meta_free.size:
        out.append(
            Problem(f"block {int(meta_free[0])} of the metadata area marked free in the bitmap")
        )
    return out


def _used(d: _Disk, blocks: np.ndarray) -> np.ndarray:
    """The bitmap bit of each block (in the data area) as d sees it, reading only the
    bitmap blocks that hold those bits."""
    out = np.zeros(blocks.size, np.uint8)
    where = blocks // BITS_PER_BLOCK
    for k in np.unique(where).tolist():
        sel = where == k
        raw = np.frombuffer(d.read(d.sb.bitmap_start + k), np.uint8)
        bit = blocks[sel] - k * BITS_PER_BLOCK
        out[sel] = (raw[bit >> 3] >> (bit & 7)) & 1
    return out


def _written_bits(old: _Disk, new: _Disk) -> tuple[np.ndarray, np.ndarray]:
    """In the bitmap blocks the transaction writes (no other bit changes): the blocks whose
    bit it sets, and the blocks of the metadata area it leaves marked free, in order."""
    sb = new.sb
    set_bits, meta_free = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for b in sorted(new.overlay):
        k = b - sb.bitmap_start
        if not 0 <= k < sb.bitmap_len:
            continue
        first = k * BITS_PER_BLOCK
        n = min(BITS_PER_BLOCK, sb.nblocks - first)
        was, now = _unpack(old.read(b), n), _unpack(new.read(b), n)
        set_bits.append(np.flatnonzero((now == 1) & (was == 0)) + first)
        meta_free.append(np.flatnonzero(now[: max(0, sb.data_start - first)] == 0) + first)
    return np.concatenate(set_bits), np.concatenate(meta_free)


def _unpack(raw: bytes, nbits: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:nbits]


def _directories(new: _Disk, blocks: dict[int, bytes], live: dict) -> list[Problem]:
    """fsck's directory checks on the directory blocks the transaction writes."""
    found: list[Problem] = []
    new.problem = lambda msg: found.append(Problem(msg))
    new.inodes = _InUse(new, live)
    new.refs, new.parents, new.children = defaultdict(int), defaultdict(list), defaultdict(list)
    for d, dblocks in new.dir_blocks.items():
        for fb, b in enumerate(dblocks):
            if b not in blocks:
                continue
            where = f"directory inode {d} block {b}"
            try:
                entries = [e for e in parse_block(new.read(b), where) if e[1]]
            except FsError as e:
                found.append(Problem(e.strerror, d))
                continue
            if fb == 0:
                if len(entries) < 2 or entries[0][4] != b"." or entries[1][4] != b"..":
                    found.append(Problem(f"{where}: does not start with '.' and '..'", d))
                    continue
                if entries[0][1] != d:
                    found.append(
                        Problem(f"directory inode {d}: '.' points at inode {entries[0][1]}", d)
                    )
                entries = entries[2:]
            for off, ino, _, ft, name in entries:
                new.entry(d, b, off, ino, ft, name)
    return found


def _whole_disk(read, dev_blocks: int, blocks: dict[int, bytes]) -> list[Problem]:
    """fsck of the whole overlaid disk (the journal is replayed: it checks what is home)."""
    disk = _Disk(read, dev_blocks, blocks)
    disk.run()
    return [Problem(m) for m in disk.res.problems]
