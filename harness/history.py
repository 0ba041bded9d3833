"""Histories: what every client did, as events, one JSON object per line (Jepsen's model).

Promises to the workloads (writers) and the checkers (readers):

* An operation is an ``invoke`` event followed by exactly one completion by the same
  process: ``ok`` (it happened), ``fail`` (it certainly did not happen: e.g. the connection
  was refused, so nothing was sent) or ``info`` (indeterminate: it timed out, or was in
  flight when the server died; it may or may not have taken effect). An invoke with no
  completion (the client was stopped) reads as ``info``.
* Every event carries ``type``, ``process`` (the client id; ``"nemesis"`` for the driver's
  fault injection), ``f`` (the operation), ``time`` (CLOCK_MONOTONIC seconds, one clock for
  every process on the machine) and may carry ``key``, ``value`` and ``error``.
* Writers record and compute nothing: a write's ``value`` says what was sent (version,
  byte count, sha256 of the body), a read's ``value`` what came back.
* The nemesis records the fault as ``invoke``/``info`` of f ``crash`` (the invoke is the
  moment of injection), the moment the fault took effect as ``info`` of f ``activated``
  (the dying kernel's own record; the crash time the checkers use when present) and the
  scheme's end of recovery as ``info`` of f ``recovered``.

Event shapes (the ``files`` workload; other workloads use the same envelope)::

    {"type":"invoke","process":3,"f":"write","key":"c3/f7","value":{"version":4,"bytes":8192,
     "sha256":"..."},"time":1234.5678}
    {"type":"ok","process":3,"f":"write","key":"c3/f7","value":{...same...},"time":1234.5702}
    {"type":"invoke","process":"nemesis","f":"crash","value":{"fault":"panic"},"time":...}
    {"type":"ok","process":0,"f":"verify","key":"c3/f7","value":{"bytes":8192,"sha256":"..."}}
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TYPES = ("invoke", "ok", "fail", "info")
NEMESIS = "nemesis"


class HistoryError(ValueError):
    """A history file or event that breaks the format above."""


def event(
    type: str,
    process,
    f: str,
    *,
    key: str | None = None,
    value: Any = None,
    error: str | None = None,
    time_s: float | None = None,
) -> dict:
    e: dict[str, Any] = {
        "type": type,
        "process": process,
        "f": f,
        "time": time.monotonic() if time_s is None else time_s,
    }
    if key is not None:
        e["key"] = key
    if value is not None:
        e["value"] = value
    if error is not None:
        e["error"] = error
    return check_event(e)


def check_event(e: dict, where: str = "event") -> dict:
    if not isinstance(e, dict):
        raise HistoryError(f"{where}: not a JSON object")
    if e.get("type") not in TYPES:
        raise HistoryError(f"{where}: type {e.get('type')!r} is not one of {', '.join(TYPES)}")
    if not isinstance(e.get("f"), str) or not e["f"]:
        raise HistoryError(f"{where}: f must be a non-empty string")
    p = e.get("process")
    if not (p == NEMESIS or (isinstance(p, int) and not isinstance(p, bool) and p >= 0)):
        raise HistoryError(f"{where}: process {p!r} must be a client number >= 0 or {NEMESIS!r}")
    t = e.get("time")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or t != t or t < 0:
        raise HistoryError(f"{where}: time {t!r} must be a non-negative number of seconds")
    return e


class Recorder:
    """Appends events to one JSONL file, line-buffered so that a killed client loses at
    most the line it was writing; the driver merges the files of all clients."""

    def __init__(self, path: str | Path, process):
        self.process = process
        self._fh = open(path, "a", buffering=1)

    def invoke(self, f: str, key: str | None = None, value: Any = None) -> dict:
        return self.write(event("invoke", self.process, f, key=key, value=value))

    def complete(self, type: str, op: dict, value: Any = None, error: str | None = None) -> dict:
        v = op.get("value") if value is None else value
        return self.write(
            event(type, self.process, op["f"], key=op.get("key"), value=v, error=error)
        )

    def write(self, e: dict) -> dict:
        self._fh.write(json.dumps(e, separators=(",", ":")) + "\n")
        return e

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read(path: str | Path) -> list[dict]:
    """Events of one JSONL history, in file order; a torn last line (a client killed while
    writing) is dropped, any other bad line is an error naming its line number."""
    out: list[dict] = []
    with open(path) as fh:
        lines = fh.read().split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) or (n == len(lines) - 1 and not lines[-1]):
                break
            raise HistoryError(f"{path}:{n}: not JSON") from None
        out.append(check_event(e, f"{path}:{n}"))
    return out


def merge(paths: Iterable[str | Path], out: str | Path) -> list[dict]:
    """Merge per-process histories into one, ordered by time (stable per process)."""
    events = [e for p in paths if os.path.exists(p) for e in read(p)]
    events.sort(key=lambda e: e["time"])
    write(events, out)
    return events


def write(events: Iterable[dict], out: str | Path) -> None:
    tmp = f"{out}.tmp"
    with open(tmp, "w") as fh:
        for e in events:
            fh.write(json.dumps(e, separators=(",", ":")) + "\n")
    os.replace(tmp, out)


def pairs(events: Iterable[dict]) -> Iterator[tuple[dict, dict | None]]:
    """(invoke, completion) per operation, in invoke order; completion None when the
    process never completed it (stopped mid-operation: indeterminate, like ``info``)."""
    open_ops: dict[Any, dict] = {}
    done: list[tuple[dict, dict | None]] = []
    for e in events:
        p = e["process"]
        if e["type"] == "invoke":
            if p in open_ops:
                done.append((open_ops.pop(p), None))
            open_ops[p] = e
        elif p in open_ops:
            done.append((open_ops.pop(p), e))
    done.extend((inv, None) for inv in open_ops.values())
    done.sort(key=lambda pair: pair[0]["time"])
    return iter(done)
