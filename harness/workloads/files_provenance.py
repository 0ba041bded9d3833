"""Where the bytes of a file read back corrupted came from, page by page (`files` workload).

Promises to the trial record (``evidence``, docs/RESULTS.md): a `files` client's content is
a pure function of (seed, client, file, version) (files_client.py ``content``), so every
version a client wrote can be rebuilt from the write invokes of its history: a create or
overwrite is ``content(…, version, bytes)``, an append is the client's last acknowledged
body followed by ``content(…, version, bytes − len(that body))``. A rebuilt version whose
sha256 differs from the one its invoke recorded is named unrebuilt and never matched, so a
wrong rebuild cannot explain a page. ``explain`` then labels each 4 KiB page of what the
file holds with the newest version whose bytes at that offset are the same, ``zeros`` when
none is and the page is all zero, ``none`` otherwise, and gives the labels as runs:

    holds  | p0 | p1 | p2 | p3 | p4 |        runs: [[0, 2, "v5"], [3, 4, "v4"]]
    v5     | =  | =  | =  | ≠  |    |        (a torn overwrite: v5's head, v4's tail)
    v4     | ≠  | ≠  | ≠  | =  | =  |

A page is the file system's block: a torn write, a size committed ahead of its data
(zeros) and a page from another file (none) each leave their own pattern.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from harness.checkers.common import crash_times
from harness.history import pairs
from harness.workloads.files_client import content
from kernel.param import PAGE_SIZE

KEY = re.compile(r"c(\d+)-f(\d+)\.bin")


def explain(path: Path, key: str, events: list[dict], seed: int) -> dict:
    """What ``path`` holds now, set against every version of ``key`` in ``events``."""
    try:
        body = path.read_bytes()
    except OSError as e:
        return {"error": f"reading {key} back: {e.strerror or e}"}
    versions = rebuild(key, events, seed)
    labels = page_labels(body, versions)
    when = written(key, events)
    return {
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "versions": {
            f"v{v}": {
                "bytes": len(b) if b is not None else None,
                "rebuilt": b is not None,
                **when.get(v, {}),
            }
            for v, b in versions.items()
        },
        "pages": runs(labels),
    }


def written(key: str, events: list[dict]) -> dict[int, dict]:
    """Per version: when its last attempt was sent, in seconds from the crash (negative:
    before it), and that attempt's outcome (``ok``, ``fail``, ``info``; never completed:
    ``info``)."""
    crash = crash_times(events)["crash_at"]
    out: dict[int, dict] = {}
    for inv, done in pairs(events):
        if inv["f"] == "write" and inv.get("key") == key:
            out[inv["value"]["version"]] = {
                "sent_s": None if crash is None else round(inv["time"] - crash, 4),
                "outcome": "info" if done is None else done["type"],
            }
    return out


def rebuild(key: str, events: list[dict], seed: int) -> dict[int, bytes | None]:
    """Every version of ``key`` its client sent, by number; None for one that could not be
    rebuilt (its sha256 differs from the invoke's, or the key is not a client's file)."""
    m = KEY.fullmatch(key)
    out: dict[int, bytes | None] = {}
    last_ok = b""
    for inv, done in pairs(events):
        if inv["f"] != "write" or inv.get("key") != key:
            continue
        v = inv["value"]
        body = _version(m, seed, v, last_ok) if m else None
        if body is not None and hashlib.sha256(body).hexdigest() != v["sha256"]:
            body = None
        out.setdefault(v["version"], body)
        if done is not None and done["type"] == "ok" and body is not None:
            last_ok = body
    return out


def _version(m: re.Match, seed: int, v: dict, last_ok: bytes) -> bytes | None:
    client, file = int(m.group(1)), int(m.group(2))
    if v.get("kind") == "append":
        n = v["bytes"] - len(last_ok)
        return last_ok + content(seed, client, file, v["version"], n) if n > 0 else None
    return content(seed, client, file, v["version"], v["bytes"])


def page_labels(body: bytes, versions: dict[int, bytes | None]) -> list[str]:
    """Per page of ``body``: ``v<N>`` (the newest version matching there), ``v<N>, then
    zeros`` (the page where a shorter version ends: its last bytes, then zeros — that
    version under a larger size), ``zeros``, ``none``."""
    n = len(body)
    pages = -(-n // PAGE_SIZE)
    held = _paged(np.frombuffer(body, dtype=np.uint8), pages)
    labels = np.where(~held.any(axis=1), "zeros", "none").astype(object)
    found = np.zeros(pages, dtype=bool)
    ends, starts = _page_ends(n, pages), np.arange(pages) * PAGE_SIZE
    for v in sorted((v for v, b in versions.items() if b is not None), reverse=True):
        c = np.frombuffer(versions[v], dtype=np.uint8)[:n]
        equal = (_paged(c, pages) == held).all(axis=1)  # c zero-padded beyond its end
        same = equal & (ends <= len(c))
        tail = equal & (starts < len(c)) & (ends > len(c))
        labels[same & ~found] = f"v{v}"
        labels[tail & ~found & ~same] = f"v{v}, then zeros"
        found |= same | tail
    return list(labels)


def _paged(a: np.ndarray, pages: int) -> np.ndarray:
    out = np.zeros(pages * PAGE_SIZE, dtype=np.uint8)
    out[: len(a)] = a
    return out.reshape(pages, PAGE_SIZE)


def _page_ends(n: int, pages: int) -> np.ndarray:
    """Where each page of an ``n``-byte file ends: a version must reach that far to match."""
    return np.minimum((np.arange(pages) + 1) * PAGE_SIZE, n)


def runs(labels: list[str]) -> list[list]:
    """Consecutive pages of one label as [first, last, label]."""
    out: list[list] = []
    for i, lab in enumerate(labels):
        if out and out[-1][2] == lab and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i, lab])
    return out
