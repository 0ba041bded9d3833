"""What the commands print: tables for people, one JSON document for programs.

Promises to users and to CI jobs: with ``--json`` a command prints exactly one JSON
document on stdout — ``{"schema_version": 1, "kind": "crashbench <command> --json", ...}``,
validated against its entry in ``SCHEMAS`` before it is printed (docs/RESULTS.md,
"Command output as JSON") — and everything else (progress, notes, errors) goes to
stderr. Without a terminal on stdout a table is printed at its natural width
(``Output``), so no figure is ever cut ("0.31…") or wrapped. Byte counts for people are
MiB (``report.mib``); JSON keeps exact integers in bytes. An infinite figure (a trial that
did not recover) is the string ``"inf"`` in JSON, which has no infinity.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
from rich.console import Console, ConsoleDimensions

SCHEMA_VERSION = 1
NO_WIDTH_LIMIT = 1_000_000  # columns; wider than any table this project prints


class Output(Console):
    """A console that has no width limit when its file is not a terminal (a pipe, a file,
    a CI log): tables keep every figure whole instead of cutting it to 80 columns."""

    def _size(self) -> ConsoleDimensions:
        if self.is_terminal:
            return Console.size.fget(self)
        return ConsoleDimensions(NO_WIDTH_LIMIT, 25)

    size = property(_size, Console.size.fset)


def kind(command: str) -> str:
    return f"crashbench {command} --json"


def emit(command: str, body: dict) -> None:
    """Print the document of ``command`` (validated against its schema) on stdout."""
    doc = {"schema_version": SCHEMA_VERSION, "kind": kind(command), **jsonable(body)}
    errors = sorted(
        jsonschema.Draft202012Validator(SCHEMAS[command]).iter_errors(doc),
        key=lambda e: list(e.absolute_path),
    )
    if errors:  # a bug of ours, not bad input: never print a document that lies
        e = errors[0]
        raise ValueError(f"{kind(command)}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
    print(json.dumps(doc, indent=2, allow_nan=False), flush=True)


def jsonable(v):
    """Sets as sorted lists, tuples as lists, infinities as "inf", NaN as null."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted(jsonable(x) for x in v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Path):
        return str(v)
    return v


# --- the documents ---------------------------------------------------------------------------


def summary_body(dir: Path, run: dict, files: list[Path]) -> dict:
    """What `run --json` and `report --json` print: the run's summary, ranking and files."""
    from harness import report

    groups = []
    for s in report.summarize(run):
        scheme, workload, fault = s["key"]
        rest = {k: v for k, v in s.items() if k not in ("key", "modeled")}
        groups.append(
            {
                "scheme": scheme,
                "workload": workload,
                "fault": fault,
                **rest,
                "modeled_phases": sorted(s["modeled"]),
            }
        )
    return {
        "run_id": run["run_id"],
        "dir": str(dir),
        "incomplete": run.get("incomplete"),
        "groups": groups,
        "ranking": report.ranking(report.summarize(run)),
        "files": sorted(f.name for f in files),
    }


def compare_body(result, old: Path, new: Path) -> dict:
    from dataclasses import asdict

    return {
        "old": str(old),
        "new": str(new),
        "threshold": result.threshold,
        "alpha": result.alpha,
        "exit_code": result.exit_code,
        "rows": [asdict(r) for r in result.rows],
        "categorical": [asdict(c) for c in result.categorical],
        "notes": result.notes,
    }


def overhead_body(dir: Path, doc: dict, files: list[str], exit_code: int) -> dict:
    return {
        "run_id": doc["run_id"],
        "dir": str(dir),
        "exit_code": exit_code,
        "figures": doc["figures"],
        "resources": doc["resources"],
        "failed_runs": [
            {"id": r["id"], "error": r["error"]} for r in doc["runs"] if r.get("error")
        ],
        "files": sorted(files),
    }


# --- the schemas -----------------------------------------------------------------------------


def _doc(command: str, required: list[str], properties: dict) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind(command)}, schema_version {SCHEMA_VERSION}",
        "type": "object",
        "required": ["schema_version", "kind", *required],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "kind": {"const": kind(command)},
            **properties,
        },
    }


_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
_NUM_OR_NULL = {"type": ["number", "null"]}
# a figure that may be infinite (a trial that did not recover): a number, "inf" or null
_FIGURE = {"anyOf": [{"type": ["number", "null"]}, {"const": "inf"}]}
_INTERVAL = {
    "type": "object",
    "required": ["median", "lo", "hi", "n"],
    "properties": {
        "median": _NUM_OR_NULL,
        "lo": _NUM_OR_NULL,
        "hi": _NUM_OR_NULL,
        "n": _INT,
        "censored": _INT,  # values that are lower bounds: median and ends are too
    },
}
_NAMES = {"type": "object", "additionalProperties": _STR}
_FILES = {"type": "array", "items": _STR}
_SUMMARY = {
    "run_id": _STR,
    "dir": _STR,
    "files": _FILES,
    "incomplete": {"type": ["object", "null"]},
    "ranking": {"type": "array", "items": _STR},
    "groups": {
        "type": "array",
        "items": {
            "type": "object",
            "required": [
                "scheme",
                "workload",
                "fault",
                "trials",
                "failed",
                "recovered",
                "downtime",
                "time_to_90pct",
                "lost_bytes_total",
                "unverified",
                "phases",
                "modeled_phases",
            ],
            "properties": {
                "scheme": _STR,
                "workload": _STR,
                "fault": _STR,
                "trials": _INT,
                "failed": _INT,
                "recovered": _INT,
                "downtime": _INTERVAL,
                "time_to_90pct": _INTERVAL,
                "lost_bytes_total": {"type": ["integer", "null"], "minimum": 0},
                "unverified": _INT,
                "phases": {"type": "object", "additionalProperties": _NUM_OR_NULL},
                "modeled_phases": {"type": "array", "items": _STR},
            },
        },
    },
}
_COUNT_OF = {
    "type": "object",
    "required": ["count", "of"],
    "properties": {"count": _INT, "of": _INT},
}

SCHEMAS = {
    "list": _doc(
        "list",
        ["schemes", "workloads", "faults"],
        {"schemes": _NAMES, "workloads": _NAMES, "faults": _NAMES, "sites": _NAMES},
    ),
    "report": _doc("report", list(_SUMMARY), _SUMMARY),
    "run": _doc(
        "run",
        [*_SUMMARY, "exit_code", "failed_trials"],
        {
            **_SUMMARY,
            "exit_code": _INT,
            "failed_trials": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "error"],
                    "properties": {"id": _STR, "error": _STR},
                },
            },
        },
    ),
    "compare": _doc(
        "compare",
        ["old", "new", "threshold", "alpha", "exit_code", "rows", "categorical", "notes"],
        {
            "old": _STR,
            "new": _STR,
            "threshold": {"type": "number"},
            "alpha": {"type": "number"},
            "exit_code": {"enum": [0, 1]},
            "rows": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "scheme",
                        "workload",
                        "fault",
                        "metric",
                        "n_old",
                        "n_new",
                        "median_old",
                        "median_new",
                        "ratio",
                        "p_worse",
                        "p_better",
                        "min_p",
                        "verdict",
                        "note",
                    ],
                    "properties": {
                        "metric": _STR,
                        "n_old": _INT,
                        "n_new": _INT,
                        "median_old": _FIGURE,
                        "median_new": _FIGURE,
                        "ratio": _FIGURE,
                        "p_worse": _NUM_OR_NULL,
                        "p_better": _NUM_OR_NULL,
                        "min_p": _NUM_OR_NULL,
                        "verdict": {"enum": ["worse", "better", "same", "too few", "n/a"]},
                        "note": _STR,
                    },
                },
            },
            "categorical": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["scheme", "workload", "fault", "check", "old", "new", "verdict"],
                    "properties": {
                        "check": _STR,
                        "old": _COUNT_OF,
                        "new": _COUNT_OF,
                        "verdict": {"enum": ["worse", "better", "same", "n/a"]},
                    },
                },
            },
            "notes": {"type": "array", "items": _STR},
        },
    ),
    "overhead": _doc(
        "overhead",
        ["run_id", "dir", "exit_code", "figures", "resources", "failed_runs", "files"],
        {
            "run_id": _STR,
            "dir": _STR,
            "exit_code": _INT,
            "figures": {"type": "object", "required": ["workloads", "micro"]},
            "resources": {"type": "object"},
            "files": _FILES,
            "failed_runs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "error"],
                    "properties": {"id": _STR, "error": _STR},
                },
            },
        },
    ),
}
