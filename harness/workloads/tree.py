"""A tree of static files for a workload to serve: what `http` and `files` (read-mostly)
read.

Promises to those workloads and their clients: ``write_tree(root, seed, total)`` writes
files of a web-like size mix (60 % 1–16 KiB, 30 % 16–256 KiB, 10 % 256 KiB–4 MiB,
log-uniform within each class), FILES_PER_DIR to a directory, until their sizes sum to
``total`` bytes, and returns the manifest: one ``{path, bytes, sha256}`` per file, in
order, paths relative to ``root`` with a leading '/'. Content is a pure function of
(seed, file number), so every byte served can be checked against the manifest.
``pages(manifest)`` is how many page-cache pages the tree fills.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from kernel.param import PAGE_SIZE

KIB = 1024
SIZE_CLASSES = ((0.6, 1 * KIB, 16 * KIB), (0.3, 16 * KIB, 256 * KIB), (0.1, 256 * KIB, 4096 * KIB))
FILES_PER_DIR = 100


def file_sizes(seed: int, total: int) -> list[int]:
    """Sizes of the tree's files, in order, until their sum reaches `total` bytes."""
    rng = np.random.default_rng([seed, 80])
    p = np.array([c[0] for c in SIZE_CLASSES])
    sizes: list[int] = []
    left = total
    while left > 0:
        _, lo, hi = SIZE_CLASSES[int(rng.choice(len(SIZE_CLASSES), p=p))]
        n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        n = min(n, left)
        sizes.append(n)
        left -= n
    return sizes


def content(seed: int, i: int, n: int) -> bytes:
    return np.random.default_rng([seed, 81, i]).bytes(n)


def file_path(i: int) -> str:
    return f"/d{i // FILES_PER_DIR:03d}/f{i:05d}.bin"


def write_tree(root: Path, seed: int, total: int) -> list[dict]:
    """The files under ``root`` (made, mode 755; files 644, readable by a server running
    as another user); the manifest."""
    root.mkdir(mode=0o755)
    files = []
    for i, n in enumerate(file_sizes(seed, total)):
        rel = file_path(i)
        path = root / rel.lstrip("/")
        if i % FILES_PER_DIR == 0:
            path.parent.mkdir(mode=0o755)
        body = content(seed, i, n)
        path.write_bytes(body)
        os.chmod(path, 0o644)
        files.append({"path": rel, "bytes": n, "sha256": hashlib.sha256(body).hexdigest()})
    return files


def pages(manifest: list[dict]) -> int:
    """Page-cache pages the files of ``manifest`` fill when each is cached whole."""
    return sum(-(-f["bytes"] // PAGE_SIZE) for f in manifest)
