"""The outcome class of one fault, from its trial record and the fsck of its disk.

Promises to the campaign's statistics and report: every fault ends in exactly one class of
``CLASSES``, decided in this order —

* ``harness-error``: the trial could not be carried out (deploy, clients, a refused
  injection, a fault that never activated, a lost worker...): kept apart, never counted as
  the scheme's;
* ``not-recovered``: the scheme did not bring service back;
* ``corrupted``: service came back, but an acknowledged write read back with content no
  write explains, or fsck found an error on the disk the machine left — the gravest;
* ``loss``: recovered, but acknowledged writes were lost (their bytes counted);
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
    if rec.get("lost_writes"):
        return "loss", f"{rec['lost_writes']} acknowledged writes lost ({rec['lost_bytes']} bytes)"
    return "intact", "every acknowledged write present"


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
