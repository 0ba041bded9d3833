"""`compare` and `crashbench compare`: worse only when significantly worse AND beyond the
threshold; exit 1 on a slower result set, 0 on identical ones, 2 on bad input."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.test_results import golden
from harness import compare, results
from harness.cli import app

GOLDEN_RUN = Path(__file__).parent / "golden" / "20261123-142501-orthros-reboot-files"
runner = CliRunner()


def synthetic(n: int, factor: float = 1.0, lost_factor: float = 1.0) -> dict:
    """The golden run stretched to ``n`` trials a scheme, with a little spread, its
    downtime and time to 90 % multiplied by ``factor``, its lost bytes by ``lost_factor``."""
    g = golden()
    trials = []
    for scheme in ("orthros", "reboot"):
        base = [t for t in g["trials"] if t["scheme"] == scheme]
        for i in range(n):
            t = copy.deepcopy(base[i % len(base)])
            spread = 1 + 0.01 * i
            t.update(trial=i, seed=1 + i, id=f"{scheme}-files-panic-{i}",
                     history=f"history-{scheme}-files-panic-{i}.jsonl",
                     downtime_s=round(t["downtime_s"] * spread * factor, 6),
                     time_to_90pct_s=t["time_to_90pct_s"] * factor,
                     lost_bytes=int(t["lost_bytes"] * lost_factor))
            trials.append(t)
    g["parameters"]["trials"] = n
    g["trials"] = trials
    return g


def save(tmp_path: Path, name: str, run: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    results.write_run(d, run["parameters"], run["environment"], run["trials"])
    return d


def verdicts(c: compare.Comparison) -> dict:
    return {(r.scheme, r.metric): r.verdict for r in c.rows}


def test_three_times_slower_with_five_trials_is_worse_and_exits_1(tmp_path):
    old, new = save(tmp_path, "old", synthetic(5)), save(tmp_path, "new", synthetic(5, 3.0))
    c = compare.compare(results.load_run(old), results.load_run(new))
    v = verdicts(c)
    assert v[("orthros", "downtime_s")] == v[("reboot", "downtime_s")] == "worse"
    assert v[("orthros", "time_to_90pct_s")] == "worse"
    assert v[("orthros", "lost_bytes")] == "same"        # 0 before, 0 after
    assert c.exit_code == 1
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 1, r.output
    assert "worse" in r.stdout and "orthros" in r.stdout
    back = runner.invoke(app, ["compare", str(new), str(old)])     # the other way: better
    assert back.exit_code == 0, back.output
    assert "better" in back.stdout


def test_identical_runs_are_the_same_and_exit_0(tmp_path):
    old, new = save(tmp_path, "old", synthetic(5)), save(tmp_path, "new", synthetic(5))
    c = compare.compare(results.load_run(old), results.load_run(new))
    assert set(verdicts(c).values()) == {"same"} and c.exit_code == 0
    assert all(r.ratio == 1.0 for r in c.rows)
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 0, r.output
    assert "no metric significantly worse" in r.stdout


def test_three_trials_cannot_be_significant_and_say_so():
    c = compare.compare(synthetic(3), synthetic(3, 3.0))
    row = next(r for r in c.rows if r.metric == "downtime_s")
    assert row.ratio > 2.9 and row.min_p == pytest.approx(0.05)
    assert row.verdict == "same" and "too few trials" in row.note
    assert c.exit_code == 0


def test_significant_but_within_the_threshold_is_the_same():
    c = compare.compare(synthetic(8), synthetic(8, 1.05), threshold=0.10)
    row = next(r for r in c.rows if (r.scheme, r.metric) == ("reboot", "time_to_90pct_s"))
    assert row.p_worse < 0.05 and row.ratio == pytest.approx(1.05)
    assert row.verdict == "same"
    assert compare.compare(synthetic(8), synthetic(8, 1.05), threshold=0.02).exit_code == 1


def test_more_lost_bytes_from_zero_is_worse():
    old, new = synthetic(6), synthetic(6)
    for t in new["trials"]:
        t["lost_bytes"] = 4096 + t["trial"]
    row = next(r for r in compare.compare(old, new).rows
               if (r.scheme, r.metric) == ("orthros", "lost_bytes"))
    assert row.median_old == 0 and math.isinf(row.ratio) and row.verdict == "worse"


def test_a_scheme_that_stops_recovering_is_worse_not_faster():
    old, new = synthetic(6), synthetic(6)
    for t in new["trials"]:
        if t["scheme"] == "orthros":
            t.update(recovered=False, downtime_s=None, time_to_90pct_s=None)
    v = verdicts(compare.compare(old, new))
    assert v[("orthros", "downtime_s")] == v[("orthros", "time_to_90pct_s")] == "worse"


def test_groups_in_one_run_only_are_noted_not_compared():
    old, new = synthetic(5), synthetic(5)
    new["trials"] = [t for t in new["trials"] if t["scheme"] == "orthros"]
    c = compare.compare(old, new)
    assert {r.scheme for r in c.rows} == {"orthros"}
    assert c.notes == ["reboot/files/panic: only in the old run, not compared"]


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0"], "--threshold: must be a positive"),
    (["--threshold", "-0.1"], "--threshold: must be a positive"),
    (["--alpha", "1"], "--alpha: must be between 0 and 1"),
])
def test_bad_options_exit_2(tmp_path, args, message):
    d = save(tmp_path, "a", synthetic(3))
    r = runner.invoke(app, ["compare", str(d), str(d), *args])
    assert r.exit_code == 2 and r.stderr.startswith("crashbench: ") and message in r.stderr


def test_an_unreadable_result_dir_exits_2_naming_it(tmp_path):
    good = save(tmp_path, "good", synthetic(3))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text('{"schema_version": 1}')
    r = runner.invoke(app, ["compare", str(good), str(tmp_path / "bad")])
    assert r.exit_code == 2
    assert "bad/run.json" in r.stderr and "kind: missing" in r.stderr
    r = runner.invoke(app, ["compare", str(tmp_path / "gone"), str(good)])
    assert r.exit_code == 2 and "no such result directory" in r.stderr
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["run.json"]


def test_an_incomplete_side_is_named_and_does_not_change_the_exit_code(tmp_path):
    stopped = synthetic(5)
    stopped["incomplete"] = results.stopped("SIGTERM", 10, 12)
    old = save(tmp_path, "old", synthetic(5))
    new = tmp_path / "new"
    new.mkdir()
    results.write_run(new, stopped["parameters"], stopped["environment"], stopped["trials"],
                      incomplete=stopped["incomplete"])
    c = compare.compare(results.load_run(old), results.load_run(new))
    assert [n for n in c.notes if "INCOMPLETE" in n] == \
        ["new side: INCOMPLETE run new: interrupted by SIGTERM after 10 of 12 planned trials; "
         "its figures rest on those only"]
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 0, r.output
    assert "new side: INCOMPLETE run new" in " ".join(r.stdout.split())
