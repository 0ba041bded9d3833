"""A machine profile's modeled hardware time end to end: a run on a machine with a disk
model of its own and a reboot profile records both as modeled in run.json, spends the
reboot time as modeled phases where the hardware would, and labels them in the report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_machine import PROFILE, write

SHORT = [
    "--warmup",
    "0.5",
    "--duration",
    "1",
    "--post",
    "1",
    "--bin",
    "0.25",
    "--param",
    "clients=2",
    "--param",
    "max_kib=32",
    "--param",
    "corpus_mib=4",
]


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    m = write(d, PROFILE.replace("latency_us = 2500", "latency_us = 300"))
    out = d / "r"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "run",
            "--schemes",
            "reboot",
            "--workload",
            "files",
            "--trials",
            "1",
            "--machine",
            str(m),
            *SHORT,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "run.json").read_text()), out


@pytest.mark.root
def test_the_profiles_disk_and_reboot_are_in_run_json_labelled_modeled(profiled_run):
    run, _ = profiled_run
    hw = run["parameters"]["modeled_hardware"]
    disk = hw["disks"]["disk0"]
    assert disk == {
        "model": "slow",
        "latency_s": pytest.approx(300e-6),
        "bandwidth_bytes_s": 100e6,
        "modeled": True,
        "description": "a made-up disk for this test",
    }
    assert hw["reboot"] == {
        "firmware_s": 1.5,
        "kernel_boot_s": 2.0,
        "modeled": True,
        "description": "made-up figures for this test",
    }
    t = run["trials"][0]
    assert t["recovered"] is True, t.get("error")
    assert set(t["modeled_phases"]) == {"firmware", "kernel boot"}
    assert t["phases"]["firmware"] >= 1.5 and t["phases"]["kernel boot"] >= 2.0
    # spent inside the outage, beside the measured phases, not instead of them
    assert t["outage_s"] >= 3.5 and t["phases"]["boot"] > 0


@pytest.mark.root
def test_the_report_labels_the_modeled_hardware(profiled_run):
    _, out = profiled_run
    md = (out / "report.md").read_text()
    assert "firmware (modeled)" in md and "kernel boot (modeled)" in md
    assert "disk0: slow, 300 µs per request + 100 MB/s (modeled)" in md
    assert "reboot: firmware/POST 1.5 s + kernel boot 2 s (modeled" in md
