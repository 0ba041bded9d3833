"""Metadata buffers: how the file system reads and modifies its metadata blocks.

Promises between the file system (kernel/core/fs.py) and whoever keeps its metadata in memory:

* the superblock, inode table, bitmap, indirect, directory and symlink blocks are read and
  modified ONLY through a MetaBuffers object; there is no writable view, so an
  implementation can route every store through one accessor (the kernel's PageCacheBuffers
  in kernel/core/bufcache.py keeps them in page frames of physical memory);
* ``read`` returns the current contents (loaded from the device on a miss); callers copy
  what they keep and never write into the view;
* ``write`` modifies a block; the block joins the running journal transaction, and
  ``take_dirty`` hands the journal a snapshot of every block written since the last take;
* optional ``settle()``: if the implementation has it, the file system calls it right
  after the journal committed the blocks of the last ``take_dirty`` (an implementation
  that keeps them marked dirty until they are journaled, like PageCacheBuffers, marks them
  clean there; ``ndirty`` should not count them afterwards);
* ``end_op()``: the file-system operation that wrote blocks since the last ``end_op`` or
  ``take_dirty`` is complete (an implementation that keeps an undo record of the
  operation in progress, like PageCacheBuffers, drops it here);
* a block once read stays until ``forget`` (the block was freed): the journal checkpoints
  from its own copies, so the device's home copy may be older than the buffer until then;
  an implementation must never evict a block and re-read it from the device while the
  file system is mounted.

``MemBuffers`` is the plain in-memory implementation used by mkfs, fsck tools and tests.
"""

from __future__ import annotations

from typing import Protocol


class MetaBuffers(Protocol):
    def read(self, blockno: int) -> memoryview: ...
    def write(self, blockno: int, offset: int, data) -> None: ...
    def take_dirty(self) -> dict[int, bytes]: ...
    def forget(self, blockno: int) -> None: ...
    def ndirty(self) -> int: ...
    def end_op(self) -> None: ...


class MemBuffers:
    """MetaBuffers in a dict of bytearrays, loaded from `dev` on a miss."""

    def __init__(self, dev):
        self.dev = dev
        self.blocks: dict[int, bytearray] = {}
        self.dirty: set[int] = set()

    def _get(self, blockno: int) -> bytearray:
        b = self.blocks.get(blockno)
        if b is None:
            b = self.blocks[blockno] = bytearray(self.dev.read(blockno))
        return b

    def read(self, blockno: int) -> memoryview:
        return memoryview(self._get(blockno)).toreadonly()

    def write(self, blockno: int, offset: int, data) -> None:
        b = self._get(blockno)
        mv = memoryview(data).cast("B")
        if offset < 0 or offset + mv.nbytes > len(b):
            raise ValueError(
                f"write of {mv.nbytes} bytes at offset {offset} outside block {blockno}"
            )
        b[offset : offset + mv.nbytes] = mv
        self.dirty.add(blockno)

    def take_dirty(self) -> dict[int, bytes]:
        out = {b: bytes(self.blocks[b]) for b in self.dirty}
        self.dirty.clear()
        return out

    def forget(self, blockno: int) -> None:
        self.blocks.pop(blockno, None)
        self.dirty.discard(blockno)

    def ndirty(self) -> int:
        return len(self.dirty)

    def end_op(self) -> None:
        pass
