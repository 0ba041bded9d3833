"""The outcome class of one fault, from its trial record and the fsck of its disk.

Promises to the campaign's statistics and report: every fault ends in exactly one class of
``CLASSES``, decided in this order —

* ``harness-error``: the trial could not be carried out (deploy, clients, a refused
  injection, a fault that never activated, a lost worker...): kept apart, never counted as
  the scheme's;
* ``not-recovered``: the scheme did not bring service back;
* ``corrupted``: service came back, but an acknowledged write read back with content no
  write explains, fsck found an error on the disk the machine left, or one of the
  workload's own checks failed (``checks``: each with ``ok`` false, e.g. pg_amcheck's
  findings or the bank's invariants on ``postgres``) — the gravest;
* ``loss``: recovered, but acknowledged writes were lost (their bytes counted), or a file
  holding one could not be read back by the verify phase (unverified: not counted in bytes,
  never taken for present);
* ``intact``: recovered with every acknowledged write present.

Coverage is the share of ``intact`` + ``loss`` among the faults that are not harness
errors. The objects a recovering kernel rejected, and why, are kept beside the class.
"""

from __future__ import annotations

CLASSES = ("intact", "loss", "corrupted", "not-recovered", "harness-error")
COVERED = ("intact", "loss")
REJECTED_KEPT = 20  # reasons kept per fault; the rest are counted


def classify(rec: dict, fsck: dict | None) -> tuple[str, str]:
    """(class, why) of a finished trial record (harness/trial.py) and fsck's verdict."""
    if rec.get("error"):
        return "harness-error", rec["error"]
    if rec.get("report") is None:
        return (
            "harness-error",
            "no failure was detected within the recovery timeout (the fault did not activate)",
        )
    if not rec["recovered"]:
        if rec["report"].get("recovered"):
            return (
                "not-recovered",
                "the scheme reported service back, but not every client was answered again",
            )
        return "not-recovered", rec["report"].get("verdict", "not recovered")
    if rec.get("corrupted_writes"):
        return "corrupted", f"{rec['corrupted_writes']} acknowledged writes read back corrupted"
    if fsck is not None and fsck["exit_code"] != 0:
        return "corrupted", f"fsck exit {fsck['exit_code']}: " + "; ".join(fsck["problems"][:3])
    if failed := failed_checks(rec):
        return "corrupted", "workload check failed: " + ", ".join(failed)
    if rec.get("lost_writes") or rec.get("unverified_keys"):
        return "loss", lost_why(rec)
    return "intact", "every acknowledged write present"


def lost_why(rec: dict) -> str:
    """A file the verify phase never read back (the kernel answered EIO for a page it lost,
    or did not answer) holds acknowledged writes nobody saw again: lost to the application,
    so never "intact"; its bytes are not counted, since nothing says what it still holds."""
    parts = []
    if rec.get("lost_writes"):
        parts.append(f"{rec['lost_writes']} acknowledged writes lost ({rec['lost_bytes']} bytes)")
    if rec.get("unverified_keys"):
        parts.append(
            f"{rec['unverified_keys']} files with acknowledged writes could not be read back"
        )
    return "; ".join(parts)


def failed_checks(rec: dict) -> list[str]:
    """The workload's checks (harness/workloads/__init__.py ``checks``) that said ``ok``
    false; a check that could not run (``ok`` None) is no failure, and not a pass either."""
    checks = rec.get("checks") or {}
    return [n for n, c in checks.items() if isinstance(c, dict) and c.get("ok") is False]


def rejected_of(rec: dict) -> dict:
    """What the recovering kernel refused, with its reasons (at most REJECTED_KEPT)."""
    r = rec.get("report") or {}
    reasons = list(r.get("rejected") or [])
    cache = r.get("cache") or {}
    return {
        "pages": cache.get("pages_rejected", 0),
        "metadata_blocks": cache.get("metadata_rejected", 0),
        "reasons": reasons[:REJECTED_KEPT],
        "reasons_not_kept": max(0, len(reasons) - REJECTED_KEPT),
    }
