"""Result directories: run.json's schema (pinned by golden files), atomic writes, `latest`,
the pyperf file as pyperf itself reads it, and clear errors for bad directories."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import results
from harness.results import ResultsError

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_RUN = GOLDEN / "20261123-142501-orthros-reboot-files"


def golden() -> dict:
    """The golden run, stored as schema_version 1, as a version 2 run: the figures version
    2 adds are unknown (null, or no bins)."""
    run = json.loads((GOLDEN_RUN / "run.json").read_text())
    run["schema_version"] = 2
    for t in run["trials"]:
        t.update(
            time_to_99pct_s=None,
            lost_ops=None,
            lost_service_s=None,
            client_gap_s=None,
            latency={k: {"n": 0, "p50_s": None, "p99_s": None} for k in ("before", "after")},
            recovery={
                "bin_s": 0.1,
                "bins": [],
                "pre_crash_mean": None,
                "recovered_at": None,
                "first_ok_after_s": None,
            },
            cache_hits={"bin_s": 0.5, "bins": [], "before": None, "after": None},
        )
    return run


def write(d: Path, run: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return results.write_run(d, run["parameters"], run["environment"], run["trials"])


def test_golden_run_is_valid_and_the_schema_is_pinned():
    run = results.load_run(GOLDEN_RUN)
    assert run["schema_version"] == 1 and run["kind"] == "crashbench run"
    assert [t["scheme"] for t in run["trials"]].count("orthros") == 3
    # Changing RUN_SCHEMA means changing this file too, and deciding whether the change
    # needs schema_version 3 (docs/RESULTS.md, "schema_version").
    assert results.RUN_SCHEMA == json.loads((GOLDEN / "run-schema-v2.json").read_text())


def test_version_2_requires_the_recovery_figures_and_version_1_runs_still_load(tmp_path):
    assert results.load_run(GOLDEN_RUN)["schema_version"] == 1  # has none of them
    v2 = golden()
    del v2["trials"][2]["lost_service_s"]
    with pytest.raises(ResultsError, match=r"trials\[2\]\.lost_service_s: missing"):
        write(tmp_path / "r", v2)
    assert not (tmp_path / "r" / "run.json").exists()


def test_write_run_round_trips_the_golden_run_and_keeps_created(tmp_path):
    g = golden()
    d = tmp_path / g["run_id"]
    write(d, g)
    first = json.loads((d / "run.json").read_text())
    assert {k: v for k, v in first.items() if k != "created"} == {
        k: v for k, v in g.items() if k != "created"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", first["created"])
    write(d, g)  # the driver rewrites after every trial
    assert json.loads((d / "run.json").read_text())["created"] == first["created"]
    assert sorted(p.name for p in d.iterdir()) == ["run.json", "trials.csv"]  # no temporary


@pytest.mark.parametrize(
    "path, field",
    [
        (["trials", 1, "downtime_s"], "trials[1].downtime_s"),
        (["trials", 0, "scheme"], "trials[0].scheme"),
        (["trials", 4, "cache", "pages_recovered"], "trials[4].cache.pages_recovered"),
        (["trials", 2, "throughput", "bins"], "trials[2].throughput.bins"),
    ],
)
def test_schema_rejects_a_record_missing_a_field_naming_it_and_writes_nothing(
    tmp_path, path, field
):
    g = golden()
    obj = g
    for p in path[:-1]:
        obj = obj[p]
    del obj[path[-1]]
    with pytest.raises(ResultsError) as e:
        write(tmp_path / "r", g)
    assert f"{field}: missing" in str(e.value)
    assert "run.json: not written" in str(e.value)
    assert not any((tmp_path / "r").iterdir())


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda g: g["trials"][0].update(recovered="yes"), "trials[0].recovered"),
        (lambda g: g["trials"][3].update(lost_bytes=-1), "trials[3].lost_bytes"),
        (lambda g: g["trials"][0].update(history="../etc/passwd"), "trials[0].history"),
        (lambda g: g["parameters"].update(trials=0), "parameters.trials"),
        (lambda g: g["trials"][1].update(id=g["trials"][0]["id"]), "trials[1].id"),
    ],
)
def test_schema_names_the_wrong_field(tmp_path, change, field):
    g = golden()
    change(g)
    with pytest.raises(ResultsError, match=re.escape(field)):
        write(tmp_path / "r", g)
    assert not (tmp_path / "r" / "run.json").exists()


def test_an_existing_run_json_is_kept_when_a_rewrite_is_invalid(tmp_path):
    g = golden()
    write(tmp_path / "r", g)
    before = (tmp_path / "r" / "run.json").read_bytes()
    bad = copy.deepcopy(g)
    bad["trials"][0]["recovered"] = None
    with pytest.raises(ResultsError):
        write(tmp_path / "r", bad)
    assert (tmp_path / "r" / "run.json").read_bytes() == before


def test_load_run_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(ResultsError, match="no such result directory"):
        results.load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match=r"empty/run.json: missing"):
        results.load_run(tmp_path / "empty")
    (tmp_path / "dir" / "run.json").mkdir(parents=True)
    with pytest.raises(ResultsError, match=r"dir/run.json: unreadable"):
        results.load_run(tmp_path / "dir")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "run.json").write_text("{not json")
    with pytest.raises(ResultsError, match=r"text/run.json: not JSON"):
        results.load_run(tmp_path / "text")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "run.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ResultsError, match=r"bin/run.json: unreadable"):
        results.load_run(tmp_path / "bin")
    newer = golden()
    newer["schema_version"] = 3
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "run.json").write_text(json.dumps(newer))
    with pytest.raises(
        ResultsError,
        match=r"v3/run.json: schema_version 3: .* reads "
        r"schema_version 1 and 2 only",
    ):
        results.load_run(tmp_path / "v3")


def test_new_run_dir_names_runs_by_time_schemes_and_workload(tmp_path):
    d = results.new_run_dir(tmp_path, schemes=["orthros", "reboot"], workload="files")
    assert d.is_dir() and re.fullmatch(r"\d{8}-\d{6}-orthros-reboot-files", d.name)
    same = results.new_run_dir(tmp_path, run_id=None, schemes=["x"])
    again = results.new_run_dir(tmp_path, run_id=None, schemes=["x"])
    assert same != again and again.is_dir()
    assert results.new_run_dir(tmp_path, run_id="mine") == tmp_path / "mine"
    with pytest.raises(ResultsError, match="exists"):
        results.new_run_dir(tmp_path, run_id="mine")


def test_latest_is_a_relative_symlink_replaced_atomically(tmp_path):
    a, b = results.new_run_dir(tmp_path, "a"), results.new_run_dir(tmp_path, "b")
    link = results.point_latest(a)
    assert link == tmp_path / "latest" and os.readlink(link) == "a"
    results.point_latest(b)
    assert os.readlink(link) == "b" and link.resolve() == b.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "latest"]
    shutil.rmtree(tmp_path / "b")
    link.unlink()
    (tmp_path / "latest").mkdir()
    with pytest.raises(ResultsError, match="not a symlink"):
        results.point_latest(a)


def test_environment_records_versions_and_the_machine_size():
    env = results.environment()
    for k in ("python", "crashbench", "numpy", "kernel_release", "cpu_count", "memory_bytes"):
        assert k in env
    assert env["python"].startswith("3.") and env["cpu_count"] >= 1
    json.dumps(env)  # recordable as it is


def pyperf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyperf", *args], capture_output=True, text=True, timeout=120
    )


def test_pyperf_file_is_read_by_pyperf_stats_and_compare_to(tmp_path):
    g = golden()
    old = results.write_pyperf(tmp_path, g["trials"])
    assert old == tmp_path / "downtime.pyperf.json"
    p = pyperf("stats", str(old))
    assert p.returncode == 0, p.stderr
    assert "downtime-orthros-files-panic" in p.stdout and "downtime-reboot-files-panic" in p.stdout
    assert "412 ms" in p.stdout  # orthros's median downtime, as in the report
    slower = copy.deepcopy(g["trials"])
    for t in slower:
        t["downtime_s"] *= 3
    (tmp_path / "new").mkdir()
    new = results.write_pyperf(tmp_path / "new", slower)
    p = pyperf("compare_to", str(old), str(new))
    assert p.returncode == 0, p.stderr
    assert "3.00x slower" in p.stdout


def test_pyperf_counts_recovered_trials_only(tmp_path):
    trials = golden()["trials"]
    for t in trials:
        if t["scheme"] == "reboot":
            t.update(recovered=False, downtime_s=None)
    results.write_pyperf(tmp_path, trials)
    import pyperf as pp

    suite = pp.BenchmarkSuite.load(str(tmp_path / "downtime.pyperf.json"))
    assert suite.get_benchmark_names() == ["downtime-orthros-files-panic"]
    assert sorted(suite.get_benchmark("downtime-orthros-files-panic").get_values()) == [
        0.388,
        0.412,
        0.451,
    ]
    for t in trials:
        t.update(recovered=False, downtime_s=None)
    assert results.write_pyperf(tmp_path, trials) is None
    assert not (tmp_path / "downtime.pyperf.json").exists()


def test_an_incomplete_run_is_marked_and_old_files_without_the_mark_still_load(tmp_path):
    g = golden()
    d = tmp_path / "r"
    d.mkdir()
    results.write_run(
        d,
        g["parameters"],
        g["environment"],
        g["trials"][:2],
        incomplete=results.stopped("SIGTERM", 2, 6),
    )
    run = results.load_run(d)
    assert run["incomplete"] == {
        "reason": "interrupted by SIGTERM",
        "trials_run": 2,
        "trials_planned": 6,
    }
    assert "INCOMPLETE" in results.incomplete_line(run) and "2 of 6" in results.incomplete_line(run)
    assert "incomplete" not in results.load_run(GOLDEN_RUN)  # schema_version 1 unchanged
    assert results.incomplete_line(results.load_run(GOLDEN_RUN)) is None
    bad = dict(
        g, incomplete={"reason": "interrupted by SIGINT", "trials_run": -1, "trials_planned": 6}
    )
    with pytest.raises(ResultsError, match=re.escape("incomplete.trials_run")):
        results.validate(bad)


# --- trials.csv: the per-trial figures beside run.json ---------------------------------------


def _columns_documented() -> list[str]:
    """The column names of docs/RESULTS.md's trials.csv table, in order."""
    doc = (Path(__file__).parent.parent / "docs" / "RESULTS.md").read_text()
    section = doc.split("### trials.csv", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)


def _same(cell: str, value) -> bool:
    """A CSV cell read back as the run.json value it was written from."""
    if value is None:
        return cell == ""
    if isinstance(value, bool):
        return cell == ("true" if value else "false")
    if isinstance(value, (int, float)):
        return type(value)(cell) == value
    return cell == value


def test_trials_csv_reads_back_as_run_json(tmp_path):
    import csv

    g = golden()
    g["trials"][1].update(
        recovered=False,
        downtime_s=None,
        lost_bytes=None,
        error='DriverError: a, "quoted"\nand a second line',
    )
    write(tmp_path / "r", g)
    run = results.load_run(tmp_path / "r")
    with open(tmp_path / "r" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [c for c, _ in results.CSV_COLUMNS] == _columns_documented()
    assert [r["id"] for r in rows] == [t["id"] for t in run["trials"]]
    for row, t in zip(rows, run["trials"]):
        for column, path in results.CSV_COLUMNS:
            value = t
            for part in path.split("."):
                value = value.get(part)
            assert _same(row[column], value), (t["id"], column, row[column], value)
    assert rows[1]["error"].endswith("second line") and rows[1]["recovered"] == "false"
    assert rows[0]["pages_recovered"] == "2048" and rows[0]["lost_bytes"] == "0"


def test_report_writes_the_csv_of_an_existing_run(tmp_path):
    from typer.testing import CliRunner

    from harness.cli import app

    d = tmp_path / "r"
    shutil.copytree(GOLDEN_RUN, d)
    assert not (d / "trials.csv").exists()
    r = CliRunner().invoke(app, ["report", str(d)])
    assert r.exit_code == 0, r.output
    lines = (d / "trials.csv").read_text().splitlines()
    assert len(lines) == 1 + len(golden()["trials"])


# --- command output as JSON (--json): one document on stdout, pinned by golden files ----------

OUTPUT = GOLDEN / "json-output"
GOLDEN_OVERHEAD = GOLDEN / "20261205-124500-overhead"


def _cli(*args: str):
    from typer.testing import CliRunner

    from harness.cli import app

    return CliRunner().invoke(app, list(args))


def _one_document(stdout: str) -> dict:
    """stdout must be one JSON document and nothing else (json.loads refuses trailing text)."""
    doc = json.loads(stdout)
    assert stdout.lstrip().startswith("{") and stdout.rstrip().endswith("}")
    return doc


def _matches_golden(name: str, doc: dict) -> None:
    """``doc`` equals tests/golden/json-output/<name>.json (CRASHBENCH_WRITE_GOLDEN=1
    rewrites it: then review the diff — a changed shape may need a schema_version bump)."""
    path = OUTPUT / f"{name}.json"
    if os.environ.get("CRASHBENCH_WRITE_GOLDEN") == "1":
        path.write_text(json.dumps(doc, indent=2) + "\n")
    assert doc == json.loads(path.read_text())


def test_json_output_schemas_are_pinned():
    from harness.commands import output

    # Changing a schema means changing this file too, and deciding on a version bump.
    assert output.SCHEMAS == json.loads((GOLDEN / "json-output-schemas-v1.json").read_text())
    assert set(output.SCHEMAS) == {"list", "run", "report", "compare", "overhead"}


def test_list_json_is_one_versioned_document_naming_what_it_always_named():
    r = _cli("list", "--json")
    assert r.exit_code == 0 and r.stderr == "", r.output
    doc = _one_document(r.stdout)
    golden_doc = json.loads((OUTPUT / "list.json").read_text())
    assert {k: doc[k] for k in ("schema_version", "kind")} == {
        "schema_version": 1,
        "kind": "crashbench list --json",
    }
    for section in ("schemes", "workloads", "faults"):  # names may be added, never lost
        assert set(golden_doc[section]) <= set(doc[section]), section
        assert all(isinstance(v, str) and v for v in doc[section].values())


def test_report_json_matches_the_golden_file(tmp_path):
    d = tmp_path / GOLDEN_RUN.name
    shutil.copytree(GOLDEN_RUN, d)
    r = _cli("report", str(d), "--json")
    assert r.exit_code == 0, r.output
    doc = _one_document(r.stdout)
    assert doc["dir"] == str(d) and all((d / f).is_file() for f in doc["files"])
    _matches_golden("report", {**doc, "dir": "DIR"})


def test_compare_json_matches_the_golden_file_and_keeps_its_exit_status(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(GOLDEN_RUN, old)
    g = golden()
    for t in [t for t in g["trials"] if t["scheme"] == "orthros"][:2]:  # its median: infinite
        t.update(
            recovered=False,
            downtime_s=None,
            downtime_max_s=None,
            time_to_90pct_s=None,
            lost_writes=None,
            corrupted_writes=None,
            lost_bytes=None,
        )
    write(new, g)
    r = _cli("compare", str(old), str(new), "--json")
    assert r.exit_code == 1, r.output
    doc = _one_document(r.stdout)
    assert doc["exit_code"] == 1
    assert doc["rows"][0]["median_new"] == doc["rows"][0]["ratio"] == "inf"  # JSON has no ∞
    assert doc["categorical"][0]["new"] == {"count": 1, "of": 3}
    _matches_golden("compare", {**doc, "old": "OLD", "new": "NEW"})


def test_run_and_overhead_json_match_their_golden_files(tmp_path, capsys):
    """The documents `run --json` and `overhead --json` print, built from the golden result
    directories as the commands build them (the commands themselves need root: their
    end-to-end tests are in test_run.py and test_overhead.py)."""
    from harness import overhead, report
    from harness.commands import output

    d = tmp_path / GOLDEN_RUN.name
    shutil.copytree(GOLDEN_RUN, d)
    run = results.load_run(d)
    files = report.write_report(d) + [results.write_csv(d, run["trials"])]
    output.emit("run", {**output.summary_body(d, run, files), "exit_code": 0, "failed_trials": []})
    _matches_golden("run", {**_one_document(capsys.readouterr().out), "dir": "DIR"})
    doc = overhead.load(GOLDEN_OVERHEAD)
    output.emit("overhead", output.overhead_body(GOLDEN_OVERHEAD, doc, ["overhead.json"], 0))
    _matches_golden("overhead", {**_one_document(capsys.readouterr().out), "dir": "DIR"})


def test_a_document_that_does_not_match_its_schema_is_never_printed(capsys):
    from harness.commands import output

    with pytest.raises(ValueError, match="exit_code"):
        output.emit(
            "compare",
            {
                "old": "a",
                "new": "b",
                "threshold": 0.1,
                "alpha": 0.05,
                "exit_code": 3,
                "rows": [],
                "categorical": [],
                "notes": [],
            },
        )
    assert capsys.readouterr().out == ""
