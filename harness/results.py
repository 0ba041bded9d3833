"""Result directories: run.json, the pyperf file, `latest`; the format docs/RESULTS.md describes.

Promises to the driver, the report, compare and anyone who parses a run: run.json is
validated against ``RUN_SCHEMA`` before it is written and again when it is read, and is
replaced atomically, so a reader sees the previous complete file or the new one, never a
part; an invalid run is refused with a ``ResultsError`` naming the file and the field, and
nothing is written. ``schema_version`` is 2 (``time_to_90pct_s`` at a finer resolution,
the recovery figures required); version 1 runs are still read, and their trials lack the
figures added in 2 (V2_FIELDS). Fields may be added without a bump (readers ignore what
they do not know); removing, renaming or changing the meaning of a field bumps it, and
this module then refuses versions it does not read rather than misread them.
A run stopped before its last trial carries ``incomplete`` (why, trials run and planned).
Beside every run.json written, ``trials.csv`` holds the per-trial figures (``CSV_COLUMNS``)
for spreadsheets and CI logs; run.json stays the only file read back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import jsonschema

from harness.checkers import CACHE_KEYS

SCHEMA_VERSION = 2
READS = (1, 2)
KIND = "crashbench run"
RUN_FILE = "run.json"
PYPERF_FILE = "downtime.pyperf.json"
CSV_FILE = "trials.csv"
LATEST = "latest"


class ResultsError(Exception):
    """A result directory or run that cannot be used; the message names the file and why."""


_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_COUNT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_SECONDS_OR_NULL = {"type": ["number", "null"], "minimum": 0}
_NAME = {"type": "string", "minLength": 1}
_RATIO_OR_NULL = {"type": ["number", "null"], "minimum": 0, "maximum": 1}

# per key read back corrupted, the workload's account of what the machine held
# (harness/workloads/__init__.py ``explain``); only in a record that has such keys
EVIDENCE_SCHEMA = {"type": "object", "additionalProperties": {"type": "object"}}

TRIAL_SCHEMA = {
    "type": "object",
    "required": [
        "id",
        "scheme",
        "workload",
        "fault",
        "trial",
        "seed",
        "recovered",
        "downtime_s",
        "downtime_max_s",
        "outage_s",
        "phases",
        "modeled_phases",
        "acked_writes",
        "lost_writes",
        "corrupted_writes",
        "lost_bytes",
        "cache",
        "time_to_90pct_s",
        "throughput",
        "history",
    ],
    "properties": {
        "id": _NAME,
        "scheme": _NAME,
        "workload": _NAME,
        "fault": _NAME,
        "trial": _COUNT,
        "seed": {"type": "integer"},
        "recovered": {"type": "boolean"},
        "downtime_s": _SECONDS_OR_NULL,
        "downtime_max_s": _SECONDS_OR_NULL,
        "outage_s": _SECONDS_OR_NULL,
        "time_to_90pct_s": _SECONDS_OR_NULL,
        "phases": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "modeled_phases": {"type": "array", "items": _NAME, "uniqueItems": True},
        # null: not verified (the scheme did not recover, so nothing was read back)
        "acked_writes": _COUNT_OR_NULL,
        "lost_writes": _COUNT_OR_NULL,
        "corrupted_writes": _COUNT_OR_NULL,
        "lost_bytes": _COUNT_OR_NULL,
        "evidence": EVIDENCE_SCHEMA,
        "cache": {
            "type": "object",
            "required": list(CACHE_KEYS),
            "properties": {k: _COUNT_OR_NULL for k in CACHE_KEYS},
        },
        "throughput": {
            "type": "object",
            "required": ["bin_s", "bins", "pre_crash_mean"],
            "properties": {
                "bin_s": {"type": "number", "exclusiveMinimum": 0},
                "bins": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["t", "ops_per_s"],
                        "properties": {"t": _NUM, "ops_per_s": {"type": "number", "minimum": 0}},
                    },
                },
                "pre_crash_mean": {"type": ["number", "null"], "minimum": 0},
            },
        },
        "history": {"type": "string", "pattern": r"^history-[^/\\]+\.jsonl$"},
        "error": {"type": ["string", "null"]},
        # added in schema_version 2 (harness/checkers/recovery.py, cachehits.py)
        "time_to_99pct_s": _SECONDS_OR_NULL,
        "lost_ops": _NUM_OR_NULL,
        "lost_service_s": _NUM_OR_NULL,
        # added later in schema_version 2, optional: lost_* are a lower bound (never back)
        "lost_censored": {"type": "boolean"},
        "client_gap_s": _NUM_OR_NULL,
        "latency": {
            "type": "object",
            "required": ["before", "after"],
            "additionalProperties": {
                "type": "object",
                "required": ["n", "p50_s", "p99_s"],
                "properties": {"n": _COUNT, "p50_s": _SECONDS_OR_NULL, "p99_s": _SECONDS_OR_NULL},
            },
        },
        "recovery": {
            "type": "object",
            "required": ["bin_s", "bins", "pre_crash_mean", "recovered_at", "first_ok_after_s"],
            "properties": {
                "bin_s": {"type": "number", "exclusiveMinimum": 0},
                "bins": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["t", "ops", "ops_per_s", "full"],
                        "properties": {
                            "t": _NUM,
                            "ops": _COUNT,
                            "ops_per_s": {"type": "number", "minimum": 0},
                            "full": {"type": "boolean"},
                        },
                    },
                },
                "pre_crash_mean": {"type": ["number", "null"], "minimum": 0},
                "recovered_at": _NUM_OR_NULL,
                "first_ok_after_s": _NUM_OR_NULL,
            },
        },
        "cache_hits": {
            "type": "object",
            "required": ["bin_s", "bins", "before", "after"],
            "properties": {
                "bin_s": {"type": "number", "exclusiveMinimum": 0},
                "bins": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["t", "hits", "misses", "ratio", "full"],
                        "properties": {
                            "t": _NUM,
                            "hits": _COUNT,
                            "misses": _COUNT,
                            "ratio": _RATIO_OR_NULL,
                            "full": {"type": "boolean"},
                        },
                    },
                },
                "before": _RATIO_OR_NULL,
                "after": _RATIO_OR_NULL,
            },
        },
    },
}
V2_FIELDS = [
    "time_to_99pct_s",
    "lost_ops",
    "lost_service_s",
    "client_gap_s",
    "latency",
    "recovery",
    "cache_hits",
]

RUN_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "crashbench run.json, schema_version 2 (reads 1)",
    "type": "object",
    "required": [
        "schema_version",
        "kind",
        "run_id",
        "created",
        "parameters",
        "environment",
        "trials",
    ],
    "properties": {
        "schema_version": {"enum": list(READS)},
        "kind": {"const": KIND},
        "run_id": {"type": "string", "pattern": r"^[^/\\]+$"},
        "created": {"type": "string", "format": "date-time"},
        "parameters": {
            "type": "object",
            "required": ["schemes", "workload", "fault", "trials", "seed"],
            "properties": {
                "schemes": {"type": "array", "items": _NAME},
                "workload": _NAME,
                "fault": _NAME,
                "trials": {"type": "integer", "minimum": 1},
                "seed": {"type": "integer"},
            },
        },
        "environment": {"type": "object", "required": ["python", "crashbench"]},
        "trials": {"type": "array", "items": TRIAL_SCHEMA},
        # present only when the run was stopped before its last trial (absent: complete)
        "incomplete": {
            "type": "object",
            "required": ["reason", "trials_run", "trials_planned"],
            "properties": {"reason": _NAME, "trials_run": _COUNT, "trials_planned": _COUNT},
        },
    },
    "if": {"properties": {"schema_version": {"const": 2}}},
    "then": {"properties": {"trials": {"items": {"required": V2_FIELDS}}}},
}


# --- validation ------------------------------------------------------------------------------


def validate(run: dict) -> None:
    """Raise ResultsError naming the first offending field (as a path like
    ``trials[2].cache``) when ``run`` does not match RUN_SCHEMA or two trials share an id."""
    if isinstance(run, dict) and run.get("schema_version") not in (None, *READS):
        raise ResultsError(
            f"schema_version {run['schema_version']!r}: this crashbench reads "
            f"schema_version {' and '.join(map(str, READS))} only"
        )
    errors = sorted(
        jsonschema.Draft202012Validator(RUN_SCHEMA).iter_errors(run),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        e = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ResultsError(f"{_field(e)}: {_problem(e)}{more}")
    seen: set[str] = set()
    for i, t in enumerate(run["trials"]):
        if t["id"] in seen:
            raise ResultsError(f"trials[{i}].id: {t['id']!r} is used by an earlier trial")
        seen.add(t["id"])


def _field(e: jsonschema.ValidationError) -> str:
    path = ""
    for p in e.absolute_path:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else str(p))
    if e.validator == "required":  # name the missing field itself, not its parent
        missing = e.message.split("'")[1] if "'" in e.message else ""
        path = f"{path}.{missing}" if path else missing
    return path or "run"


def _problem(e: jsonschema.ValidationError) -> str:
    if e.validator == "required":
        return "missing (a required field)"
    return e.message


# --- writing ---------------------------------------------------------------------------------


def new_run_dir(
    root: str | Path = "results",
    run_id: str | None = None,
    schemes: Iterable[str] = (),
    workload: str | None = None,
) -> Path:
    """Create and return ``root/<run id>``; the id is the given one, or the local time
    (``YYYYmmdd-HHMMSS``) followed by the schemes and the workload when given, e.g.
    ``20261123-142501-orthros-reboot-files``. Creating it claims the id: a second run in
    the same second gets ``-2``, ``-3``, ..."""
    root = Path(root)
    base = run_id or "-".join(
        [time.strftime("%Y%m%d-%H%M%S"), *schemes, *([workload] if workload else [])]
    )
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        d = root / (base if n == 1 else f"{base}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            if run_id is not None:
                raise ResultsError(f"{d}: a result directory of that name exists") from None
    raise ResultsError(f"{root}: no free run id after {base}-999")


def write_run(
    dir: str | Path,
    parameters: dict,
    environment: dict,
    trials: list[dict],
    incomplete: dict | None = None,
) -> Path:
    """Validate, then atomically (re)write ``dir/run.json``; return its path. Rewriting
    keeps the first write's ``created`` (the driver rewrites after every trial).
    ``incomplete`` (see ``stopped``) marks a run stopped before its last trial."""
    d = Path(dir)
    run = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "run_id": d.name,
        "created": _created(d / RUN_FILE),
        "parameters": parameters,
        "environment": environment,
        "trials": trials,
        **({"incomplete": incomplete} if incomplete else {}),
    }
    try:
        validate(run)
    except ResultsError as e:
        raise ResultsError(f"{d / RUN_FILE}: not written: {e}") from None
    path = write_atomic(d / RUN_FILE, json.dumps(run, indent=2, allow_nan=False) + "\n")
    write_csv(d, trials)
    return path


# The per-trial CSV's columns: (column, path of the field in the trial record). A column
# may be added; docs/RESULTS.md, "trials.csv", lists them.
CSV_COLUMNS = (
    ("id", "id"),
    ("scheme", "scheme"),
    ("workload", "workload"),
    ("fault", "fault"),
    ("trial", "trial"),
    ("seed", "seed"),
    ("recovered", "recovered"),
    ("error", "error"),
    ("downtime_s", "downtime_s"),
    ("downtime_max_s", "downtime_max_s"),
    ("outage_s", "outage_s"),
    ("detected_by", "detected_by"),
    ("time_to_90pct_s", "time_to_90pct_s"),
    ("time_to_99pct_s", "time_to_99pct_s"),
    ("lost_ops", "lost_ops"),
    ("lost_service_s", "lost_service_s"),
    ("lost_censored", "lost_censored"),
    ("client_gap_s", "client_gap_s"),
    ("p50_before_s", "latency.before.p50_s"),
    ("p99_before_s", "latency.before.p99_s"),
    ("p50_after_s", "latency.after.p50_s"),
    ("p99_after_s", "latency.after.p99_s"),
    ("hit_ratio_before", "cache_hits.before"),
    ("hit_ratio_after", "cache_hits.after"),
    ("acked_writes", "acked_writes"),
    ("lost_writes", "lost_writes"),
    ("corrupted_writes", "corrupted_writes"),
    ("lost_bytes", "lost_bytes"),
    ("unverified_keys", "unverified_keys"),
    *((k, f"cache.{k}") for k in CACHE_KEYS),
    ("pre_crash_ops_per_s", "throughput.pre_crash_mean"),
    ("bin_s", "throughput.bin_s"),
    ("history", "history"),
)


def write_csv(dir: str | Path, trials: list[dict]) -> Path:
    """Atomically (re)write ``dir/trials.csv``: a header of ``CSV_COLUMNS``, then one line
    per trial in run order. Empty: null (or absent); ``true``/``false``: booleans; numbers
    as Python writes them, so a float reads back exactly."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(name for name, _ in CSV_COLUMNS)
    for t in trials:
        w.writerow(_csv_cell(_field_at(t, path)) for _, path in CSV_COLUMNS)
    return write_atomic(Path(dir) / CSV_FILE, buf.getvalue())


def _field_at(record: dict, path: str):
    for part in path.split("."):
        record = record.get(part) if isinstance(record, dict) else None
    return record


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def stopped(signal_name: str, trials_run: int, trials_planned: int) -> dict:
    """The ``incomplete`` marker of a run stopped by a signal after ``trials_run`` trials."""
    return {
        "reason": f"interrupted by {signal_name}",
        "trials_run": trials_run,
        "trials_planned": trials_planned,
    }


def incomplete_line(run: dict) -> str | None:
    """One line saying the run is incomplete and why; None for a complete run."""
    inc = run.get("incomplete")
    if not inc:
        return None
    return (
        f"INCOMPLETE run {run['run_id']}: {inc['reason']} after {inc['trials_run']} of "
        f"{inc['trials_planned']} planned trials; its figures rest on those only"
    )


def _created(path: Path) -> str:
    try:
        old = json.loads(path.read_text())
        if isinstance(old, dict) and isinstance(old.get("created"), str):
            return old["created"]
    except (OSError, ValueError):
        pass
    return datetime.now().astimezone().isoformat(timespec="seconds")


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write a temporary file beside ``path``, flush it to disk, rename it over ``path``:
    readers (and a crash of ours) see the old file or the new one, never half of one."""
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_pyperf(dir: str | Path, trials: list[dict]) -> Path | None:
    """Write ``dir/downtime.pyperf.json``: one pyperf benchmark per (scheme, workload,
    fault), named ``downtime-<scheme>-<workload>-<fault>``, one pyperf run per recovered
    trial holding its ``downtime_s``. Groups without a recovered trial have no benchmark
    (pyperf needs values > 0); with none at all nothing is written and None returned."""
    import pyperf

    groups: dict[str, list[dict]] = {}
    for t in trials:
        if t.get("recovered") and t.get("downtime_s"):
            groups.setdefault(f"downtime-{t['scheme']}-{t['workload']}-{t['fault']}", []).append(t)
    path = Path(dir) / PYPERF_FILE
    if not groups:
        path.unlink(missing_ok=True)  # an old file would describe other trials
        return None
    benches = [pyperf.Benchmark([_pyperf_run(name, t) for t in ts]) for name, ts in groups.items()]
    return dump_pyperf(path, pyperf.BenchmarkSuite(benches))


def dump_pyperf(path: Path, suite) -> Path:
    """A pyperf BenchmarkSuite in pyperf's own JSON, written atomically (write_atomic)."""
    buf = io.StringIO()
    suite.dump(buf)
    return write_atomic(path, buf.getvalue())


def _pyperf_run(name: str, t: dict):
    import pyperf

    # pyperf's own collected metadata would describe this machine now, not the trial:
    # the trial's identity goes in instead; the environment is in run.json.
    meta = {
        "name": name,
        "unit": "second",
        "loops": 1,
        "description": f"client-observed downtime of trial {t['id']} (seed {t['seed']})",
    }
    return pyperf.Run([float(t["downtime_s"])], metadata=meta, collect_metadata=False)


def point_latest(dir: str | Path, root: str | Path | None = None) -> Path:
    """Make ``root/latest`` (root: the run directory's parent) a relative symlink to the
    run directory: a new link under a temporary name renamed over the old one, so
    ``latest`` always names a complete run."""
    d = Path(dir)
    root = Path(root) if root is not None else d.parent
    link = root / LATEST
    if link.exists() and not link.is_symlink():
        raise ResultsError(f"{link}: exists and is not a symlink; not replaced")
    tmp = root / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(d.resolve(), root.resolve()), tmp)
    os.replace(tmp, link)
    return link


# --- reading ---------------------------------------------------------------------------------


def load_run(dir: str | Path) -> dict:
    """The validated run of a result directory (or of a run.json path); a ResultsError
    naming the file and the problem otherwise."""
    p = Path(dir)
    f = p if p.name == RUN_FILE and not p.is_dir() else p / RUN_FILE
    if not f.parent.is_dir():
        raise ResultsError(f"{f.parent}: no such result directory")
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{f}: missing; not a result directory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{f}: unreadable: {getattr(e, 'strerror', None) or e}") from None
    try:
        run = json.loads(text)
    except ValueError as e:
        raise ResultsError(f"{f}: not JSON: {e}") from None
    try:
        validate(run)
    except ResultsError as e:
        raise ResultsError(f"{f}: {e}") from None
    return run


# --- the environment a run records -----------------------------------------------------------


def environment() -> dict:
    """What a result depends on besides its parameters: versions and the machine's size."""
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "crashbench": _version("crashbench"),
        "crashbench_commit": _commit(),
        "numpy": _version("numpy"),
        "os": platform.system(),
        "kernel_release": platform.release(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The source's git commit, with ``-dirty`` when it has uncommitted changes."""
    src = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
