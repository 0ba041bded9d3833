"""`crashbench campaign`: the plan, the outcome classes, Wilson intervals, campaign.json,
resume after Ctrl-C with every fault counted once, and a Dask worker killed mid-fault.

The end-to-end tests run small campaigns (a handful of faults, the `none`, `reboot` and
`orthros` schemes) through the real CLI on a LocalCluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from harness import driver, stats
from harness.campaign import compare, outcome, plan, store, summary

SHORT = [
    "--warmup",
    "0.5",
    "--duration",
    "0.5",
    "--post",
    "0.5",
    "--param",
    "clients=2",
    "--param",
    "max_kib=64",
    "--param",
    "corpus_mib=8",
]


# --- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [
        (8, 10, 0.4902, 0.9433),  # the textbook example
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), method 3
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
    ],
)
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    share, a, b = stats.wilson_ci(k, n)
    assert share == pytest.approx(k / n)
    assert a == pytest.approx(lo, abs=1e-4) and b == pytest.approx(hi, abs=1e-4)


def test_wilson_refuses_what_is_not_a_proportion():
    assert stats.wilson_ci(0, 0) == (None, None, None)
    for k, n in ((3, 2), (-1, 5), (1.5, 4), (True, 3)):
        with pytest.raises(ValueError):
            stats.wilson_ci(k, n)


# --- the plan -----------------------------------------------------------------------------


def test_plan_covers_every_target_and_site_and_is_the_same_for_the_same_parameters():
    kinds = plan.kinds_of("all")
    cells = plan.cells(kinds)
    from kernel.core.faults import FAULTS, OBJECT_TARGETS, REQUEST_SITES, SITES

    assert {c.kind for c in cells} == set(FAULTS)
    assert {c.target for c in cells if c.kind == "bit-flip"} == set(OBJECT_TARGETS)
    assert {c.site for c in cells if c.kind == "panic"} == set(SITES)
    in_request = {c.site for c in cells if c.kind == "exception-in-request"}
    assert in_request == {*REQUEST_SITES, "writeback"}
    a = plan.plan(["orthros", "reboot"], kinds, 2 * len(cells), seed=7)
    assert a == plan.plan(["orthros", "reboot"], kinds, 2 * len(cells), seed=7)
    assert len(a) == 4 * len(cells) and len({f.id for f in a}) == len(a)
    assert [f.scheme for f in a[:4]] == ["orthros", "reboot", "orthros", "reboot"]
    assert {f.repetition for f in a} == {0, 1}
    assert len({f.seed for f in a}) == len(a)
    assert a != plan.plan(["orthros", "reboot"], kinds, 2 * len(cells), seed=8)


def test_plan_refuses_unknown_names():
    for bad in ("meteor", "panic,panic", ""):
        with pytest.raises(plan.PlanError, match="--faults"):
            plan.kinds_of(bad)
    with pytest.raises(plan.PlanError, match="--sites: unknown site 'moon'"):
        plan.sites_of("now,moon")
    with pytest.raises(plan.PlanError, match="--targets: unknown target 'moon'.*superblock"):
        plan.targets_of("superblock,moon")
    with pytest.raises(plan.PlanError, match="only wild-write, bit-flip have targets"):
        plan.cells(["panic"], targets=["superblock"])


def test_targets_narrow_a_plan_to_memory_faults_into_those_objects_and_keep_old_identities():
    from harness.campaign.run import plan_of

    into = plan.targets_of("superblock,inode")
    cells = plan.cells(plan.kinds_of("all"), targets=into)
    assert {(c.kind, c.target) for c in cells} == {
        (k, t) for k in ("wild-write", "bit-flip") for t in ("superblock", "inode")
    }
    params = {
        "schemes": ["orthros"],
        "faults": "bit-flip",
        "sites": "all",
        "per_scheme": 6,
        "seed": 1,
    }
    assert {f.target for f in plan_of({**params, "targets": "superblock"})} == {"superblock"}
    assert len({f.target for f in plan_of(params)}) > 1  # a campaign from before targets


@pytest.mark.root
def test_a_fault_seed_drives_the_injectors_choices(host):
    """The same seed picks the same object and bytes in a live kernel: what replay relies
    on. (Armed at a site an idle machine never reaches, so the kernel lives on.)"""

    def inject(seed):
        r = host.control(
            0,
            {
                "cmd": "inject",
                "fault": "wild-write",
                "site": "vfs.create",
                "target": "superblock",
                "seed": seed,
            },
        )
        assert r["ok"], r
        return r["detail"]

    assert inject(5) == inject(5)
    assert len({inject(s) for s in (5, 6, 7, 8)}) > 1
    r = host.control(0, {"cmd": "inject", "fault": "panic", "seed": -1})
    assert not r["ok"] and "seed -1" in r["error"]


@pytest.mark.root
@pytest.mark.parametrize("activates", [False, True])
def test_a_fault_whose_probe_ends_with_it_still_armed_is_a_harness_error_at_once(
    tmp_path, activates
):
    """A probe ends while the kernel still holds the fault armed (here one that does
    nothing, as a request the kernel refuses before the site: a corrupted file system's
    EUCLEAN): the fault did not activate, said at once instead of after the recovery
    timeout. The campaign's own probe of a request site (a create) lets the fault
    activate, and the recovery is then awaited as usual."""
    from harness import driver
    from harness.campaign.task import CampaignTrial, Probe
    from harness.testbed import Testbed
    from harness.workloads import Service

    spec = driver.TrialSpec(
        "none", "idle", "panic", 0, 1, dict(driver.DEFAULTS), fault_args={"site": "vfs.create"}
    )
    with Testbed(kind="test", delay=False) as bed:
        t = CampaignTrial(spec, tmp_path)
        bed.deploy(t.scheme)
        t.host = bed.host
        t.svc = Service(str(bed.host.kernels[0].mount), "127.0.0.1", None, bed.host.workdir, 1)
        reply = t.scheme.inject("panic", site="vfs.create")
        assert reply["ok"], reply
        if activates:
            t.reach(reply["site"])
            t.await_activation(reply)
            assert t.activated(0, reply) and t.scheme.on_crash(reply, timeout=30).failed_at
        else:
            t.probe = Probe(lambda: None, "vfs.create")
            with pytest.raises(driver.DriverError, match="did not activate.*site vfs.create"):
                t.await_activation(reply)
            assert bed.host.control(0, {"cmd": "status"})["armed"]


# --- outcome classes ----------------------------------------------------------------------


def _rec(**kw):
    base = {
        "error": None,
        "report": {"verdict": "recovered", "rejected": [], "cache": {}},
        "recovered": True,
        "corrupted_writes": 0,
        "lost_writes": 0,
        "lost_bytes": 0,
    }
    return {**base, **kw}


CLEAN = {"exit_code": 0, "problems": []}


@pytest.mark.parametrize(
    "rec, fsck, want",
    [
        (_rec(error="DriverError: deploy failed"), None, "harness-error"),
        (_rec(report=None, recovered=False), CLEAN, "harness-error"),
        (_rec(recovered=False, report={"verdict": "not recovered"}), CLEAN, "not-recovered"),
        (_rec(corrupted_writes=2), CLEAN, "corrupted"),
        (_rec(), {"exit_code": 4, "problems": ["inode 12: block 99 used twice"]}, "corrupted"),
        (_rec(checks={"amcheck": {"ok": False, "findings": ["x: bad"]}}), CLEAN, "corrupted"),
        (_rec(lost_writes=3, lost_bytes=4096), CLEAN, "loss"),
        (_rec(unverified_keys=2), CLEAN, "loss"),  # read back EIO: never "intact"
        (_rec(checks={"amcheck": {"ok": None}, "server_starts": [{}]}), CLEAN, "intact"),
        (_rec(), CLEAN, "intact"),
    ],
)
def test_each_fault_gets_exactly_one_class(rec, fsck, want):
    cls, why = outcome.classify(rec, fsck)
    assert cls == want and why


def test_a_faults_result_keeps_the_workloads_checks_and_its_report_names_them():
    from harness.campaign.report import _checks_line
    from harness.campaign.task import result_of

    checks = {"amcheck": {"ok": True}, "bank": {"ok": False}, "server_starts": [{}, {}]}
    fault = plan.FaultSpec("f", 0, "txipc_sim", "exception-in-request", None, "vfs.write", 0, 1)
    res = result_of(fault, _rec(checks=checks), CLEAN, 1.0)
    jsonschema.validate(res, store.FAULT_SCHEMA)  # what the log accepts
    assert res["checks"] == checks and res["outcome"] == "corrupted" and "bank" in res["why"]
    assert _checks_line(checks) == "amcheck ok, bank FAILED, server_starts 2"


# --- the log and campaign.json ------------------------------------------------------------


def _result(fid: str, index: int, cls: str = "intact", scheme: str = "orthros") -> dict:
    from harness.campaign.task import error_result

    r = error_result(plan.FaultSpec(fid, index, scheme, "panic", None, "now", 0, 1), "x")
    return {**r, "outcome": cls, "error": None if cls != "harness-error" else "x"}


def test_log_counts_every_fault_once_and_rejects_what_is_damaged(tmp_path):
    store.append(tmp_path, _result("a", 0))
    store.append(tmp_path, _result("b", 1, "loss"))
    store.append(tmp_path, _result("a", 0, "corrupted"))  # a task run twice
    with open(tmp_path / store.LOG_FILE, "a") as f:
        f.write('{"id": "c", "outcome": "intact"}\n')  # not a result
        f.write(json.dumps(_result("zz", 9)) + "\n")  # not in the plan
        f.write('{"id": "c", "index": 2, "sch')  # torn by a kill
    got, info = store.load_log(tmp_path, {"a", "b", "c"}, repair=True)
    assert [(r["id"], r["outcome"]) for r in got] == [("a", "intact"), ("b", "loss")]
    assert info["duplicates"] == 1 and info["rejected_lines"] == 3
    assert (tmp_path / store.LOG_FILE).read_bytes().endswith(b"\n")  # the torn line cut off
    store.append(tmp_path, _result("c", 2))
    got, info = store.load_log(tmp_path, {"a", "b", "c"})
    assert [r["id"] for r in got] == ["a", "b", "c"] and info["rejected_lines"] == 2


def test_summary_counts_classes_and_keeps_harness_errors_apart():
    rs = [
        _result(str(i), i, c)
        for i, c in enumerate(
            ["intact"] * 6 + ["loss"] * 2 + ["corrupted", "not-recovered", "harness-error"]
        )
    ]
    g = summary.summarize(rs, ["orthros"])["schemes"]["orthros"]["all"]
    assert g["n"] == 10 and g["harness_errors"] == 1
    assert g["coverage"]["k"] == 8
    assert (g["coverage"]["lo"], g["coverage"]["hi"]) == pytest.approx(stats.wilson_ci(8, 10)[1:])
    assert g["corrupted"]["k"] == 1


def _doc(results: list[dict]) -> dict:
    return {"summary": summary.summarize(results, ["orthros"])}


def test_compare_flags_a_coverage_drop_beyond_the_intervals_and_new_corruption():
    good = _doc([_result(str(i), i) for i in range(40)])
    slightly = _doc([_result(str(i), i, "not-recovered" if i < 3 else "intact") for i in range(40)])
    bad = _doc([_result(str(i), i, "not-recovered" if i < 20 else "intact") for i in range(40)])
    corrupt = _doc([_result(str(i), i, "corrupted" if i == 0 else "intact") for i in range(40)])
    assert compare.compare(good, good).exit_code == 0
    assert compare.compare(good, slightly).exit_code == 0  # inside the intervals
    assert compare.compare(good, bad).exit_code == 1
    assert compare.compare(bad, good).rows[-1].verdict == "better"
    c = compare.compare(good, corrupt)
    assert c.exit_code == 1 and "corrupted" in c.worse[0].why


def _local_params() -> dict:
    """A campaign's parameters as the CLI gives them: 2 panics of orthros, run locally."""
    return {
        "schemes": ["orthros"],
        "workload": "files",
        "faults": "panic",
        "sites": "now",
        "per_scheme": 2,
        "seed": 1,
        "timing": {},
        "workload_params": {},
        "machine_file": None,
        "executor": "local",
        "workers": 1,
        "scheduler": None,
        "redeploy_every": 1,
    }


def test_campaign_json_refuses_a_broken_field(tmp_path):
    from harness.campaign.run import open_campaign

    params = _local_params()
    doc, done = open_campaign(tmp_path, params, {})
    assert done == [] and store.load(tmp_path)["plan"] == doc["plan"]
    bad = json.loads((tmp_path / store.CAMPAIGN_FILE).read_text())
    bad["faults"] = [{**_result("x", 0), "outcome": "fine"}]
    (tmp_path / store.CAMPAIGN_FILE).write_text(json.dumps(bad))
    with pytest.raises(store.CampaignError, match=r"faults\[0\]\.outcome"):
        store.load(tmp_path)
    bad["faults"], bad["schema_version"] = [], 9
    (tmp_path / store.CAMPAIGN_FILE).write_text(json.dumps(bad))
    with pytest.raises(store.CampaignError, match="schema_version 9"):
        store.load(tmp_path)


def test_other_parameters_in_the_same_directory_are_refused(tmp_path):
    from harness.campaign.run import open_campaign

    params = _local_params()
    open_campaign(tmp_path, params, {})
    open_campaign(tmp_path, {**params, "workers": 4, "executor": "dask"}, {})  # same campaign
    with pytest.raises(store.CampaignError, match="seed = 1, not 2"):
        open_campaign(tmp_path, {**params, "seed": 2}, {})


# --- end to end ---------------------------------------------------------------------------


def _as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _campaign(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "campaign", *args]


def _left_behind(campaign_dir: Path) -> list[str]:
    """What a campaign's trials could leave: its scratch directory, a process working in
    it, an ownership record of a machine under it."""
    from harness import owners
    from harness.campaign.task import scratch_dir

    root = scratch_dir(store.load(campaign_dir)["campaign_id"])
    left = [f"scratch {root}"] if root.exists() else []
    left += [
        f"machine {r.data['tag']}"
        for r in owners.records()
        if r.data and r.data["workdir"].startswith(str(root))
    ]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/cwd").startswith(str(root)):
                    left.append(f"process {p}")
            except OSError:
                pass
    return left


@pytest.mark.root
def test_a_small_campaign_gives_each_scheme_its_outcome_class(tmp_path):
    """none never recovers, reboot recovers losing acknowledged writes (no fsync in the
    workload), orthros recovers them all; two workers on one machine do not collide, and
    nothing is left behind."""
    out = tmp_path / "c"
    p = subprocess.run(
        _campaign(
            "--schemes",
            "none,reboot,orthros",
            "--workload",
            "files",
            "--faults",
            "panic",
            "--sites",
            "now",
            "--per-scheme",
            "1",
            "--redeploy-every",  # every machine is torn down, so every disk is checked
            "1",
            "--workers",
            "2",
            *SHORT,
            "--out",
            str(out),
        ),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = store.load(out)  # validated against the schema
    by = {r["scheme"]: r for r in doc["faults"]}
    assert by["none"]["outcome"] == "not-recovered"
    assert by["reboot"]["outcome"] == "loss" and by["reboot"]["lost_bytes"] > 0
    assert by["orthros"]["outcome"] == "intact" and by["orthros"]["acked_writes"] > 0
    assert all(r["fsck"]["exit_code"] == 0 for r in doc["faults"])
    assert doc["status"] == "complete" and doc["time"]["faults_run"] == 3
    cov = doc["summary"]["schemes"]["orthros"]["all"]["coverage"]
    assert (cov["k"], cov["n"]) == (1, 1) and cov["lo"] == pytest.approx(stats.wilson_ci(1, 1)[1])
    assert "coverage" in p.stdout and "a fault" in p.stdout
    assert {"report.md", "report.html", "coverage.png"} <= {f.name for f in out.iterdir()}
    assert _left_behind(out) == []


@pytest.mark.root
def test_a_campaign_stopped_by_ctrl_c_continues_and_counts_every_fault_once(tmp_path):
    out = tmp_path / "c"
    argv = _campaign(
        "--schemes",
        "none",
        "--workload",
        "files",
        "--faults",
        "panic,kill",
        "--sites",
        "now",
        "--per-scheme",
        "4",
        "--redeploy-every",
        "1",
        *SHORT,
        "--out",
        str(out),
    )
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 180
        log = out / store.LOG_FILE
        while not (log.exists() and log.read_text().count("\n") >= 1):
            assert p.poll() is None, p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no fault finished"
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        first = p.communicate(timeout=180)[0]
    finally:
        p.kill()
    assert p.returncode == 130, first[-3000:]
    doc = store.load(out)
    assert doc["status"] == "stopped" and doc["stopped"]["signal"] == "SIGINT"
    assert 1 <= len(doc["faults"]) < 4
    assert _left_behind(out) == [], first[-3000:]
    again = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    doc = store.load(out)
    ids = [r["id"] for r in doc["faults"]]
    assert doc["status"] == "complete" and sorted(ids) == sorted(f["id"] for f in doc["plan"])
    logged = [json.loads(line)["id"] for line in (out / store.LOG_FILE).read_text().splitlines()]
    assert sorted(logged) == sorted(ids)  # none run twice, none lost
    assert doc["summary"]["schemes"]["none"]["all"]["n"] == 4
    assert _left_behind(out) == []


def _task_processes_under(pid: int) -> list[int]:
    """Trial processes (harness.campaign.task) descending from ``pid``."""
    parents = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parents[int(p)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out = []
    for p in parents:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"harness.campaign.task" not in cmd:
            continue
        q = p
        while q in parents and q not in (0, 1):
            q = parents[q]
            if q == pid:
                out.append(p)
                break
    return out


@pytest.mark.root
def test_a_worker_killed_mid_fault_loses_no_result(tmp_path):
    """SIGKILL to the Dask worker running a fault: Dask reruns the task, the campaign
    completes with every fault once, and the killed worker's trial tears itself down."""
    out = tmp_path / "c"
    p = subprocess.Popen(
        _campaign(
            "--schemes",
            "none",
            "--workload",
            "files",
            "--faults",
            "panic,kill",
            "--sites",
            "now",
            "--per-scheme",
            "3",
            "--redeploy-every",
            "1",
            "--workers",
            "2",
            *SHORT,
            "--out",
            str(out),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        deadline = time.monotonic() + 180
        while not (tasks := _task_processes_under(p.pid)):
            assert p.poll() is None, p.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no fault started"
            time.sleep(0.1)
        time.sleep(2)  # into the trial's deploy or load
        worker = int(Path(f"/proc/{tasks[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        os.kill(worker, signal.SIGKILL)
        text = p.communicate(timeout=300)[0]
    finally:
        p.kill()
    assert p.returncode == 0, text[-3000:]
    doc = store.load(out)
    assert sorted(r["id"] for r in doc["faults"]) == sorted(f["id"] for f in doc["plan"])
    assert all(r["outcome"] == "not-recovered" for r in doc["faults"]), doc["faults"]
    # the fault it was running was finished by another worker
    assert not [r for r in doc["faults"] if r["worker"].endswith(f":{worker}")]
    assert _left_behind(out) == [], text[-3000:]


@pytest.mark.root
def test_fast_faults_go_into_the_recovered_machine_and_redeploy_after_a_failure(tmp_path):
    """--redeploy-every 3: orthros's three faults share one machine (one deploy, the
    later faults into the re-paired machine, each judged on its own writes: intact), and
    so do reboot's (each loses acknowledged writes, none reads back another fault's files
    as corrupted, and its new kernel's empty cache is given the corpus again before the
    next fault, where orthros's adopted cache needs nothing); none never recovers, so each
    of its faults gets a fresh machine."""
    out = tmp_path / "c"
    p = subprocess.run(
        _campaign(
            "--schemes",
            "orthros,reboot,none",
            "--workload",
            "files",
            "--faults",
            "panic,kill",
            "--sites",
            "now",
            "--per-scheme",
            "3",
            "--redeploy-every",
            "3",
            "--executor",
            "local",
            *SHORT,
            "--param",  # more than the post-recovery load can read back into a cold cache
            "corpus_mib=64",
            "--out",
            str(out),
        ),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = store.load(out)
    orthros = sorted(
        (r for r in doc["faults"] if r["scheme"] == "orthros"), key=lambda r: r["index"]
    )
    assert [r["outcome"] for r in orthros] == ["intact"] * 3, [r["why"] for r in orthros]
    assert ["deploy" in r["phases"] for r in orthros] == [True, False, False]
    assert all(r["fsck"]["exit_code"] == 0 and r["acked_writes"] > 0 for r in orthros)
    reboot = sorted((r for r in doc["faults"] if r["scheme"] == "reboot"), key=lambda r: r["index"])
    assert [r["outcome"] for r in reboot] == ["loss"] * 3, [r["why"] for r in reboot]
    assert ["deploy" in r["phases"] for r in reboot] == [True, False, False]
    assert ["refill cache" in r["phases"] for r in reboot] == [False, True, True]
    assert not any("refill cache" in r["phases"] for r in orthros)
    nones = [r for r in doc["faults"] if r["scheme"] == "none"]
    assert all(r["outcome"] == "not-recovered" and "deploy" in r["phases"] for r in nones)
    assert _left_behind(out) == []


def test_a_workload_that_cannot_share_a_machine_is_refused_fast_faults(tmp_path):
    p = subprocess.run(
        _campaign("--workload", "postgres", "--redeploy-every", "5", "--out", str(tmp_path / "c")),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2 and "--redeploy-every: workload postgres" in p.stderr, p.stderr
    assert not (tmp_path / "c").exists()


def test_fast_faults_are_the_default_where_the_workload_lets_faults_share_a_machine():
    from harness.campaign import FAST_FAULTS
    from harness.commands.campaign import _redeploy_every

    assert FAST_FAULTS > 1
    assert _redeploy_every(None, "files") == FAST_FAULTS
    assert _redeploy_every(None, "postgres") == 1  # its machine cannot be shared
    assert _redeploy_every(7, "files") == 7


def test_docker_executor_runs_the_trial_in_a_labelled_container_with_what_it_needs(tmp_path):
    from harness.campaign import container

    argv = container.argv({"campaign_id": "abc", "image": "crashbench-worker"}, tmp_path)
    assert argv[:2] == ["docker", "run"] and argv[-1] == "crashbench-worker"
    assert "crashbench.campaign=abc" in argv and argv[argv.index("--network") + 1] == "none"
    assert f"{tmp_path}:{tmp_path}:rw" in argv and f"{sys.prefix}:{sys.prefix}:ro" in argv
    # privileged, or every capability this host has (a container cannot get more)
    assert "--privileged" in argv or ("--device" in argv and "/dev/fuse" in argv)
    for cap in container.missing_caps():
        assert argv[argv.index(cap) - 1] == "--cap-drop"


def test_docker_executor_without_a_usable_image_is_refused_before_anything_runs(tmp_path):
    p = subprocess.run(
        _campaign(
            "--executor", "docker", "--image", "no-such-image-here", "--out", str(tmp_path / "c")
        ),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--executor docker: image 'no-such-image-here' cannot be used" in p.stderr
    assert not (tmp_path / "c").exists()


def test_a_stop_right_after_a_logged_result_still_counts_it(tmp_path, monkeypatch):
    """Ctrl-C after a result reached the log but before the loop counted it: campaign.json
    must hold that fault, as the log does (a restart would not run it again)."""
    from harness.campaign import run as campaign_run

    params = _local_params()
    first = campaign_run.plan_of(params)[0]

    def one_result(*_args):
        yield {**_result(first.id, first.index), "scheme": first.scheme}

    def append_then_stop(d, result):
        real_append(d, result)  # the line is in the log, fsynced
        raise KeyboardInterrupt  # before the loop counted it

    real_append = store.append
    monkeypatch.setattr(campaign_run.executors, "results", one_result)
    monkeypatch.setattr(store, "append", append_then_stop)
    monkeypatch.setattr(campaign_run, "clean_scratch", lambda _cid: None)
    with pytest.raises(KeyboardInterrupt):
        campaign_run.run(tmp_path, params, {})
    doc = store.load(tmp_path)
    assert [f["id"] for f in doc["faults"]] == [first.id]
    assert doc["status"] == "stopped" and doc["stopped"]["faults_done"] == 1


def test_an_inject_reply_lost_to_the_fault_is_read_from_the_mailbox_and_a_dead_kernel_is_named():
    """A fault that kills the kernel before its control thread answers (a request reached
    the armed site first) still took effect: its reply comes from the mailbox the kernel
    filled before arming. A kernel gone before the request is a harness error saying so."""
    import types

    from kernel.hw.mailbox import RUNNING, Mail

    def trial(mail: Mail):
        host = types.SimpleNamespace(mail=lambda part: mail)
        t = types.SimpleNamespace(
            host=host,
            scheme=types.SimpleNamespace(active=0),
            spec=types.SimpleNamespace(fault="kill", id="orthros-kill-0"),
        )
        t.kernel_said = lambda m=None: driver.Trial.kernel_said(t, m)
        return t

    armed = Mail(RUNNING, 1, 0, True, 9, 0, 10, 0, 0, 0, "", "")
    armed.fault, armed.fault_site, armed.injected_ns = "kill", "vfs.setattr", 2_000
    lost = ConnectionError("ctl-p0.sock: kernel closed the connection (it may have died)")
    reply = driver.Trial.reply_from_mailbox(trial(armed), 1_000, lost)
    assert reply["ok"] and reply["site"] == "vfs.setattr" and reply["injected_ns"] == 2_000
    assert reply["target"] is None and "closed the connection" in reply["reply_lost"]

    earlier = dataclasses.replace(armed, injected_ns=500)  # an earlier fault's, not this one
    with pytest.raises(
        driver.DriverError, match="gone before the fault was armed.*mailbox: running"
    ):
        driver.Trial.reply_from_mailbox(trial(earlier), 1_000, lost)
