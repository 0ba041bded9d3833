"""The block device: a disk image file behind a device model.

Promises to the file system, the journal and the page cache (and to recovery schemes, which
take a dead kernel's disk over):

* blocks of BLOCK_SIZE bytes, numbered 0 .. nblocks-1 (the image's size, rounded down);
  ``read(b, n)`` returns n blocks, ``write(b, data)`` writes len(data)/BLOCK_SIZE blocks;
  a block number outside the device raises DeviceError
  "<image>: block <b> out of range (device has <n> blocks)";
* ``flush()`` is a barrier: every write issued before it is durable when it returns.
  Without a write cache (the default) a write goes to the image with pwrite, so it survives
  the death of this process once it returns, and flush only costs its modeled time. With
  ``write_cache=True`` writes sit in a volatile cache (reads see them) until flush() writes
  them out; ``crash()`` drops them: a power loss for crash-consistency tests. ``close()``
  writes the cache out, as a disk does on an orderly shutdown. Durability against a crash
  of the *host* is out of scope (flush does not fsync the image unless FSYNC_ON_FLUSH);
* ownership is exclusive: with ``exclusive=True`` (default) the image is locked with
  flock(LOCK_EX|LOCK_NB); a second open fails with DeviceError
  "<image>: owned by another kernel (exclusive lock held)". The lock belongs to the open
  file, so it vanishes with a dead kernel process: that is the fencing signal a backup
  kernel waits for before it takes the disk;
* modeled time: each request costs the model's latency + bytes/bandwidth
  (param.DEVICE_MODELS by name, or ``timing`` = (latency, bandwidth) of a model the
  machine description defines, kernel/hw/machine.py; bandwidth 0 = unlimited), a flush FLUSH_LATENCY_FACTOR latencies;
  requests queue one at a time (a request starts when the previous one's modeled completion
  time has passed). The modeled time is summed in ``stats["modeled_s"]`` — callers report
  it as *modeled* — and, with ``delay=True``, the call really returns at its modeled
  completion time (sleep for the long part, spin for the last SPIN_S). ``delay=False``
  only accounts. Model "none" costs nothing;
* ``write(b, data, src)``: ``src`` may name the physical address of the page each block was
  taken from (a paravirtual request's scatter list). The device ignores it; a VMM beneath
  the kernel (kernel/hw/vmm.py) learns from it which frame now matches which block.
* ``before_write`` (None unless set): called before every write is issued, the output
  commit point of a kernel whose requests are transactions (systems/txipc_sim): what the
  disk is about to see can no longer be rolled back in memory.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from typing import Callable

from kernel import param

BSIZE = param.BLOCK_SIZE
SPIN_S = 100e-6  # the last stretch of a modeled wait is spun, not slept (sleep overshoots)
FSYNC_ON_FLUSH = False  # tunable candidate: also fdatasync the host image on flush()


class DeviceError(OSError):
    """A request the device cannot serve: out of range, misaligned, not ours, closed."""


class BlockDevice:
    def __init__(
        self,
        path: str,
        model: str = param.DEFAULT_DEVICE_MODEL,
        *,
        write_cache: bool = False,
        delay: bool = True,
        exclusive: bool = True,
        timing: tuple[float, float] | None = None,
    ):
        if timing is None:
            if model not in param.DEVICE_MODELS:
                raise ValueError(
                    f"unknown device model {model!r} (known: {', '.join(param.DEVICE_MODELS)})"
                )
            timing = param.DEVICE_MODELS[model]
        self.path, self.model = str(path), model
        self.write_cache, self.delay = write_cache, delay
        self.latency, self.bandwidth = timing
        self.fd = os.open(self.path, os.O_RDWR)
        if exclusive:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.fd = -1
                raise DeviceError(
                    errno.EBUSY, f"{self.path}: owned by another kernel (exclusive lock held)"
                ) from None
        self.nblocks = os.fstat(self.fd).st_size // BSIZE
        self.before_write: Callable[[], None] | None = None
        self._cache: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._busy_until = 0.0
        self.stats = {
            "requests": 0,
            "bytes_read": 0,
            "bytes_written": 0,
            "flushes": 0,
            "modeled_s": 0.0,
        }

    # --- the model ------------------------------------------------------------------------
    def _charge(
        self, cost: float, *, nbytes_read: int = 0, nbytes_written: int = 0, flush: bool = False
    ) -> None:
        with self._lock:
            st = self.stats
            if flush:
                st["flushes"] += 1
            else:
                st["requests"] += 1
            st["bytes_read"] += nbytes_read
            st["bytes_written"] += nbytes_written
            st["modeled_s"] += cost
            if cost <= 0.0:
                return
            now = time.perf_counter()
            done = max(now, self._busy_until) + cost
            self._busy_until = done
        if self.delay:
            _wait_until(done)

    def _cost(self, nbytes: int) -> float:
        return self.latency + (nbytes / self.bandwidth if self.bandwidth else 0.0)

    def _check(self, blockno: int, count: int) -> None:
        if self.fd < 0:
            raise DeviceError(errno.EBADF, f"{self.path}: device is closed")
        if count < 1 or blockno < 0 or blockno + count > self.nblocks:
            bad = blockno if blockno < 0 or blockno >= self.nblocks else blockno + count - 1
            raise DeviceError(
                errno.EIO,
                f"{self.path}: block {bad} out of range (device has {self.nblocks} blocks)",
            )

    # --- requests ---------------------------------------------------------------------------
    def read(self, blockno: int, count: int = 1) -> bytes:
        self._check(blockno, count)
        n = count * BSIZE
        data = os.pread(self.fd, n, blockno * BSIZE)
        if len(data) < n:  # the image shrank under us: what is missing reads as zeros
            data += bytes(n - len(data))
        if self._cache:
            hits = (
                [b for b in range(blockno, blockno + count) if b in self._cache]
                if count <= len(self._cache)
                else [b for b in self._cache if blockno <= b < blockno + count]
            )
            if hits:
                buf = bytearray(data)
                for b in hits:
                    o = (b - blockno) * BSIZE
                    buf[o : o + BSIZE] = self._cache[b]
                data = bytes(buf)
        self._charge(self._cost(n), nbytes_read=n)
        return data

    def write(self, blockno: int, data, src: list[int] | None = None) -> None:
        if self.before_write is not None:
            self.before_write()
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if n == 0 or n % BSIZE:
            raise DeviceError(
                errno.EINVAL,
                f"{self.path}: write of {n} bytes at block {blockno}: "
                f"not a positive multiple of {BSIZE}",
            )
        count = n // BSIZE
        self._check(blockno, count)
        if self.write_cache:
            for i in range(count):
                self._cache[blockno + i] = bytes(mv[i * BSIZE : (i + 1) * BSIZE])
        else:
            _pwrite_all(self.fd, mv, blockno * BSIZE)
        self._charge(self._cost(n), nbytes_written=n)

    def flush(self) -> None:
        if self.fd < 0:
            raise DeviceError(errno.EBADF, f"{self.path}: device is closed")
        self._write_out()
        if FSYNC_ON_FLUSH:
            os.fdatasync(self.fd)
        self._charge(param.FLUSH_LATENCY_FACTOR * self.latency, flush=True)

    def _write_out(self) -> None:
        """Write the volatile cache to the image, in block order, runs coalesced."""
        if not self._cache:
            return
        blocks = sorted(self._cache)
        i = 0
        while i < len(blocks):
            j = i + 1
            while j < len(blocks) and blocks[j] == blocks[j - 1] + 1:
                j += 1
            _pwrite_all(self.fd, b"".join(self._cache[b] for b in blocks[i:j]), blocks[i] * BSIZE)
            i = j
        self._cache.clear()

    def crash(self) -> None:
        """Power loss: every write not yet flushed is gone (only with write_cache)."""
        self._cache.clear()

    @property
    def unflushed(self) -> int:
        """Blocks in the volatile write cache."""
        return len(self._cache)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self._write_out()
            finally:
                os.close(self.fd)  # releases the flock
                self.fd = -1

    def __enter__(self) -> "BlockDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BlockDevice({self.path!r}, {self.model!r}, nblocks={self.nblocks})"


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data)
    while mv.nbytes:
        n = os.pwrite(fd, mv, offset)
        mv, offset = mv[n:], offset + n


def _wait_until(deadline: float) -> None:
    """Return at `deadline` (perf_counter): sleep for most of it, spin for the last SPIN_S."""
    left = deadline - time.perf_counter()
    if left > SPIN_S:
        time.sleep(left - SPIN_S)
    while time.perf_counter() < deadline:
        pass
