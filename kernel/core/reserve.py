"""Delayed-allocation reservations: every dirty page without a disk block has one promised.

Promises to the VFS (kernel/core/vfs.py) and write-back (kernel/core/writeback.py), as ext4's
delayed-allocation reservation does:

* ``for_write`` promises, before a byte of a write is applied, a block for every page of
  it that is not dirty yet and has no block, and the indirect blocks those pages may need
  (every node on their paths the block map lacks and the inode was not promised yet). If the
  device cannot keep the promise it raises ENOSPC and nothing is promised. An overwrite of
  pages that have a block, or are dirty already, needs no promise and always succeeds;
* the promises live in the block allocator's ``reserved`` count (kernel/core/balloc.py), so no
  other allocation (mkdir, a growing directory) takes a promised block and statfs reports
  free space net of them;
* ``release`` gives back an inode's promises; write-back calls it just before it allocates
  the inode's blocks, and the VFS when the inode's pages go away. ``recount`` makes an
  inode's promise exact again from its dirty pages (after a truncate, a failed write-back);
* ``adopt`` promises blocks for a dead kernel's dirty pages taken over (systems/orthros)
  without a look at the block map — every adopted dirty page as if it had no block, a
  bound cheap to compute during the outage — and, if a write would then fail, the adopted
  inodes are recounted exactly first. Promises for acknowledged pages are kept even past
  the free space; the excess is counted in ``stats["overcommitted"]`` and logged.

The state is in-memory only: a kernel that adopts pages computes it again from the pages.
"""

from __future__ import annotations

import logging

import numpy as np

from kernel import param
from kernel.core.disklayout import NPTR, FsError

PAGE = param.PAGE_SIZE
ND = param.NDIRECT
log = logging.getLogger(__name__)


def _page_keys(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which page, key) of every indirect block on the paths of file pages idx: 4k+1 is
    leaf k (each leaf maps NPTR pages from page ND on), 4k+2 a node above leaves (the
    double-indirect root, k = 0, or a child of the triple-indirect root), 3 the
    triple-indirect root."""
    rel = np.asarray(idx, np.int64) - ND
    at = np.arange(rel.size)
    one, two = rel >= 0, rel >= NPTR
    three = rel >= NPTR + NPTR**2
    return (
        np.concatenate([at[one], at[two], at[three]]),
        np.concatenate(
            [
                rel[one] // NPTR * 4 + 1,
                (rel[two] - NPTR) // NPTR**2 * 4 + 2,
                np.full(int(three.sum()), 3, np.int64),
            ]
        ),
    )


def node_keys(idx: np.ndarray) -> np.ndarray:
    """The distinct keys of the indirect blocks on the paths of file pages idx."""
    return np.unique(_page_keys(idx)[1])


def _node_rows(ino: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The distinct (inode << 32 | node key) on the paths of pages (ino[k], idx[k]). Every
    page of a leaf has the nodes of the leaf's first page, so one pass over the pages finds
    the distinct (inode, leaf) pairs and only those go through ``_page_keys``; distinct by a
    sort and a neighbour compare, which np.unique took several times longer to do (the
    32,768 dirty pages of `crashbench bench failover`: 6.4 ms as keys of every page, 0.6 ms so)."""
    beyond = idx >= ND
    leaves = np.sort(ino[beyond] << 32 | (idx[beyond] - ND) // NPTR)
    leaves = leaves[np.r_[True, leaves[1:] != leaves[:-1]]] if leaves.size else leaves
    at, keys = _page_keys(ND + (leaves & 0xFFFF_FFFF) * NPTR)
    return np.unique((leaves >> 32)[at] << 32 | keys)


def _runs(idx: list[int]):
    """(first, count) of each run of consecutive page indexes (sorted)."""
    i = 0
    while i < len(idx):
        j = i + 1
        while j < len(idx) and idx[j] == idx[j - 1] + 1:
            j += 1
        yield idx[i], j - i
        i = j


class Reservations:
    def __init__(self, fs, pc):
        self.fs, self.pc = fs, pc
        self.ba = fs.balloc
        self.pages: dict[int, int] = {}  # ino -> its dirty pages promised a block
        self.meta: dict[int, int] = {}  # ino -> indirect blocks promised
        self.nodes: dict[int, set[int]] = {}  # ino -> node keys promised or found mapped
        self.adopted: set[int] = set()  # inodes whose promise is adoption's bound
        self.stats = {"enospc": 0, "overcommitted": 0, "recounts": 0}

    def held(self, ino: int) -> int:
        return self.pages.get(ino, 0) + self.meta.get(ino, 0)

    def tracks(self, ino: int) -> bool:
        return ino in self.pages or ino in self.nodes

    # --- writes ------------------------------------------------------------------------
    def for_write(self, ino: int, first: int, last: int, size: int) -> None:
        """Promise blocks for pages first..last of a write to an inode of in-core ``size``."""
        eof = -(-size // PAGE)  # no page from here on has a block or is dirty
        d = self.pc.dirty.get(ino, ())
        inside = [i for i in range(first, min(last + 1, eof)) if i not in d]
        holes = self._holes(ino, inside) if inside else []
        beyond = max(first, eof)
        want = len(holes) + max(0, last + 1 - beyond)
        if not want:
            return
        new, mapped = self._new_nodes(ino, holes, beyond, last) if last >= ND else ((), ())
        need = want + len(new) - len(mapped)
        try:
            self.ba.reserve(need)
        except FsError:
            if not self.adopted:
                self.stats["enospc"] += 1
                raise
            for a in list(self.adopted):  # adoption's bound may be loose: make it exact
                self.recount(a)
            try:
                self.ba.reserve(need)
            except FsError:
                self.stats["enospc"] += 1
                raise
        self.pages[ino] = self.pages.get(ino, 0) + want
        if new:
            self.meta[ino] = self.meta.get(ino, 0) + len(new) - len(mapped)
            self.nodes.setdefault(ino, set()).update(new)

    def _new_nodes(
        self, ino: int, holes: list[int], beyond: int, last: int
    ) -> tuple[set[int], set[int]]:
        """The node keys on the paths of pages ``holes`` and beyond..last that the inode was
        not promised yet, and those of them the block map has. Only for a write that
        reaches past the direct pointers: the small-file path needs no numpy call."""
        keys = node_keys(
            np.concatenate([np.array(holes, np.int64), np.arange(beyond, last + 1, dtype=np.int64)])
        )
        have = self.nodes.get(ino, set())
        new = {k for k in keys.tolist() if k not in have}
        return new, (self._mapped(ino, new) if new else set())

    def _mapped(self, ino: int, keys: set[int]) -> set[int]:
        """Those of node keys that the block map has: for each leaf it has, the leaf and
        the nodes above it (a worst case costs a full device its last blocks)."""
        out: set[int] = set()
        for k in sorted(keys):
            if k % 4 == 1 and k not in out:
                first = ND + k // 4 * NPTR
                if self.fs.has_leaf(ino, first):
                    out.update(node_keys(np.array([first])).tolist())
        return out & keys

    def _holes(self, ino: int, idx: list[int]) -> list[int]:
        """Those of pages idx (sorted) that have no disk block."""
        out = []
        for f, n in _runs(idx):
            blocks = self.fs.bmap_range(ino, f, n)
            out += [f + k for k, b in enumerate(blocks) if not b]
        return out

    # --- giving back -------------------------------------------------------------------
    def release(self, ino: int) -> None:
        n = self.pages.pop(ino, 0) + self.meta.pop(ino, 0)
        self.nodes.pop(ino, None)
        self.adopted.discard(ino)
        if n:
            self.ba.unreserve(n)

    def recount(self, ino: int) -> None:
        """Promise exactly what the inode's dirty pages without a block need."""
        had = self.held(ino)
        self.release(ino)
        idx = [i for i, _, _ in self.pc.dirty_pages(ino)]
        if not idx:
            return
        self.stats["recounts"] += 1
        try:
            holes = self._holes(ino, idx)
        except OSError:  # the file system cannot tell: every page, then
            holes = idx
        if holes:
            keys = set(node_keys(np.array(holes, np.int64)).tolist())
            self._keep(len(holes) + len(keys), had, f"inode {ino}")
            self.pages[ino], self.meta[ino], self.nodes[ino] = len(holes), len(keys), keys

    def _keep(self, n: int, had: int, what: str) -> None:
        over = self.ba.reserve(n, force=True)
        if over:
            self.stats["overcommitted"] += over
            log.warning(
                "%s: %d dirty-page blocks promised beyond the free space (promised before: %d)",
                what,
                over,
                had,
            )

    # --- a takeover --------------------------------------------------------------------
    def adopt(self, ino: np.ndarray, idx: np.ndarray) -> None:
        """Promise blocks for a dead kernel's dirty pages (ino[k], idx[k]): each as if it
        had no block, plus the nodes on their paths. Bulk numpy work: this runs in the outage."""
        if not len(ino):
            return
        ino = np.asarray(ino, np.int64)
        inos, pages = np.unique(ino, return_counts=True)
        rows = _node_rows(ino, np.asarray(idx, np.int64))
        extra = dict(zip(*(a.tolist() for a in np.unique(rows >> 32, return_counts=True))))
        total = int(pages.sum()) + sum(extra.values())
        self._keep(total, 0, "adopted dirty pages")
        for i, n in zip(inos.tolist(), pages.tolist()):
            self.pages[i] = self.pages.get(i, 0) + n
            self.meta[i] = self.meta.get(i, 0) + extra.get(i, 0)
            self.adopted.add(i)
