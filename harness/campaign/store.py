"""A campaign directory: campaign.json and the append-only log of finished faults.

Promises to the campaign command, report and compare: ``faults.jsonl`` gets one line per
finished fault, appended with one write and flushed to disk before the next fault is
counted (``append``), so a campaign killed at any moment loses at most the faults that
were running. ``load_log`` reads it back checking every line against ``FAULT_SCHEMA``: a
torn last line (a kill in mid-write) is cut off, a line that does not parse or validate,
or names a fault not in the plan, is rejected and counted, a fault logged twice is counted
once (the first) — every fault is counted once. ``campaign.json`` (``CAMPAIGN_SCHEMA``,
``schema_version`` 1, docs/RESULTS.md "Campaigns") holds the parameters, the plan, the
results and their summary; it is validated before it is written (atomically) and when it
is read. ``identity`` is what makes two commands the same campaign: the parameters without
where and how wide it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jsonschema

from harness.campaign.outcome import CLASSES
from harness.results import EVIDENCE_SCHEMA

SCHEMA_VERSION = 1
KIND = "crashbench campaign"
CAMPAIGN_FILE = "campaign.json"
LOG_FILE = "faults.jsonl"
NOT_IDENTITY = ("executor", "workers", "scheduler", "image")

_num = {"type": ["number", "null"]}
_int = {"type": ["integer", "null"], "minimum": 0}
_str = {"type": ["string", "null"]}
FAULT_SCHEMA = {
    "type": "object",
    "required": [
        "id",
        "index",
        "scheme",
        "kind",
        "target",
        "site",
        "repetition",
        "seed",
        "outcome",
        "why",
        "rejected",
        "downtime_s",
        "outage_s",
        "acked_writes",
        "lost_writes",
        "lost_bytes",
        "corrupted_writes",
        "cache",
        "fsck",
        "phases",
        "wall_s",
        "finished",
        "worker",
        "error",
    ],
    "properties": {
        "id": {"type": "string"},
        "index": {"type": "integer", "minimum": 0},
        "scheme": {"type": "string"},
        "kind": {"type": "string"},
        "target": _str,
        "site": _str,
        "repetition": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer", "minimum": 0},
        "outcome": {"enum": list(CLASSES)},
        "why": {"type": "string"},
        "rejected": {
            "type": "object",
            "required": ["pages", "metadata_blocks", "reasons"],
            "properties": {
                "pages": {"type": "integer", "minimum": 0},
                "metadata_blocks": {"type": "integer", "minimum": 0},
                "reasons": {"type": "array", "items": {"type": "string"}},
            },
        },
        "downtime_s": _num,
        "outage_s": _num,
        "acked_writes": _int,
        "lost_writes": _int,
        "lost_bytes": _int,
        "corrupted_writes": _int,
        # files the verify phase never read back (absent from results logged before)
        "unverified_keys": _int,
        "cache": {"type": "object"},
        "fsck": {"type": ["object", "null"], "required": ["exit_code", "problems"]},
        # the workload's own checks (absent from results logged before they were kept)
        "checks": {"type": ["object", "null"]},
        "evidence": EVIDENCE_SCHEMA,
        "phases": {"type": "object", "additionalProperties": {"type": "number"}},
        "wall_s": {"type": "number", "minimum": 0},
        "finished": {"type": "number"},
        "worker": {"type": "string"},
        "error": _str,
    },
}
_count = {"type": "integer", "minimum": 0}
_share = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_interval = {
    "type": "object",
    "required": ["k", "n", "share", "lo", "hi"],
    "properties": {"k": _count, "n": _count, "share": _share, "lo": _share, "hi": _share},
}
_group = {
    "type": "object",
    "required": ["n", "harness_errors", "counts", "coverage", "corrupted"],
    "properties": {
        "n": _count,
        "harness_errors": _count,
        "counts": {"type": "object", "required": list(CLASSES), "additionalProperties": _count},
        "coverage": _interval,
        "corrupted": _interval,
    },
}
CAMPAIGN_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "crashbench campaign.json, schema_version 1",
    "type": "object",
    "required": [
        "schema_version",
        "kind",
        "campaign_id",
        "created",
        "parameters",
        "environment",
        "plan",
        "faults",
        "log",
        "summary",
        "status",
        "time",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"const": KIND},
        "campaign_id": {"type": "string", "pattern": "^[0-9a-f]{10}$"},
        "created": {"type": "string"},
        "parameters": {
            "type": "object",
            "required": [
                "schemes",
                "workload",
                "faults",
                "sites",
                "per_scheme",
                "seed",
                "timing",
                "workload_params",
                "machine_file",
            ],
        },
        "environment": {"type": "object"},
        "plan": {
            "type": "array",
            "items": {"type": "object", "required": ["id", "index", "scheme", "kind", "seed"]},
        },
        "faults": {"type": "array", "items": FAULT_SCHEMA},
        "log": {
            "type": "object",
            "required": ["rejected_lines", "duplicates"],
            "properties": {"rejected_lines": _count, "duplicates": _count},
        },
        "summary": {
            "type": "object",
            "required": ["level", "schemes"],
            "properties": {
                "schemes": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["all", "kinds", "cells"],
                        "properties": {
                            "all": _group,
                            "kinds": {"type": "object", "additionalProperties": _group},
                            "cells": {"type": "object", "additionalProperties": _group},
                        },
                    },
                }
            },
        },
        "status": {"enum": ["running", "stopped", "complete"]},
        "stopped": {"type": "object"},
        "time": {
            "type": "object",
            "required": ["wall_s", "faults_run", "per_fault_s"],
            "properties": {
                "wall_s": {"type": "number", "minimum": 0},
                "faults_run": _count,
                "per_fault_s": _num,
            },
        },
    },
}


class CampaignError(ValueError):
    """A campaign directory that cannot be used; the message names the file and field."""


def identity(parameters: dict) -> dict:
    return {k: v for k, v in parameters.items() if k not in NOT_IDENTITY}


def campaign_id(parameters: dict) -> str:
    return hashlib.sha256(json.dumps(identity(parameters), sort_keys=True).encode()).hexdigest()[
        :10
    ]


def validate(doc: dict, where: str = CAMPAIGN_FILE) -> None:
    if isinstance(doc, dict) and doc.get("schema_version") not in (None, SCHEMA_VERSION):
        raise CampaignError(
            f"{where}: schema_version {doc['schema_version']!r}: this crashbench "
            f"reads schema_version {SCHEMA_VERSION} only"
        )
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(CAMPAIGN_SCHEMA).iter_errors(doc)
    )
    if err is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise CampaignError(f"{where}: {path.lstrip('.') or 'top level'}: {err.message}")


def write(d: Path, doc: dict) -> Path:
    from harness.results import write_atomic

    validate(doc)
    return write_atomic(d / CAMPAIGN_FILE, json.dumps(doc, indent=1))


def load(d: Path) -> dict:
    p = Path(d) / CAMPAIGN_FILE
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise CampaignError(f"{p}: no such file (not a campaign directory)") from None
    except (OSError, ValueError) as e:
        raise CampaignError(f"{p}: cannot be read as JSON: {e}") from None
    validate(doc, str(p))
    return doc


def append(d: Path, result: dict) -> None:
    """One finished fault onto the log: one write, then fsync."""
    jsonschema.validate(result, FAULT_SCHEMA)
    line = (json.dumps(result, separators=(",", ":")) + "\n").encode()
    fd = os.open(Path(d) / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, line)
        if n != len(line):
            raise OSError(f"{LOG_FILE}: short write ({n} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)


def load_log(d: Path, plan_ids: set[str], repair: bool = False) -> tuple[list[dict], dict]:
    """(results in log order, {"rejected_lines", "duplicates", "rejected"}). ``repair``:
    cut a torn last line off the file (the campaign's owner does, before appending)."""
    p = Path(d) / LOG_FILE
    data = p.read_bytes() if p.exists() else b""
    torn = b""
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        data, torn = data[:cut], data[cut:]
        if repair:
            os.truncate(p, cut)
    out, seen, rejected, dups = [], set(), [], 0
    v = jsonschema.Draft202012Validator(FAULT_SCHEMA)
    for i, line in enumerate(data.splitlines(), 1):
        try:
            r = json.loads(line)
        except ValueError:
            rejected.append(f"line {i}: not JSON")
            continue
        err = jsonschema.exceptions.best_match(v.iter_errors(r))
        if err is not None:
            rejected.append(f"line {i}: {err.message}")
        elif r["id"] not in plan_ids:
            rejected.append(f"line {i}: fault {r['id']!r} is not in this campaign's plan")
        elif r["id"] in seen:
            dups += 1
        else:
            seen.add(r["id"])
            out.append(r)
    if torn:
        rejected.append(f"a torn last line of {len(torn)} bytes (cut off)")
    return out, {"rejected_lines": len(rejected), "duplicates": dups, "rejected": rejected[:20]}
