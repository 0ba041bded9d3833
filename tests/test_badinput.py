"""Bad input through the real CLI: one line on stderr naming the problem, exit status 2, no
traceback, and nothing started or created — no work or result directory, no `latest`, no
lab state, no memory file, no namespace. None of these cases may get as far as a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.lab import lab_tag
from kernel.hw.host import physmem_path_for

DEFAULT_TOML = (
    Path(__file__).parents[1] / "kernel" / "hw" / "machines" / "default.toml"
).read_text()


def cb(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def assert_refused(r: subprocess.CompletedProcess, words: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert len(lines) == 1, r.stderr
    assert words in lines[0], lines[0]


def no_lab_left(workdir: Path) -> None:
    assert not os.path.exists(physmem_path_for(workdir))
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"cb{lab_tag(workdir)}" not in ns


@pytest.fixture
def place(tmp_path):
    """A scratch directory; a lab a regression would start in it is stopped afterwards."""
    yield tmp_path
    for state in tmp_path.rglob("lab.json"):
        cb("down", "--workdir", str(state.parent), cwd=tmp_path)


def toml(old: str, new: str, top: str = "") -> str:
    assert old in DEFAULT_TOML, old
    return top + DEFAULT_TOML.replace(old, new, 1)


MACHINE_HEAD = '[machine]\nname = "default"\nmemory = "1GiB"\n'
PARTITIONS = DEFAULT_TOML[DEFAULT_TOML.index("[[partition]]") : DEFAULT_TOML.index("[[disk]]")]

MACHINE_CASES = {
    "machine is a number": (
        toml(MACHINE_HEAD, "", top="machine = 5\n"),
        "machine: expected a table, got 5",
    ),
    "partition is a list of numbers": (
        toml(PARTITIONS, "", top="partition = [1, 2]\n"),
        "partition[0]: expected a table, got 1",
    ),
    "id is a word": (toml("id = 0", 'id = "one"'), "partition[0].id: expected an integer"),
    "devices misspelt": (
        toml('devices = ["disk0"', 'devics = ["disk0"'),
        "partition[0].devics: unknown key",
    ),
    "unknown key colour": (
        toml('name = "default"', 'name = "default"\ncolour = "red"'),
        "machine.colour: unknown key",
    ),
    "64 TiB of memory": (
        toml('memory = "1GiB"', 'memory = "64TiB"'),
        "machine.memory: 64TiB is more than this host's RAM",
    ),
    "image outside the work directory": (
        toml('image = "disk0.img"', 'image = "../../x.img"'),
        "disk[0].image: '../../x.img' must be a relative path",
    ),
    "absolute image": (
        toml('image = "disk0.img"', 'image = "/x.img"'),
        "disk[0].image: '/x.img' must be a relative path",
    ),
}


@pytest.mark.parametrize("case", MACHINE_CASES, ids=list(MACHINE_CASES))
def test_bad_machine_description_is_refused_before_anything_starts(place, case):
    text, words = MACHINE_CASES[case]
    (place / "m.toml").write_text(text)
    before = tree(place)
    workdir = place / "a" / "b" / "lab"
    r = cb("up", "--machine", "m.toml", "--workdir", str(workdir), cwd=place)
    assert_refused(r, words)
    assert tree(place) == before
    no_lab_left(workdir)


def _ro_mount(place: Path) -> Path:
    ro = place / "ro"
    ro.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "crashbench-ro", str(ro)], check=True
    )
    return ro


CLI_CASES = {
    "workdir is a file": (lambda p: ["up", "--workdir", str(p / "f")], "not a directory"),
    "workdir read-only": (
        lambda p: ["up", "--workdir", str(_ro_mount(p) / "lab")],
        "Read-only file system",
    ),
    "lab.json holds []": (
        lambda p: ["status", "--workdir", str(p / "old")],
        "damaged lab state (expected a JSON object",
    ),
    "up over lab.json []": (
        lambda p: ["up", "--workdir", str(p / "old")],
        "damaged lab state (expected a JSON object",
    ),
    "run --out FILE": (lambda p: ["run", "--schemes", "none", "--out", str(p / "f")], "--out: "),
    "run --out under a file": (
        lambda p: ["run", "--schemes", "none", "--out", str(p / "f" / "r")],
        "is not a directory",
    ),
    "run --schemes ,": (lambda p: ["run", "--schemes", ","], "--schemes: names no scheme"),
    "run --duration nan": (
        lambda p: ["run", "--schemes", "none", "--duration", "nan"],
        "--duration: must be a finite number",
    ),
    "run --param clients=abc": (
        lambda p: ["run", "--schemes", "none", "--param", "clients=abc"],
        "--param clients: files expects an integer, got 'abc'",
    ),
    "run --param read_ratio=inf": (
        lambda p: ["run", "--schemes", "none", "--param", "read_ratio=inf"],
        "--param read_ratio: must be",
    ),
    "mkfs size 0": (lambda p: ["mkfs", str(p / "d.img"), "--size", "0"], "--size 0: "),
    "mkfs size 4096": (lambda p: ["mkfs", str(p / "d.img"), "--size", "4096"], "--size 4096: "),
    "mkfs size 1MiB": (lambda p: ["mkfs", str(p / "d.img"), "--size", "1MiB"], "--size 1MiB: "),
    "mkfs size 100TiB": (
        lambda p: ["mkfs", str(p / "d.img"), "--size", "100TiB"],
        "--size 100TiB: ",
    ),
    "mkfs on a directory": (lambda p: ["mkfs", str(p / "old")], "is a directory"),
    "mkfs missing parent": (lambda p: ["mkfs", str(p / "nowhere" / "d.img")], "does not exist"),
    "mkfs journal -5": (
        lambda p: ["mkfs", str(p / "d.img"), "--journal-blocks", "-5"],
        "--journal-blocks: at least 256, got -5",
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_bad_cli_input_is_refused_before_anything_starts(place, case):
    argv, words = CLI_CASES[case]
    (place / "f").write_text("a file, not a directory\n")
    (place / "old").mkdir()
    (place / "old" / "lab.json").write_text("[]")
    try:
        args = argv(place)
        before = tree(place)
        r = cb(*args, cwd=place)
        assert_refused(r, words)
        assert tree(place) == before
        for wd in (place / "f", place / "old", place / "ro" / "lab"):
            no_lab_left(wd)
    finally:
        if (place / "ro").is_mount():
            subprocess.run(["umount", str(place / "ro")], check=True)
