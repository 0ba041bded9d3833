"""Acknowledged-write loss: is every write a client was told succeeded still there after
recovery?

Promises to harness/trial.py and the report (exact rules: docs/METRICS.md, "Acknowledged
writes"): every key is judged by what the verify phase read back against what the history
allows. A = the key's last acknowledged (``ok``) write. Allowed: A's content, or the content
of a later write whose outcome is unknown (``info``, or never completed) — it may have taken
effect, so finding it is not a loss. A ``fail`` write certainly did not happen and explains
nothing. Absent, or an older version → lost; content no write explains → corrupted; a key
the verify phase could not read → unverified, never silently present. A write can also be
lost and then overwritten: a load read that returned an older version (or nothing) where
only an acknowledged write or later ones were allowed proves that write undone, and it
counts as lost even if a later write replaced the content before the verify phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.checkers.common import VERIFY, is_load
from harness.history import HistoryError, pairs

PRESENT, LOST, CORRUPTED, UNVERIFIED, UNACKED = (
    "present",
    "lost",
    "corrupted",
    "unverified",
    "unacked",
)


@dataclass
class Write:
    invoked: float
    outcome: str  # "ok", "fail", "info", or "info" for an invoke never completed
    version: int | None
    bytes: int
    sha256: str


def writes(events: list[dict]) -> dict:
    """{"acked_writes", "acked_keys", "present_keys", "lost_keys", "lost_writes",
    "undone_writes", "corrupted_keys", "corrupted_writes", "lost_bytes", "unverified_keys",
    "unverified_writes", "unacked_keys", "keys": [per-key detail]}."""
    by_key = writes_by_key(events)
    seen = verified(events)
    reads = load_reads(events)
    keys = [judge(k, ws, seen.get(k), reads.get(k, [])) for k, ws in sorted(by_key.items())]
    return {**totals(keys), "acked_writes": sum(k["acked_writes"] for k in keys), "keys": keys}


def writes_by_key(events: list[dict]) -> dict[str, list[Write]]:
    """Every load write, per key, in invoke order."""
    out: dict[str, list[Write]] = {}
    for inv, done in pairs(events):
        if not (is_load(inv) and inv["f"] == "write"):
            continue
        key, v = inv.get("key"), inv.get("value")
        where = f"write by client {inv['process']} at {inv['time']}"
        if not isinstance(key, str):
            raise HistoryError(f"{where}: no key")
        if not (
            isinstance(v, dict)
            and isinstance(v.get("sha256"), str)
            and isinstance(v.get("bytes"), int)
        ):
            raise HistoryError(f"{where}: value must carry sha256 (hex) and bytes (int)")
        outcome = "info" if done is None else done["type"]
        out.setdefault(key, []).append(
            Write(float(inv["time"]), outcome, v.get("version"), v["bytes"], v["sha256"])
        )
    return out


def verified(events: list[dict]) -> dict[str, dict | None]:
    """Per key the value of its last ``ok`` verify read, or None if every attempt failed."""
    out: dict[str, dict | None] = {}
    for inv, done in pairs(events):
        if inv["f"] != VERIFY or not isinstance(inv.get("key"), str):
            continue
        key = inv["key"]
        out.setdefault(key, None)
        if done is not None and done["type"] == "ok":
            v = done.get("value")
            if not (
                isinstance(v, dict)
                and (v.get("absent") is True or isinstance(v.get("sha256"), str))
            ):
                raise HistoryError(
                    f"verify of {key} at {done['time']}: an ok value must be "
                    f'{{"absent": true}} or carry sha256'
                )
            out[key] = v
    return out


def load_reads(events: list[dict]) -> dict[str, list[tuple[float, dict]]]:
    """Per key, (invoke time, value) of every ``ok`` load read that returned a content
    digest or absence; reads that carry neither (a balance, say) say nothing here."""
    out: dict[str, list[tuple[float, dict]]] = {}
    for inv, done in pairs(events):
        if not (
            is_load(inv)
            and inv["f"] != "write"
            and isinstance(inv.get("key"), str)
            and done is not None
            and done["type"] == "ok"
        ):
            continue
        v = done.get("value")
        if isinstance(v, dict) and (v.get("absent") is True or isinstance(v.get("sha256"), str)):
            out.setdefault(inv["key"], []).append((float(inv["time"]), v))
    return out


def undone(ws: list[Write], reads: list[tuple[float, dict]]) -> list[Write]:
    """The acknowledged writes that a later read showed undone: the read returned an
    older version or nothing, where only the last write acknowledged before it was
    invoked, or a later write of unknown outcome, was allowed. Content no write explains
    proves nothing lost here (the verify phase judges corruption)."""
    out: list[Write] = []
    for t, v in reads:
        acked = [w for w in ws if w.outcome == "ok" and w.invoked < t]
        if not acked:
            continue
        before = [w for w in ws if w.invoked < t]
        found = None if v.get("absent") else v["sha256"]
        if found is not None and found in allowed(before, acked[-1]):
            continue
        match = newest_possible(before, found)
        if found is not None and match is None and v.get("bytes") != 0:
            continue
        since = match.invoked if match is not None else float("-inf")
        out += [w for w in acked if w.invoked > since and w.sha256 != found and w not in out]
    return out


def judge(
    key: str, ws: list[Write], seen: dict | None, reads: list[tuple[float, dict]] = ()
) -> dict:
    """One key's verdict: status, acknowledged and lost writes (lost in the verify phase,
    or undone as a load read saw), lost bytes, and which version was found (None when
    absent or unexplained)."""
    d = _judge_final(key, ws, seen)
    lost = d.pop("lost")
    gone = [w for w in undone(ws, list(reads)) if w not in lost]
    return {
        **d,
        "undone_writes": len(gone),
        "lost_writes": d["lost_writes"] + len(gone),
        "lost_bytes": d["lost_bytes"] + sum(w.bytes for w in gone),
    }


def _judge_final(key: str, ws: list[Write], seen: dict | None) -> dict:
    """The verdict on what the verify phase read; ``lost``: the writes it shows lost."""
    acked = [w for w in ws if w.outcome == "ok"]
    detail = {
        "key": key,
        "acked_writes": len(acked),
        "lost_writes": 0,
        "lost_bytes": 0,
        "found_version": None,
        "lost": [],
    }
    found = None if seen is None or seen.get("absent") else seen["sha256"]
    match = newest_possible(ws, found)
    if match is None and seen is not None and seen.get("bytes") == 0:
        found = None  # an empty file no write explains: its data never reached the disk
    if match is not None:
        detail["found_version"] = match.version
    if seen is None:
        return {**detail, "status": UNVERIFIED if acked else UNACKED}
    if not acked:
        # Nothing was promised, but content no write explains is still corruption.
        unexplained = found is not None and match is None
        return {**detail, "status": CORRUPTED if unexplained else UNACKED}
    last = acked[-1]
    if found is not None and found in allowed(ws, last):
        return {**detail, "status": PRESENT}
    if found is not None and match is None:
        return {**detail, "status": CORRUPTED, "lost_bytes": last.bytes}
    since = match.invoked if match is not None else float("-inf")
    lost = [w for w in acked if w.invoked > since and w.sha256 != found]
    return {
        **detail,
        "status": LOST,
        "lost_writes": len(lost),
        "lost_bytes": last.bytes,
        "lost": lost,
    }


def allowed(ws: list[Write], last_acked: Write) -> set[str]:
    """The acceptable final contents: the last acknowledged write's, and those of later
    writes whose outcome is unknown."""
    later = {w.sha256 for w in ws if w.invoked > last_acked.invoked and w.outcome == "info"}
    return {last_acked.sha256} | later


def newest_possible(ws: list[Write], sha256: str | None) -> Write | None:
    """The newest write with this content that may have happened (not ``fail``)."""
    if sha256 is None:
        return None
    return next((w for w in reversed(ws) if w.sha256 == sha256 and w.outcome != "fail"), None)


def totals(keys: list[dict]) -> dict:
    def count(status: str) -> int:
        return sum(k["status"] == status for k in keys)

    acked_corrupted = [k for k in keys if k["status"] == CORRUPTED and k["acked_writes"]]
    return {
        "acked_keys": sum(k["acked_writes"] > 0 for k in keys),
        "present_keys": count(PRESENT),
        "lost_keys": count(LOST),
        "lost_writes": sum(k["lost_writes"] for k in keys),
        "undone_writes": sum(k["undone_writes"] for k in keys),
        "corrupted_keys": count(CORRUPTED),
        "corrupted_writes": len(acked_corrupted),
        "lost_bytes": sum(k["lost_bytes"] for k in keys),
        "unverified_keys": count(UNVERIFIED),
        "unverified_writes": sum(k["acked_writes"] for k in keys if k["status"] == UNVERIFIED),
        "unacked_keys": count(UNACKED),
    }
