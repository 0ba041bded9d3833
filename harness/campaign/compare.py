"""Regression compare of two campaigns: did coverage drop, did corruption appear?

Promises to `crashbench compare` and the CI jobs that gate on it: for every scheme of both
campaigns, over all its faults and per fault kind, the verdict is "worse" when the new
coverage's Wilson interval lies wholly below the old one's (a drop beyond the intervals),
or when the new campaign has a corrupted outcome where the old had none; "better" in the
mirror case of coverage; "same" otherwise; "n/a" when a side has no faults there.
``exit_code`` is 1 when any verdict is "worse".
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    scheme: str
    fault: str  # a fault kind, or "all"
    old: dict | None  # the group of summary.py
    new: dict | None
    verdict: str
    why: str = ""


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)

    @property
    def worse(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == "worse"]

    @property
    def exit_code(self) -> int:
        return 1 if self.worse else 0


def judge(old: dict | None, new: dict | None) -> tuple[str, str]:
    if not old or not new or old["n"] == 0 or new["n"] == 0:
        return "n/a", "no faults on one side"
    if new["corrupted"]["k"] and not old["corrupted"]["k"]:
        return "worse", f"{new['corrupted']['k']} corrupted outcomes where there were none"
    oc, nc = old["coverage"], new["coverage"]
    if nc["hi"] < oc["lo"]:
        return "worse", "coverage dropped below the old interval"
    if nc["lo"] > oc["hi"]:
        return "better", "coverage rose above the old interval"
    return "same", ""


def compare(old: dict, new: dict) -> Comparison:
    out = Comparison()
    so, sn = old["summary"]["schemes"], new["summary"]["schemes"]
    for s in [*so, *(x for x in sn if x not in so)]:
        go, gn = so.get(s), sn.get(s)
        kinds = sorted(set((go or {}).get("kinds", {})) | set((gn or {}).get("kinds", {})))
        for k in [*kinds, "all"]:
            a = (go or {}).get("all") if k == "all" else (go or {}).get("kinds", {}).get(k)
            b = (gn or {}).get("all") if k == "all" else (gn or {}).get("kinds", {}).get(k)
            out.rows.append(Row(s, k, a, b, *judge(a, b)))
    return out
