"""The report of a result directory and `crashbench report`: files, plots, the summary numbers
(the same as harness.stats gives), a self-contained HTML, and bad input refused."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness import report, results, stats
from harness.cli import app

GOLDEN_RUN = Path(__file__).parent / "golden" / "20261123-142501-orthros-reboot-files"
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["throughput", "cache-hits", "downtime", "phases"]
FILES = ["report.md", "report.html"] + [f"{n}.{x}" for n in FIGURES for x in ("png", "svg", "pdf")]


def golden_run() -> dict:
    """The golden run (schema_version 1) as a version 2 run, so its trials can be written."""
    from tests.test_results import golden

    return golden()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("report") / GOLDEN_RUN.name
    shutil.copytree(GOLDEN_RUN, d)
    files = report.write_report(d)
    assert [f.name for f in files] == FILES
    return d


def test_report_files_exist_and_the_plots_are_pngs(written):
    for name in FILES:
        assert (written / name).stat().st_size > 0, name
    for name in FIGURES:
        data = (written / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_report_html_is_self_contained(written):
    page = (written / "report.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched
    assert "<script" not in page and "<link" not in page and "@import" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(FIGURES)
    assert all(base64.b64decode(i).startswith(PNG) for i in images)


def test_summary_is_the_numbers_of_harness_stats(written):
    run = results.load_run(written)
    rows = {r["scheme"]: r for r in report.summary_rows(run)}
    assert rows["orthros"]["recovered"] == "3/3"
    assert rows["orthros"]["downtime s: median [95% CI]"] == "0.412 (no CI: n=3)"
    assert rows["reboot"]["downtime s: median [95% CI]"] == "2.702 (no CI: n=3)"
    assert rows["reboot"]["lost MiB: total (median)"] == "0.0469 (0.0156)"  # 49152 (16384) B
    assert rows["orthros"]["pages recovered: median"] == "2058"
    assert rows["reboot"]["time to 90% s: median [95% CI]"] == "4.000 (no CI: n=3)"
    md = (written / "report.md").read_text()
    for r in rows.values():  # the table printed is these rows
        assert "| " + " | ".join(r.values()) + " |" in md


def test_modeled_phases_are_labelled(written):
    for name in ("report.md", "report.html"):
        text = (written / name).read_text()
        assert "firmware (modeled)" in text
        assert "cache migration (modeled)" not in text


def test_with_six_trials_the_ci_is_shown_and_matches_stats(tmp_path):
    run = golden_run()
    extra = []
    for t in run["trials"]:
        u = copy.deepcopy(t)
        u.update(
            trial=t["trial"] + 3,
            id=f"{t['scheme']}-files-panic-{t['trial'] + 3}",
            downtime_s=round(t["downtime_s"] * 1.1, 4),
        )
        u["history"] = f"history-{u['id']}.jsonl"
        extra.append(u)
    run["trials"] += extra
    d = tmp_path / "six"
    d.mkdir()
    results.write_run(d, run["parameters"], run["environment"], run["trials"])
    down = [t["downtime_s"] for t in run["trials"] if t["scheme"] == "orthros"]
    m, lo, hi = stats.median_ci(down)
    s = next(s for s in report.summarize(results.load_run(d)) if s["label"] == "orthros")
    assert (s["downtime"]["median"], s["downtime"]["lo"], s["downtime"]["hi"]) == (m, lo, hi)
    row = report.summary_rows(results.load_run(d))[0]
    assert row["downtime s: median [95% CI]"] == f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def test_unrecovered_and_failed_trials_are_counted_not_hidden(tmp_path):
    run = golden_run()
    none = [t for t in run["trials"] if t["scheme"] == "reboot"]
    none[0].update(
        recovered=False,
        downtime_s=None,
        downtime_max_s=None,
        lost_bytes=None,
        lost_writes=None,
        corrupted_writes=None,
        time_to_90pct_s=None,
    )
    none[1].update(
        error="DriverError: the server never answered",
        recovered=False,
        downtime_s=None,
        phases={},
        modeled_phases=[],
    )
    d = tmp_path / "mixed"
    d.mkdir()
    results.write_run(d, run["parameters"], run["environment"], run["trials"])
    files = report.write_report(d)
    row = {r["scheme"]: r for r in report.summary_rows(results.load_run(d))}["reboot"]
    assert row["trials"] == "3 (1 failed)" and row["recovered"] == "1/3"
    assert row["lost MiB: total (median)"] == "0.0156 (0.0156), 1 unverified"
    assert "the server never answered" in (d / "report.md").read_text()
    assert all(f.stat().st_size > 0 for f in files)


def test_ranking_orders_schemes_and_says_when_the_cis_cannot_back_the_order(written):
    lines = report.ranking(report.summarize(results.load_run(written)))
    assert lines == [  # a schema_version 1 run has no work lost
        "Work lost (seconds of service), median, lower is better (equal medians: by "
        "downtime): orthros (no median), reboot (no median).",
        "Downtime, median, lower is better: 1. orthros 0.412 s, 2. reboot 2.702 s. "
        f"No neighbours are separated: a 95 % CI needs {stats.min_n()} values a scheme.",
    ]
    md = (written / "report.md").read_text()
    assert "## Ranking" in md and all(line in md for line in lines)


def _trials_of(template: dict, scheme: str, downtimes: list[float], lost: list[float] | None):
    out = []
    for i, d in enumerate(downtimes):
        t = copy.deepcopy(template)
        t.update(
            scheme=scheme,
            trial=i,
            id=f"{scheme}-files-panic-{i}",
            downtime_s=d,
            lost_service_s=None if lost is None else lost[i],
            history=f"history-{scheme}-files-panic-{i}.jsonl",
        )
        out.append(t)
    return out


def _ranking_of(
    tmp_path, per_scheme: dict[str, tuple[list[float], list[float] | None]]
) -> list[str]:
    """The ranking lines of a run made of the golden run's first trial, repeated per scheme
    with the given downtimes and work lost."""
    run = golden_run()
    trials = [
        t
        for s, (down, lost) in per_scheme.items()
        for t in _trials_of(run["trials"][0], s, down, lost)
    ]
    run["parameters"]["schemes"] = list(per_scheme)
    d = tmp_path / "ranked"
    d.mkdir()
    results.write_run(d, run["parameters"], run["environment"], trials)
    return report.ranking(report.summarize(results.load_run(d)))


def test_ranking_of_three_schemes_names_the_neighbours_the_cis_separate(tmp_path):
    lost, down = _ranking_of(
        tmp_path,
        {
            "reboot": ([2.0 + i / 10 for i in range(6)], [3.0 + i / 10 for i in range(6)]),
            "orthros": ([0.4 + i / 100 for i in range(6)], [0.1 + i / 100 for i in range(6)]),
            "warmcache": ([1.9 + i / 5 for i in range(6)], None),
        },
    )
    assert down.startswith(
        "Downtime, median, lower is better: 1. orthros 0.425 s, "
        "2. reboot 2.250 s, 3. warmcache 2.400 s."
    )
    assert down.endswith("Separated by disjoint 95 % CIs: orthros < reboot.")
    assert lost == (
        "Work lost (seconds of service), median, lower is better (equal medians: "
        "by downtime): 1. orthros 0.125 s, 2. reboot 3.250 s, warmcache (no "
        "median). Separated by disjoint 95 % CIs: orthros < reboot."
    )


def test_equal_work_lost_is_ranked_by_downtime_and_shares_a_rank_only_when_both_are_equal(tmp_path):
    lost, _ = _ranking_of(
        tmp_path,
        {
            "orthros": ([1.0, 1.5, 2.0], [2.0] * 3),
            "warmcache": ([1.0, 1.2, 2.0], [2.0] * 3),
            "reboot": ([1.0, 1.5, 2.0], [2.0] * 3),
        },
    )
    assert "1. warmcache 2.000 s, 2. orthros 2.000 s, 2. reboot 2.000 s." in lost


runner = CliRunner()


def test_report_command_prints_the_summary_and_where_the_files_are(tmp_path):
    d = tmp_path / "r"
    shutil.copytree(GOLDEN_RUN, d)
    r = runner.invoke(app, ["report", str(d)])
    assert r.exit_code == 0, r.output
    assert "orthros" in r.stdout and "0.412" in r.stdout and "2.702" in r.stdout
    assert str(d / "report.html") in r.stdout.replace("\n", "")
    assert all((d / f).exists() for f in FILES)
    flat = " ".join(r.stdout.split())
    assert "Downtime, median, lower is better: 1. orthros 0.412 s, 2. reboot 2.702 s." in flat


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "no such result directory"),
        (lambda d: d.mkdir(), "run.json: missing"),
        (lambda d: (d.mkdir(), (d / "run.json").write_text("[1, 2")), "run.json: not JSON"),
        (lambda d: (d.mkdir(), (d / "run.json").mkdir()), "run.json: unreadable"),
        (
            lambda d: (
                d.mkdir(),
                (d / "run.json").write_text(
                    (GOLDEN_RUN / "run.json")
                    .read_text()
                    .replace('"recovered": true', '"recovered": 1', 1)
                ),
            ),
            "trials[0].recovered: 1 is not of type 'boolean'",
        ),
    ],
)
def test_report_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, setup, message):
    d = tmp_path / "r"
    setup(d)
    before = sorted(p.name for p in d.iterdir()) if d.is_dir() else None
    r = runner.invoke(app, ["report", str(d)])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("crashbench: ") and message in r.stderr.replace("\n", " ")
    assert (sorted(p.name for p in d.iterdir()) if d.is_dir() else None) == before


def test_an_incomplete_run_says_so_first_in_both_reports_and_on_the_console(tmp_path):
    d = tmp_path / "r"
    shutil.copytree(GOLDEN_RUN, d)
    run = json.loads((d / "run.json").read_text())
    run["incomplete"] = results.stopped("SIGINT", len(run["trials"]), 9)
    (d / "run.json").write_text(json.dumps(run))
    r = runner.invoke(app, ["report", str(d)])
    assert r.exit_code == 0, r.output
    line = f"INCOMPLETE run {run['run_id']}: interrupted by SIGINT after 6 of 9 planned trials"
    assert line in " ".join(r.stdout.split())
    md = (d / "report.md").read_text()
    assert md.splitlines()[2].startswith(f"> **{line}")  # right under the title
    assert f'<p class="alert"><strong>{line}' in (d / "report.html").read_text()


def _piped(*args: str) -> str:
    """The command's stdout as a pipe gets it: no terminal, whatever COLUMNS says."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "60"}
    env.pop("FORCE_COLOR", None)
    p = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert p.returncode in (0, 1), p.stderr
    return p.stdout


def test_piped_tables_keep_every_figure_whole(tmp_path):
    """Without a terminal nothing is cut ("0.41…") or wrapped: every cell of the summary
    and of compare's tables is whole on one line."""
    d = tmp_path / "r"
    shutil.copytree(GOLDEN_RUN, d)
    lines = _piped("report", str(d)).splitlines()
    for row in report.summary_rows(results.load_run(d)):
        for cell in row.values():
            assert any(cell in line for line in lines), cell
    out = _piped("compare", str(GOLDEN_RUN), str(d))
    assert "…" not in out
    from harness.commands.results import _g, _mib
    from harness.compare import compare

    c = compare(results.load_run(GOLDEN_RUN), results.load_run(d))
    for r in c.rows:
        fmt = _mib if r.metric == "lost_bytes" else _g
        cells = [r.scheme, fmt(r.median_old), fmt(r.median_new), _g(r.p_worse, "{:.3g}"), r.verdict]
        assert any(all(c in line for c in cells) for line in out.splitlines()), cells


def test_every_command_prints_its_tables_through_the_uncut_console():
    """The lab's and the file-system commands' tables (status, crash reports, bench fs,
    bench failover) keep every figure whole when piped, as the results commands do."""
    import importlib
    import pkgutil

    import harness.commands
    from harness.commands.output import Output

    consoles = {}
    for m in pkgutil.iter_modules(harness.commands.__path__):
        mod = importlib.import_module(f"harness.commands.{m.name}")
        if "console" in vars(mod):
            consoles[m.name] = type(mod.console)
    assert {"lab", "fs", "results"} <= set(consoles)
    assert {n: t for n, t in consoles.items() if not issubclass(t, Output)} == {}


def test_byte_counts_are_shown_in_mib_with_the_unit(written):
    md = (written / "report.md").read_text()
    assert "lost MiB: total (median)" in md and "| lost MiB |" in md
    assert "lost bytes" not in md and "49152" not in md  # run.json keeps the bytes
    reboot = next(line for line in md.splitlines() if line.startswith("| reboot-files-panic-0 "))
    assert "| 0.0117 |" in reboot  # 12288 bytes


SMALL_RUN = Path(__file__).parent / "golden" / "20261205-130000-orthros-warmcache-reboot-files"


def test_figures_of_a_stored_run_are_svg_and_pdf_a_paper_can_use(tmp_path):
    """A small real run (schema_version 2, one trial a scheme): each figure opens as SVG
    (XML) and as a PDF with a page, one column wide; the clients' gap is in the phase plot
    and in the per-trial table."""
    import xml.etree.ElementTree as ET

    d = tmp_path / SMALL_RUN.name
    shutil.copytree(SMALL_RUN, d)
    report.write_report(d)
    for name in FIGURES:
        svg = ET.parse(d / f"{name}.svg").getroot()
        assert svg.tag == "{http://www.w3.org/2000/svg}svg", name
        assert 3.0 * 72 <= float(svg.get("width").removesuffix("pt")) <= 4.2 * 72, name
        pdf = (d / f"{name}.pdf").read_bytes()
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF"), name
        assert re.search(rb"/Type\s*/Pages\b.*?/Count\s+1\b", pdf, re.S), name
        assert re.search(rb"/Type\s*/Page\b", pdf), name
    assert "clients' gap" in ET.tostring(ET.parse(d / "phases.svg").getroot(), encoding="unicode")
    run = results.load_run(d)
    md = (d / "report.md").read_text()
    for t in run["trials"]:
        assert t["client_gap_s"] is not None and f" {t['client_gap_s']:.3f} |" in md


def test_the_fates_of_the_crashed_kernels_processes_are_shown_with_their_reasons(tmp_path):
    run = golden_run()
    t = next(t for t in run["trials"] if t["scheme"] == "orthros")
    assert "Processes of the crashed kernel" not in "".join(
        map(str, report._blocks(run, report.summarize(run), {}))
    )
    t.setdefault("report", {})["processes"] = [
        {"name": "wsgidav", "pid": 4242, "fate": "preserved", "reason": "entry valid"},
        {
            "name": "holder",
            "pid": None,
            "fate": "restarted",
            "reason": "its process-table entry was rejected: bad checksum",
            "new_pid": 4343,
        },
    ]
    d = tmp_path / "kept"
    d.mkdir()
    results.write_run(d, run["parameters"], run["environment"], run["trials"])
    report.write_report(d)
    md = (d / "report.md").read_text()
    section = md.split("Processes of the crashed kernel", 1)[1]
    assert f"| {t['id']} | wsgidav | 4242 | preserved | — | entry valid |" in section
    assert "| holder | — | restarted | 4343 | its process-table entry was rejected" in section


def test_a_schemes_own_figures_get_a_line_per_trial_and_none_without():
    from harness.report import scheme_figures

    run = {
        "trials": [
            {"id": "t0", "report": {"figures": {"rolled_back": 1, "bytes_logged": 8}}},
            {"id": "t1", "report": {"figures": {}}},
            {"id": "t2", "report": None},
        ]
    }
    assert scheme_figures(run) == ["t0: rolled_back 1, bytes_logged 8"]
    assert scheme_figures({"trials": [{"id": "t", "report": {}}]}) == []
