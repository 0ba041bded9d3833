"""Ownership records (harness/owners.py): a machine whose owner lives is never an orphan nor
touched; one whose owner died, or whose pid now names another process, is; a damaged
record is reported, never trusted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import owners


@pytest.fixture
def registry(tmp_path, monkeypatch):
    d = tmp_path / "machines"
    monkeypatch.setattr(owners, "owners_dir", lambda: d)
    return d


def _scratch(tmp_path, name: str):
    wd = tmp_path / name
    (wd / "logs").mkdir(parents=True)
    return wd


def test_a_living_owner_is_no_orphan_and_its_machine_is_not_touched(tmp_path, registry):
    wd = _scratch(tmp_path, "alive")
    owners.claim("run", wd, "a1b2c3", str(tmp_path / "mem"), workdir_made=True)
    assert [r.tag for r in owners.records()] == ["a1b2c3"] and owners.orphans() == []
    assert owners.warning("run") is None
    with pytest.raises(ValueError, match="its owner is alive; not touched"):
        owners.clean(owners.records()[0])
    assert wd.is_dir()
    owners.release("a1b2c3")
    assert owners.records() == []


def test_a_dead_or_reused_owner_makes_an_orphan_that_clean_removes(tmp_path, registry):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    for tag, owner in (
        ("d0d0d0", {"pid": int(dead), "start": 1}),
        ("e0e0e0", {"pid": os.getpid(), "start": 1}),
    ):  # pid reused
        wd = _scratch(tmp_path, tag)
        mem = tmp_path / f"mem-{tag}"
        mem.write_bytes(b"\0" * 4096)
        owners.claim("run", wd, tag, str(mem), workdir_made=True)
        rec = json.loads((registry / f"{tag}.json").read_text())
        (registry / f"{tag}.json").write_text(json.dumps(dict(rec, owner=owner)))
    found = owners.orphans()
    assert [r.tag for r in found] == ["d0d0d0", "e0e0e0"]
    assert "`crashbench down --all` removes them" in owners.warning("up")
    for r in found:
        done = owners.clean(r)
        assert f"removed {tmp_path / ('mem-' + r.tag)}" in done
        assert f"removed {tmp_path / r.tag}" in done
        assert not (tmp_path / r.tag).exists()
    assert owners.records() == []


def test_a_damaged_record_is_reported_and_only_its_file_removed(tmp_path, registry):
    registry.mkdir()
    (registry / "f0f0f0.json").write_text('{"kind": "run", "tag": "f0f0f0", "workdir": "/"}')
    [r] = owners.orphans()
    assert "damaged record" in r.describe()
    assert owners.clean(r) == [f"removed {r.describe()}"]
    assert owners.records() == []
