"""`crashbench bench fs`: file-system speed through the emulated kernel's FUSE mount.

Each figure is measured in the same run beside the same work on a tmpfs directory, and is
reported as a ratio to it, because these machines are shared and noisy. Every duration is
a monotonic clock around the real work.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


@dataclass
class Figure:
    name: str
    unit: str
    mount: list[float]
    tmpfs: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.mount) / statistics.median(self.tmpfs)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "unit": self.unit,
            "mount_median": statistics.median(self.mount),
            "tmpfs_median": statistics.median(self.tmpfs),
            "ratio_to_tmpfs": self.ratio,
            "mount_runs": self.mount,
            "tmpfs_runs": self.tmpfs,
        }


def seq_write(d: Path, nbytes: int) -> float:
    buf = os.urandom(CHUNK)
    p = d / "seq.bin"
    t0 = time.perf_counter()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(nbytes // CHUNK):
            os.write(fd, buf)
    finally:
        os.close(fd)
    return nbytes / (time.perf_counter() - t0) / 1e6


def seq_read(d: Path, nbytes: int) -> float:
    p = d / "seq.bin"
    t0 = time.perf_counter()
    fd = os.open(p, os.O_RDONLY)
    got = 0
    try:
        while True:
            b = os.read(fd, CHUNK)
            if not b:
                break
            got += len(b)
    finally:
        os.close(fd)
    if got != nbytes:
        raise RuntimeError(f"read back {got} bytes of {nbytes}")
    return got / (time.perf_counter() - t0) / 1e6


def creates(d: Path, n: int, run: int) -> float:
    sub = d / f"small-{run}"
    sub.mkdir()
    payload = b"x" * 1024
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(sub / f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return n / (time.perf_counter() - t0)


def run_all(mount: Path, *, mib: int, files: int, runs: int, progress=None) -> list[Figure]:
    tmp = Path(tempfile.mkdtemp(prefix="crashbench-tmpfs-", dir="/dev/shm"))
    figs = [
        Figure("sequential write", "MB/s", [], []),
        Figure("cached sequential read", "MB/s", [], []),
        Figure("small-file creates", "files/s", [], []),
    ]
    nbytes = mib * CHUNK
    try:
        for r in range(runs):
            for where, d in (("mount", mount), ("tmpfs", tmp)):
                getattr(figs[0], where).append(seq_write(d, nbytes))
                seq_read(d, nbytes)  # the first read fills the cache on both sides
                getattr(figs[1], where).append(seq_read(d, nbytes))
                getattr(figs[2], where).append(creates(d, files, r))
            if progress:
                progress(r + 1, runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return figs
