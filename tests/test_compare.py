"""`compare` and `crashbench compare`: worse only when significantly worse AND beyond the
threshold; exit 1 on a slower result set, and on a categorical regression (fewer trials
recovered, writes lost or corrupted, a checker finding) at any trial count; 0 on
identical ones, 2 on bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness import compare, results
from harness.cli import app
from tests.test_results import golden

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
            t.update(
                trial=i,
                seed=1 + i,
                id=f"{scheme}-files-panic-{i}",
                history=f"history-{scheme}-files-panic-{i}.jsonl",
                downtime_s=round(t["downtime_s"] * spread * factor, 6),
                time_to_90pct_s=t["time_to_90pct_s"] * factor,
                lost_bytes=int(t["lost_bytes"] * lost_factor),
            )
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
    assert v[("orthros", "lost_bytes")] == "same"  # 0 before, 0 after
    assert c.exit_code == 1
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 1, r.output
    assert "worse" in r.stdout and "orthros" in r.stdout
    back = runner.invoke(app, ["compare", str(new), str(old)])  # the other way: better
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


def test_three_trials_cannot_be_significant_and_say_so_not_same(tmp_path):
    c = compare.compare(synthetic(3), synthetic(3, 3.0))
    row = next(r for r in c.rows if r.metric == "downtime_s")
    assert row.ratio > 2.9 and row.min_p == pytest.approx(0.05)
    assert row.verdict == "too few"
    assert row.note.startswith("3 trials: too few to judge timing at p < 0.05")
    assert c.exit_code == 0
    old, new = save(tmp_path, "old", synthetic(3)), save(tmp_path, "new", synthetic(3, 3.0))
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 0, r.output
    assert "3 trials: too few to judge timing at p < 0.05" in " ".join(r.stdout.split())
    timing = [
        line for line in r.stdout.splitlines() if "downtime s" in line or "time to 90" in line
    ]
    assert len(timing) == 4 and all("too few" in line and "same" not in line for line in timing)


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
    row = next(
        r
        for r in compare.compare(old, new).rows
        if (r.scheme, r.metric) == ("orthros", "lost_bytes")
    )
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


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "0"], "--threshold: must be a positive"),
        (["--threshold", "-0.1"], "--threshold: must be a positive"),
        (["--alpha", "1"], "--alpha: must be between 0 and 1"),
    ],
)
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
    results.write_run(
        new,
        stopped["parameters"],
        stopped["environment"],
        stopped["trials"],
        incomplete=stopped["incomplete"],
    )
    c = compare.compare(results.load_run(old), results.load_run(new))
    assert [n for n in c.notes if "INCOMPLETE" in n] == [
        "new side: INCOMPLETE run new: interrupted by SIGTERM after 10 of 12 planned trials; "
        "its figures rest on those only"
    ]
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 0, r.output
    assert "new side: INCOMPLETE run new" in " ".join(r.stdout.split())


# --- categorical regressions: judged whatever the number of trials ---------------------------


def _copy_of_golden(tmp_path: Path, name: str) -> tuple[Path, dict]:
    d = tmp_path / name
    d.mkdir()
    (d / "run.json").write_text((GOLDEN_RUN / "run.json").read_text())
    return d, json.loads((d / "run.json").read_text())


def _rewrite(d: Path, run: dict) -> Path:
    """The changed copy keeps the golden run's schema_version (1), which load_run reads."""
    (d / "run.json").write_text(json.dumps(run))
    return d


def test_one_trial_not_recovered_exits_1_at_three_trials(tmp_path):
    old, _ = _copy_of_golden(tmp_path, "old")
    new, run = _copy_of_golden(tmp_path, "new")
    t = next(t for t in run["trials"] if t["scheme"] == "orthros")
    t.update(
        recovered=False,
        downtime_s=None,
        downtime_max_s=None,
        time_to_90pct_s=None,
        lost_writes=None,
        corrupted_writes=None,
        lost_bytes=None,
    )
    _rewrite(new, run)
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 1, r.output
    assert (
        "regression orthros/files/panic: fewer trials recovered: 3/3 before, 2/3 now"
        in " ".join(r.stdout.split())
    )
    c = compare.compare(results.load_run(old), results.load_run(new))
    assert [(x.scheme, x.check) for x in c.regressions] == [("orthros", "recovered")]
    assert not c.worse  # no timing can be judged at 3 trials
    assert runner.invoke(app, ["compare", str(new), str(old)]).exit_code == 0  # better


@pytest.mark.parametrize("field", ["lost_writes", "corrupted_writes"])
def test_acknowledged_writes_lost_or_corrupted_where_there_were_none_exit_1(tmp_path, field):
    old, _ = _copy_of_golden(tmp_path, "old")
    new, run = _copy_of_golden(tmp_path, "new")
    next(t for t in run["trials"] if t["scheme"] == "orthros")[field] = 1
    _rewrite(new, run)
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 1, r.output
    assert f"{field.replace('_', ' ')}: none before, 1 now" in r.stdout
    # reboot loses writes in both runs by design: more of them is not categorical
    assert [
        c.check for c in compare.compare(results.load_run(old), results.load_run(new)).regressions
    ] == [field]


def test_a_checker_finding_where_there_was_none_exits_1(tmp_path):
    old, run = _copy_of_golden(tmp_path, "old")
    for t in run["trials"]:
        t["checks"] = {"bodies": {"served": 10, "mismatched": 0, "ok": True}}
    _rewrite(old, run)
    new, _ = _copy_of_golden(tmp_path, "new")
    run["trials"][4]["checks"]["bodies"].update(mismatched=1, ok=False)
    _rewrite(new, run)
    r = runner.invoke(app, ["compare", str(old), str(new)])
    assert r.exit_code == 1, r.output
    assert "checks.bodies: none before, 1 now" in r.stdout
    assert runner.invoke(app, ["compare", str(new), str(new)]).exit_code == 0  # had one before


def test_a_checker_without_a_verdict_is_not_a_finding(tmp_path):
    """A check that could not judge (ok null: nothing verified) counts neither way."""
    old = synthetic(3)
    new = copy.deepcopy(old)
    for t in new["trials"]:
        t["checks"] = {"bank": {"ok": None}}
    c = compare.compare(old, new)
    assert c.exit_code == 0
    bank = [x for x in c.categorical if x.check.startswith("checks.")]
    assert [(x.scheme, x.check, x.verdict) for x in bank] == [
        ("orthros", "checks.bank", "n/a"),
        ("reboot", "checks.bank", "n/a"),
    ]
