"""Served bodies: was every body a server answered with byte-identical to the file asked for?

Promises to harness/trial.py and the report (the history's shapes:
harness/workloads/http_client.py): a read's invoke carries what was asked for (the file's
``bytes`` and ``sha256`` as prepared), its ``ok`` what was served (``bytes``, ``sha256``).
Every ``ok`` read of the load and of the verify phase whose invoke names a digest is
compared; a body that differs is counted and its key listed (the first 20). A file the
verify phase never got a 200 for is ``unverified``.
"""

from __future__ import annotations

from harness.checkers.common import VERIFY, is_load
from harness.history import pairs


def bodies(events: list[dict]) -> dict:
    """{"served", "identical", "mismatched", "mismatched_keys", "verified_files",
    "verify_mismatched", "unverified_files", "ok"}."""
    served = identical = 0
    bad: list[str] = []
    files: dict[str, bool | None] = {}  # verify: key -> identical, None if never answered
    for inv, done in pairs(events):
        want = inv.get("value")
        if not (isinstance(want, dict) and isinstance(want.get("sha256"), str)):
            continue
        load = is_load(inv) and inv["f"] == "read"
        if inv["f"] == VERIFY:
            files.setdefault(inv["key"], None)
        elif not load:
            continue
        if done is None or done["type"] != "ok":
            continue
        got = done.get("value") or {}
        same = got.get("sha256") == want["sha256"] and got.get("bytes") == want.get("bytes")
        if load:
            served += 1
            identical += same
        else:
            files[inv["key"]] = same
        if not same and len(bad) < 20:
            bad.append(inv["key"])
    verify_bad = sum(v is False for v in files.values())
    unverified = sum(v is None for v in files.values())
    return {
        "served": served,
        "identical": identical,
        "mismatched": served - identical,
        "mismatched_keys": bad,
        "verified_files": sum(v is True for v in files.values()),
        "verify_mismatched": verify_bad,
        "unverified_files": unverified,
        "ok": served == identical and not verify_bad and not unverified and bool(files),
    }
