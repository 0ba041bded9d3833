"""The `postgres` workload's invariants: no committed transfer lost, money neither created
nor destroyed, no transaction applied by half.

Promises to harness/trial.py and the report (the history's shapes:
harness/workloads/postgres_client.py): a transfer is a load ``write`` whose key is its
ledger row and whose value carries the row's sha256 and the transfer (src, dst, amount);
the verify phase reads every such key back (``{"sha256"}`` or ``{"absent": true}``) and
records one keyless ``verify`` of the bank (accounts, initial balance, the sum of all
balances, every account whose balance differs from the initial one). From these alone:

* a committed transfer (``ok``) must have its ledger row, with its content (else lost);
* an indeterminate one (``info``, or never completed) may be present or absent;
* a failed one (``fail``) must be absent (else ``failed_present``);
* every account's balance must equal its initial balance plus the net of the transfers
  whose ledger rows are present — a transfer applied by half (a row without its updates,
  or updates without the row) breaks this for its accounts (``accounts_inconsistent``);
* the sum over accounts must equal accounts × initial balance (``conserved``).

Without the bank's verify record (the scheme did not recover, or the verify client got no
answer) every figure but the counts of transfers is None, never a guess.
"""

from __future__ import annotations

from harness.checkers.common import VERIFY, is_load
from harness.checkers.writes import verified
from harness.history import pairs


def bank(events: list[dict]) -> dict:
    """{"committed", "info", "failed", "present", "lost", "info_present", "info_absent",
    "failed_present", "unverified", "ledger_rows", "unexplained_rows", "accounts", "sum",
    "expected_sum", "conserved", "accounts_inconsistent", "ok"}."""
    transfers: dict[str, tuple[str, dict]] = {}
    for inv, done in pairs(events):
        v = inv.get("value")
        if is_load(inv) and inv["f"] == "write" and isinstance(v, dict) and "amount" in v:
            transfers[inv["key"]] = ("info" if done is None else done["type"], v)
    out = {
        "committed": sum(o == "ok" for o, _ in transfers.values()),
        "info": sum(o == "info" for o, _ in transfers.values()),
        "failed": sum(o == "fail" for o, _ in transfers.values()),
    }
    state = _bank_state(events)
    nulls = (
        "present",
        "lost",
        "info_present",
        "info_absent",
        "failed_present",
        "unverified",
        "ledger_rows",
        "unexplained_rows",
        "accounts",
        "sum",
        "expected_sum",
        "conserved",
        "accounts_inconsistent",
        "ok",
    )
    if state is None:
        return {**out, **{k: None for k in nulls}}
    seen = verified(events)
    counts = dict.fromkeys(
        ("present", "lost", "info_present", "info_absent", "failed_present", "unverified"), 0
    )
    balance_delta: dict[int, int] = {}
    for key, (outcome, v) in transfers.items():
        found = seen.get(key)
        if found is None:
            counts["unverified"] += 1
            continue
        here = not found.get("absent") and found.get("sha256") == v["sha256"]
        if here:
            counts["present"] += 1
            balance_delta[v["src"]] = balance_delta.get(v["src"], 0) - v["amount"]
            balance_delta[v["dst"]] = balance_delta.get(v["dst"], 0) + v["amount"]
        if outcome == "ok" and not here:
            counts["lost"] += 1
        elif outcome == "info":
            counts["info_present" if here else "info_absent"] += 1
        elif outcome == "fail" and here:
            counts["failed_present"] += 1
    b0, n = state["initial_balance"], state["accounts"]
    actual = {int(aid): int(bal) for aid, bal in state["changed"]}
    inconsistent = sum(actual.get(aid, b0) != b0 + d for aid, d in balance_delta.items())
    inconsistent += sum(1 for aid, bal in actual.items() if aid not in balance_delta and bal != b0)
    expected_sum = n * b0
    res = {
        **out,
        **counts,
        "ledger_rows": state["ledger_rows"],
        "unexplained_rows": state["ledger_rows"] - counts["present"],
        "accounts": n,
        "sum": state["sum"],
        "expected_sum": expected_sum,
        "conserved": state["sum"] == expected_sum,
        "accounts_inconsistent": inconsistent,
    }
    res["ok"] = (
        res["conserved"]
        and not inconsistent
        and not counts["lost"]
        and not counts["failed_present"]
        and not counts["unverified"]
        and not res["unexplained_rows"]
    )
    return res


def _bank_state(events: list[dict]) -> dict | None:
    """The value of the last ``ok`` keyless bank verify, or None."""
    state = None
    for inv, done in pairs(events):
        if inv["f"] == VERIFY and "key" not in inv and done is not None and done["type"] == "ok":
            v = done.get("value")
            if isinstance(v, dict) and v.get("check") == "bank":
                state = v
    return state
