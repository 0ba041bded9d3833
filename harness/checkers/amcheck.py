"""The `postgres` workload's database check: what PostgreSQL's own checker (pg_amcheck)
found in the recovered database.

Promises to harness/trial.py and the report (the history's shape:
harness/workloads/postgres_client.py): the verify phase records one keyless ``verify`` of
``{"check": "amcheck"}``, ``ok`` with pg_amcheck's exit status and findings when it
checked, ``fail`` with its error when it could not. From that alone: ``ok`` is True only
when it checked and found nothing, False when it found anything (each finding kept, as
pg_amcheck named it), and None — never a guess — when it did not check (no verify phase,
no server, no extension).
"""

from __future__ import annotations

from harness.checkers.common import VERIFY
from harness.history import pairs


def amcheck(events: list[dict]) -> dict:
    """{"checked": bool, "status": pg_amcheck's exit status or None, "findings": [str],
    "error": why it did not check or None, "ok": True | False | None}."""
    out = {"checked": False, "status": None, "findings": [], "error": None, "ok": None}
    for inv, done in pairs(events):
        if inv["f"] != VERIFY or "key" in inv or (inv.get("value") or {}).get("check") != "amcheck":
            continue
        if done is None or done["type"] != "ok":
            out = {
                "checked": False,
                "status": None,
                "findings": [],
                "error": (done or {}).get("error") or "pg_amcheck did not finish",
                "ok": None,
            }
            continue
        v = done.get("value") or {}
        found = [str(f) for f in v.get("findings") or []]
        status = v.get("status")
        out = {
            "checked": True,
            "status": status,
            "findings": found,
            "error": None,
            "ok": status == 0 and not found,
        }
    return out
