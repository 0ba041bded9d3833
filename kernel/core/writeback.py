"""Write-back: dirty pages and inodes to disk, ordered before the journal commit.

Promises to the VFS: ``sync_inode`` returns only when every dirty page of the inode, its
size and times, and the journal are on the device; the flusher thread writes back inodes
dirty for longer than DIRTY_EXPIRE_S every WRITEBACK_INTERVAL_S and commits the journal at
least every COMMIT_INTERVAL_S; writers over DIRTY_RATIO write back themselves.

Blocks are allocated here (delayed allocation) — an inode's reservation (kernel/core/reserve.py)
is given back just before its blocks are allocated, so they come out of what was promised
and write-back does not run out of space —, data is written and flushed, and only then
is the transaction holding the allocation and the new size committed (ordered mode). A page
is marked clean only after that commit, so a page whose allocation is not durable yet is
still on its dirty chain for a backup kernel to find.
"""

from __future__ import annotations

import logging
import threading
import time

from kernel import param
from kernel.core.icache import BDEV_INO, F

PAGE = param.PAGE_SIZE
log = logging.getLogger(__name__)
_SIZE, _ATIME, _MTIME, _CTIME = F["size"], F["atime_ns"], F["mtime_ns"], F["ctime_ns"]


class Writeback:
    def __init__(self, vfs):
        self.vfs = vfs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"pages_written": 0, "inodes_written": 0, "commits": 0}

    # --- the flusher thread ---------------------------------------------------------------
    def start(self, interval: float = param.WRITEBACK_INTERVAL_S) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="flusher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush_expired()
            except Exception:  # the flusher must outlive one failed pass; the error is logged
                log.exception("write-back pass failed")

    def flush_expired(self, expire_s: float = param.DIRTY_EXPIRE_S) -> None:
        vfs = self.vfs
        with vfs.lock:
            now = time.monotonic_ns()
            limit = int(expire_s * 1e9)
            old = [
                i
                for i in vfs.ic.dirty_inodes()
                if i != BDEV_INO and now - vfs.ic.dirtied_ns(i) >= limit
            ]
            if old:
                self._write_inodes(old)
            else:
                vfs.fs.maybe_commit()
                vfs.bufs.settle()

    # --- synchronous entry points -------------------------------------------------------------
    def sync_inode(self, ino: int) -> None:
        with self.vfs.lock:
            self._write_inodes([ino])

    def sync_journal(self) -> None:
        vfs = self.vfs
        with vfs.lock:
            vfs.fs.commit()
            vfs.bufs.settle()
            vfs.dev.flush()

    def sync_all(self) -> None:
        vfs = self.vfs
        with vfs.lock:
            self._write_inodes([i for i in vfs.ic.dirty_inodes() if i != BDEV_INO])

    def balance(self) -> None:
        """A writer found too many dirty pages: write back the oldest inodes until half are gone."""
        vfs = self.vfs
        with vfs.lock:
            target = param.DIRTY_RATIO * vfs.pc.nframes / 2
            for ino in reversed(vfs.ic.dirty_inodes()):  # the list's tail is the oldest
                if vfs.pc.ndirty <= target:
                    break
                if ino != BDEV_INO:
                    self._write_inodes([ino])

    # --- the work ---------------------------------------------------------------------------
    def _write_inodes(self, inos: list[int]) -> None:
        vfs = self.vfs
        done = []
        promised = []
        try:
            with vfs.fs.handle():
                for ino in inos:
                    v = vfs.ic.get(ino)
                    if v is None:
                        continue
                    pages = vfs.pc.dirty_pages(ino)
                    if pages:
                        promised.append(ino)
                        vfs.resv.release(ino)
                        self._write_pages(ino, pages)
                    vfs.fs.setattr(
                        ino,
                        size=v[_SIZE],
                        atime_ns=v[_ATIME],
                        mtime_ns=v[_MTIME],
                        ctime_ns=v[_CTIME],
                    )
                    done.append((ino, pages))
                vfs.faults.at("writeback")
        except BaseException:
            for ino in promised:  # its pages are still dirty, some maybe without a block
                vfs.resv.recount(ino)
            raise
        vfs.dev.flush()  # ordered mode: data on the device before the commit
        if vfs.fs.commit() is not None:
            self.stats["commits"] += 1
        vfs.bufs.settle()
        vfs.dev.flush()
        for ino, pages in done:
            vfs.pc.mark_clean(ino, pages)
            vfs.ic.meta_clean(ino)
            self.stats["pages_written"] += len(pages)
        self.stats["inodes_written"] += len(done)

    def _write_pages(self, ino: int, pages: list[tuple[int, int, int]]) -> None:
        vfs = self.vfs
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and pages[j][0] == pages[j - 1][0] + 1:
                j += 1
            vfs.pc.check_before_writeback([f for _, f, _ in pages[i:j]])
            blocks = vfs.fs.bmap_range(ino, pages[i][0], j - i, alloc=True)
            self._write_run(
                blocks,
                [vfs.pc.frame_view(f) for _, f, _ in pages[i:j]],
                [vfs.lay.frame_phys(f) for _, f, _ in pages[i:j]],
            )
            i = j

    def _write_run(self, blocks: list[int], frames: list[memoryview], phys: list[int]) -> None:
        """Write frames to blocks, runs coalesced; ``phys`` (where each frame is) goes with
        each request, as a paravirtual disk's scatter list would (kernel/hw/vmm.py uses it)."""
        dev = self.vfs.dev
        i = 0
        most = param.WRITEBACK_RUN_BYTES // PAGE  # bounded, so no copy holds the interpreter long
        while i < len(blocks):
            j = i + 1
            while j < len(blocks) and j - i < most and blocks[j] == blocks[j - 1] + 1:
                j += 1
            dev.write(blocks[i], b"".join(frames[i:j]), phys[i:j])
            i = j
