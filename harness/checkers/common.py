"""What every checker reads the same way: the crash time and the clients' operations.

Promises to the checkers in this package: one definition of when the crash happened and of
which operations are the clients' load (not the nemesis's records, not the verify phase's
reads), so that downtime, throughput and write loss all split a history at the same moment.
"""

from __future__ import annotations

from harness.history import NEMESIS, pairs

VERIFY = "verify"


def crash_times(events: list[dict]) -> dict:
    """{"crash_at", "injected_at", "delivered_at", "activated_at"} (monotonic seconds or
    None).

    The crash is the latest of: the injection (the nemesis's ``invoke crash``), its delivery
    (``injected_ns`` of the kernel's reply in ``info crash``, when present) and the
    activation (``info activated``, the dying kernel's own record). Why the latest: a fault
    cannot take effect before it is sent and received, and the recorded activation falls
    back to the kernel's last heartbeat when the kernel wrote no activation time, which may
    precede the injection; an operation answered between the injection request and the
    activation was served by the still-running kernel and belongs before the crash."""
    injected = nemesis_time(events, "invoke", "crash")
    delivered = _delivery(events)
    activated = nemesis_time(events, "info", "activated")
    known = [t for t in (injected, delivered, activated) if t is not None]
    return {
        "crash_at": max(known) if known else None,
        "injected_at": injected,
        "delivered_at": delivered,
        "activated_at": activated,
    }


def nemesis_time(events: list[dict], type_: str, f: str) -> float | None:
    """The time of the nemesis's first event of this type and f (None: there is none)."""
    return next(
        (
            float(e["time"])
            for e in events
            if e["process"] == NEMESIS and e["type"] == type_ and e["f"] == f
        ),
        None,
    )


def _delivery(events: list[dict]) -> float | None:
    """When the kernel received the fault, from its reply to the injection request."""
    for e in events:
        if e["process"] == NEMESIS and e["type"] == "info" and e["f"] == "crash":
            value = e.get("value")
            reply = value.get("reply") if isinstance(value, dict) else None
            ns = reply.get("injected_ns") if isinstance(reply, dict) else None
            if isinstance(ns, int) and not isinstance(ns, bool) and ns > 0:
                return ns / 1e9
            return None
    return None


def is_load(op: dict) -> bool:
    """A client's operation of the load: not the nemesis's, not a verify-phase read."""
    return op["process"] != NEMESIS and op["f"] != VERIFY


def load_oks(events: list[dict]) -> dict[int, list[tuple[float, float]]]:
    """(invoke time, completion time) of every ``ok`` load operation, per client, in order
    of completion."""
    out: dict[int, list[tuple[float, float]]] = {}
    for inv, done in pairs(events):
        if is_load(inv) and done is not None and done["type"] == "ok":
            out.setdefault(inv["process"], []).append((float(inv["time"]), float(done["time"])))
    for spans in out.values():
        spans.sort(key=lambda span: span[1])
    return out
