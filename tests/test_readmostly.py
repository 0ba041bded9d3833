"""Workloads where the cache matters: `files` in its read-mostly mode and `http` in a
closed loop, their parameters, and the driver's warm-up until the cache is full.

The client tests run the real `files` client against a real WsgiDAV on loopback over a
plain directory: no emulated machine, no root.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from harness import history
from harness.workloads import WorkloadError, tree
from harness.workloads.files import Files
from harness.workloads.http import Http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dav(tmp_path_factory):
    """A WsgiDAV serving a small corpus (as `prepare` writes it) on loopback."""
    root = tmp_path_factory.mktemp("dav")
    files = tree.write_tree(root / "corpus", 5, 4 << 20)
    manifest = root.parent / "corpus.json"
    manifest.write_text(json.dumps([{**f, "path": "/corpus" + f["path"]} for f in files]))
    port = free_port()
    dav = str(Path(sys.executable).with_name("wsgidav"))
    p = subprocess.Popen(
        [
            dav,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--root",
            str(root),
            "--auth",
            "anonymous",
            "--no-config",
            "-q",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        rc = run_client("ready", url, manifest, root.parent / "ready.jsonl", 30)
        assert rc == 0, "WsgiDAV did not answer"
        yield url, manifest, files, root.parent
    finally:
        p.terminate()
        p.wait(10)


def run_client(mode: str, url: str, manifest: Path, hist: Path, timeout: float, *extra: str) -> int:
    argv = [
        sys.executable,
        "-m",
        "harness.workloads.files_client",
        mode,
        "--url",
        url,
        "--until",
        repr(time.monotonic() + timeout),
        "--history",
        str(hist),
        "--manifest",
        str(manifest),
        "--seed",
        "3",
        "--max-kib",
        "16",
        *extra,
    ]
    return subprocess.run(argv, timeout=timeout + 30, stdin=subprocess.DEVNULL).returncode


def test_the_read_mostly_write_share_is_what_was_asked(dav):
    url, manifest, files, d = dav
    h = d / "mix.jsonl"
    assert (
        run_client(
            "client",
            url,
            manifest,
            h,
            120,
            "--write-share",
            "0.25",
            "--max-ops",
            "400",
            "--zipf-s",
            "1.0",
        )
        == 0
    )
    events = history.read(h)
    invokes = [e for e in events if e["type"] == "invoke"]
    kinds = Counter(e["f"] for e in invokes)
    assert kinds["read"] + kinds["write"] == len(invokes) == 400, kinds
    share = kinds["write"] / len(invokes)
    assert abs(share - 0.25) < 0.1, share  # 400 seeded draws: ≈ 0.25 ± 0.02
    reads = [e for e in invokes if e["f"] == "read"]
    assert all(e["key"].startswith("/corpus/") for e in reads)
    assert all(e["key"].startswith("c0-") for e in invokes if e["f"] == "write")
    # every corpus read asked for the manifest's digest and was served exactly that
    want = {f["path"]: f["sha256"] for f in json.loads(manifest.read_text())}
    oks = {
        (e["key"], e["value"]["sha256"]) for e in events if e["type"] == "ok" and e["f"] == "read"
    }
    assert oks and all(want[k] == sha for k, sha in oks)


def test_corpus_reads_are_skewed_towards_the_same_files(dav):
    url, manifest, files, d = dav
    h = d / "skew.jsonl"
    assert (
        run_client(
            "client",
            url,
            manifest,
            h,
            120,
            "--write-share",
            "0",
            "--max-ops",
            "300",
            "--zipf-s",
            "1.2",
        )
        == 0
    )
    reads = Counter(e["key"] for e in history.read(h) if e["type"] == "invoke")
    assert sum(reads.values()) == 300
    top, n = reads.most_common(1)[0]
    # Zipf 1.2 over 14 files gives the first rank ≈ 1/3 of the draws; uniform ≈ 1/14
    assert n > 3 * 300 / len(files), (n, len(files))
    assert top == json.loads(manifest.read_text())[0]["path"]  # the manifest ranks them


def _prepared(tmp_path: Path, name: str, seed: int, data_seed: int | None) -> list[dict]:
    from harness.workloads import Service

    mount = tmp_path / name
    mount.mkdir()
    svc = Service(str(mount), "127.0.0.1", None, mount, seed, data_seed=data_seed)
    w = Files(corpus_mib=1)
    w.prepare(svc)
    return json.loads(w.manifest(svc).read_text())


def test_every_trial_of_a_run_serves_the_same_corpus_and_hot_files(tmp_path):
    from harness import driver

    specs = driver.plan(["orthros", "reboot"], "files", "panic", 3, 7, {}, {}, None)
    assert {s.data_seed for s in specs} == {7} and {s.seed for s in specs} == {7, 8, 9}
    first = _prepared(tmp_path, "t0", 7, 7)
    assert _prepared(tmp_path, "t1", 8, 7) == first  # the same files, ranked alike
    other = _prepared(tmp_path, "other", 7, 11)
    assert [f["sha256"] for f in other] != [f["sha256"] for f in first]
    # ranked, not listed in path order: the hot files are the data set's draw
    assert [f["path"] for f in first] != sorted(f["path"] for f in first)


@pytest.mark.parametrize(
    "cls,params,name",
    [
        (Files, {"write_share": 1.5}, "write_share"),
        (Files, {"write_share": "x"}, "write_share"),
        (Files, {"corpus_mib": -1}, "corpus_mib"),
        (Files, {"zipf_s": -0.5}, "zipf_s"),
        (Files, {"clients": 0}, "clients"),
        (Files, {"read_ratio": 2}, "read_ratio"),
        (Http, {"loop": "open"}, "loop"),
    ],
)
def test_a_bad_workload_parameter_is_a_one_line_error_naming_it(cls, params, name):
    with pytest.raises(WorkloadError) as e:
        cls(**params)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{cls.name}: {name} must be"), msg


def test_the_cli_refuses_a_bad_share_naming_the_parameter():
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--workload",
            "files",
            "--param",
            "write_share=1.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "crashbench: --param: files: write_share must be a share between 0 and 1, got 1.5"
    ]


def test_defaults_make_the_cache_matter():
    """`files` reads a corpus that the default machine's disk takes more than a second to
    read back (each file in readahead-sized requests, each request its latency plus its
    transfer); `http` users run in a closed loop."""
    from kernel import param
    from kernel.hw import machine

    lat, bw = machine.load().disk("disk0").timing
    sizes = tree.file_sizes(1, Files.defaults["corpus_mib"] << 20)
    chunk = param.READAHEAD_PAGES * param.PAGE_SIZE
    reread_s = sum(-(-n // chunk) * lat + n / bw for n in sizes)
    assert reread_s > 1.0, reread_s
    assert Http.defaults["loop"] == "closed"


# --- on the emulated machine ------------------------------------------------------------------

SHORT_TIMING = {
    "warmup_s": 0.5,
    "steady_s": 1.5,
    "post_s": 2.0,
    "recovery_timeout_s": 30.0,
    "ready_timeout_s": 30.0,
    "bin_s": 0.25,
    "cache_timeout_s": 60.0,
}
CORPUS = {"clients": 2, "max_kib": 64, "corpus_mib": 16, "write_share": 0.1}


@pytest.fixture(scope="module")
def warm_trial(tmp_path_factory):
    """One short `files` trial under warmcache, the VMM's own count of reused pages read
    when the driver takes the report's (after the load that follows recovery)."""
    if os.geteuid() != 0:
        pytest.skip("FUSE with allow_other and real servers need root")
    from harness import driver, results

    class Probe(driver.Trial):
        def verify(self):
            self.vmm_reused = self.scheme.stats()["reused"]
            self.corpus_pages = self.workload.cache_pages(self.svc)
            return super().verify()

    out = tmp_path_factory.mktemp("warm") / "r"
    out.mkdir()
    spec = driver.TrialSpec("warmcache", "files", "panic", 0, 3, dict(SHORT_TIMING), dict(CORPUS))
    trial = Probe(spec, out)
    rec = trial.run()
    params = {
        "schemes": ["warmcache"],
        "workload": "files",
        "fault": "panic",
        "trials": 1,
        "seed": 3,
        "timing": SHORT_TIMING,
        "workload_params": CORPUS,
    }
    results.write_run(out, params, results.environment(), [rec])
    return trial, rec, out


@pytest.mark.root
def test_after_the_warm_up_the_page_cache_holds_the_corpus(warm_trial):
    trial, rec, _ = warm_trial
    assert not rec.get("error"), rec.get("error")
    fill = rec["cache_fill"]
    assert fill["target_pages"] == trial.corpus_pages > 0
    assert fill["full"] is True and fill["pages"] >= fill["target_pages"]  # the kernel's status
    # and the dead kernel's memory, read raw after the crash, held at least as much
    assert rec["cache"]["pages_before"] >= fill["target_pages"]


@pytest.mark.root
def test_warmcache_reuses_pages_and_the_report_shows_the_vmms_count(warm_trial):
    trial, rec, out = warm_trial
    assert rec["recovered"] is True
    reused = rec["cache"]["pages_reused"]
    assert reused > 0 and reused == trial.vmm_reused
    from harness import report

    report.write_report(out)
    rows = [
        ln
        for ln in (out / "report.md").read_text().splitlines()
        if ln.startswith(f"| {rec['id']} |")
    ]
    assert len(rows) == 1 and f"| {reused} |" in rows[0], rows
    assert rec["checks"]["corpus"]["served"] > 0 and rec["checks"]["corpus"]["mismatched"] == 0


class _DiskOnly:
    """A machine's disks as plain files; what the booted-for-it kernel left on the mount
    is written into the one image at its stop, as a clean shutdown leaves it on disk."""

    def __init__(self, d: Path, mount: Path):
        from types import SimpleNamespace

        self.d, self.mount, self.boots = d, mount, 0
        self.machine = SimpleNamespace(disks=[SimpleNamespace(name="disk0")])

    def disk_image(self, name: str) -> Path:
        return self.d / f"{name}.img"

    def boot(self, i: int, mount: str) -> None:
        self.boots += 1

    def stop(self, i: int) -> None:
        files = sorted(p for p in self.mount.rglob("*") if p.is_file())
        self.disk_image("disk0").write_bytes(b"".join(p.read_bytes() for p in files))


def _sharing_trial(store: Path, tmp_path: Path, trial: int):
    from harness import driver
    from harness.workloads import Service

    spec = driver.plan(["reboot"], "files", "panic", trial + 1, 4, {}, {"corpus_mib": 1}, None)
    t = driver.sharing_data(store)(spec[trial], tmp_path)
    wd = tmp_path / f"t{trial}"
    (wd / "mount").mkdir(parents=True)
    t.svc = Service(str(wd / "mount"), "127.0.0.1", None, wd, spec[trial].seed, data_seed=4)
    t.host = _DiskOnly(wd, wd / "mount")
    return t


def test_the_trials_of_a_run_copy_the_data_set_the_first_made(tmp_path):
    from harness import prepared

    with prepared.scratch_store() as store:
        first, second = (_sharing_trial(store, tmp_path, i) for i in (0, 1))
        first.prepare_data()
        second.prepare_data()
        assert (first.data_set, first.host.boots) == ("made", 1)
        assert (second.data_set, second.host.boots) == ("copied", 0)  # no kernel, no writes
        image = first.host.disk_image("disk0").read_bytes()  # the 1 MiB corpus
        assert len(image) == 1 << 20 and second.host.disk_image("disk0").read_bytes() == image
        manifest = first.workload.manifest(first.svc).read_text()
        assert second.workload.manifest(second.svc).read_text() == manifest
    assert not store.exists()


def test_a_run_s_data_store_goes_however_the_run_ends(tmp_path):
    from harness import prepared

    with pytest.raises(KeyboardInterrupt):
        with prepared.scratch_store() as store:
            (store / "prepared").mkdir()
            raise KeyboardInterrupt
    assert not store.exists()


def _stamped_by_a_dead_process(scratch: Path) -> None:
    """``scratch`` stamped only by a process that was killed since, as SIGKILL leaves it."""
    from harness import prepared

    gone = subprocess.Popen(["sleep", "60"])
    stamp = prepared.stamp(scratch, gone.pid)  # taken while it lives
    gone.kill()
    gone.wait()
    for other in stamp.parent.iterdir():
        if other != stamp:
            other.unlink()


def test_a_killed_run_s_data_store_is_an_orphan_and_a_live_one_is_not(tmp_path):
    from harness import prepared

    with prepared.scratch_store() as live:
        assert live not in prepared.orphan_stores()
        with prepared.scratch_store() as dead:
            _stamped_by_a_dead_process(dead)
            assert dead in prepared.orphan_stores() and live not in prepared.orphan_stores()


def test_a_killed_campaign_s_scratch_directory_is_an_orphan_while_no_stamp_lives(tmp_path):
    """A campaign's scratch directory is stamped by every process that works in it (a
    worker, its trial processes): it is an orphan only when all of them are gone."""
    from harness import prepared
    from harness.campaign.task import scratch_dir

    d = scratch_dir(f"test-{os.getpid()}")
    d.mkdir()
    try:
        _stamped_by_a_dead_process(d)  # the killed worker
        assert d in prepared.orphan_stores()
        with subprocess.Popen(["sleep", "60"]) as trial:  # its trial process, still tearing down
            prepared.stamp(d, trial.pid)
            assert d not in prepared.orphan_stores()
            trial.kill()
        assert d in prepared.orphan_stores()
        down = subprocess.run(
            [sys.executable, "-m", "harness.cli", "down", "--all"],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"removed a killed campaign's scratch directory {d}" in down.stdout
        assert not d.exists()
    finally:
        import shutil

        shutil.rmtree(d, ignore_errors=True)
