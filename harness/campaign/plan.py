"""The plan of a campaign: which faults, in which order, each with an id and a seed.

Promises to the campaign command and to replay: ``cells(kinds)`` lists every place a fault
kind can be put — wild-write and bit-flip into each ``OBJECT_TARGETS`` object (the kernel's own, not a
scheme's crash-kernel image; activated at once),
the other kinds at each ``SITES`` site where they make sense — and ``plan`` draws
``per_scheme`` faults per scheme by going round the cells (repetition r of a cell is its
r-th round), interleaved across schemes so drift of a shared machine hits every scheme
alike; ``sites`` narrows the cells to faults activated at those sites, ``targets`` to memory faults into those objects. A fault's id names its scheme, cell and repetition; its seed derives from the
campaign seed and the id alone, so the same parameters give the same plan, and any fault
is replayed alone by its id.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from kernel.core.faults import FAULTS, OBJECT_TARGETS, REQUEST_SITES, SITES

MEMORY_FAULTS = ("wild-write", "bit-flip")
# "now" is not inside a request, so an exception in a request needs a request's site, or
# write-back's: the exception a scheme that rolls requests back cannot (systems/txipc_sim)
SITES_OF = {"exception-in-request": (*REQUEST_SITES, "writeback")}


class PlanError(ValueError):
    """A campaign names an unknown fault kind or asks for no faults."""


@dataclass(frozen=True)
class Cell:
    kind: str
    target: str | None = None
    site: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.target or self.site}"


@dataclass(frozen=True)
class FaultSpec:
    id: str
    index: int  # position in the plan
    scheme: str
    kind: str
    target: str | None
    site: str | None
    repetition: int
    seed: int

    @property
    def cell(self) -> str:
        return Cell(self.kind, self.target, self.site).name

    def fault_args(self) -> dict:
        """What the kernel's inject request carries besides the kind."""
        out = {"seed": self.seed}
        if self.target:
            out["target"] = self.target
        if self.site:
            out["site"] = self.site
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def kinds_of(faults: str) -> list[str]:
    """``all`` or a comma-separated list of fault kinds, checked."""
    if faults.strip() == "all":
        return list(FAULTS)
    names = [f.strip() for f in faults.split(",") if f.strip()]
    if not names:
        raise PlanError("--faults: names no fault kind (e.g. --faults all or --faults panic,kill)")
    for n in names:
        if n not in FAULTS:
            raise PlanError(f"--faults: unknown fault {n!r}; known: all, {', '.join(FAULTS)}")
    if len(set(names)) != len(names):
        raise PlanError(f"--faults: a fault is named twice in {faults}")
    return names


def sites_of(sites: str) -> list[str] | None:
    """``all`` (None: every site) or a comma-separated list of ``SITES``, checked."""
    return _chosen("sites", "site", sites, SITES, "now")


def targets_of(targets: str) -> list[str] | None:
    """``all`` (None: every cell) or a comma-separated list of ``OBJECT_TARGETS``, checked."""
    return _chosen("targets", "target", targets, OBJECT_TARGETS, "superblock")


def _chosen(option: str, noun: str, text: str, known, example: str) -> list[str] | None:
    if text.strip() == "all":
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in known:
            raise PlanError(f"--{option}: unknown {noun} {n!r}; known: all, {', '.join(known)}")
    if not names:
        raise PlanError(
            f"--{option}: names no {noun} (e.g. --{option} all or --{option} {example})"
        )
    return names


def cells(
    kinds: list[str], sites: list[str] | None = None, targets: list[str] | None = None
) -> list[Cell]:
    """Every cell of these kinds; ``sites``: only cells activated at one of them (memory
    faults are activated "now"); ``targets``: only memory faults into one of these objects
    (the other kinds have no target)."""
    out = []
    for k in kinds:
        if k in MEMORY_FAULTS:
            out += [Cell(k, target=t, site="now") for t in OBJECT_TARGETS]
        else:
            out += [Cell(k, site=s) for s in SITES_OF.get(k, tuple(SITES))]
    out = [c for c in out if sites is None or c.site in sites]
    if not out:
        raise PlanError(f"no fault of {', '.join(kinds)} is activated at {', '.join(sites or [])}")
    out = [c for c in out if targets is None or c.target in targets]
    if not out:
        raise PlanError(
            f"no fault of {', '.join(kinds)} goes into {', '.join(targets or [])} "
            f"(only {', '.join(MEMORY_FAULTS)} have targets)"
        )
    return out


def fault_seed(campaign_seed: int, fault_id: str) -> int:
    h = hashlib.sha256(f"{campaign_seed}:{fault_id}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def plan(
    schemes: list[str],
    kinds: list[str],
    per_scheme: int,
    seed: int,
    sites: list[str] | None = None,
    targets: list[str] | None = None,
) -> list[FaultSpec]:
    if per_scheme <= 0:
        raise PlanError(f"--per-scheme: must be a positive number of faults, got {per_scheme}")
    cs = cells(kinds, sites, targets)
    out: list[FaultSpec] = []
    for i in range(per_scheme):
        c, rep = cs[i % len(cs)], i // len(cs)
        for s in schemes:
            fid = f"{s}:{c.name}:{rep}"
            out.append(
                FaultSpec(
                    fid,
                    len(out),
                    s,
                    c.kind,
                    c.target,
                    None if c.target else c.site,
                    rep,
                    fault_seed(seed, fid),
                )
            )
    return out
