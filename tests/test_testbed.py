"""The testbed (harness/testbed.py): a machine up, then down on every exit path.

Normal exit, an exception, SIGTERM, a failed bring-up and a failed scheme teardown each
leave no kernel, mount, memory file or scratch directory; the ownership record lives exactly
as long as the machine (and outlives a teardown that failed, so `down --all` finds it).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import owners
from harness.testbed import Testbed
from kernel.hw.machine import MachineError
from systems.base import RecoveryScheme


@pytest.fixture
def records(tmp_path, monkeypatch):
    d = tmp_path / "owners"
    monkeypatch.setattr(owners, "owners_dir", lambda: d)
    return d


def gone(bed_paths: dict) -> list[str]:
    left = [what for what, p in bed_paths.items() if os.path.exists(p)]
    if bed_paths["workdir"] in Path("/proc/mounts").read_text():
        left.append("mount")
    return left


def paths_of(bed: Testbed) -> dict:
    return {"workdir": str(bed.workdir), "memory": bed.host.physmem}


@pytest.mark.root
def test_an_exception_inside_the_block_still_takes_everything_down(records):
    with pytest.raises(RuntimeError, match="inside"):
        with Testbed(kind="test", delay=False) as bed:
            kp = bed.host.boot(0)
            seen = paths_of(bed)
            assert os.path.ismount(kp.mount) and (records / f"{bed.host.tag}.json").exists()
            raise RuntimeError("inside")
    assert gone(seen) == [] and not os.path.exists(seen["workdir"])
    assert list(records.glob("*.json")) == []


class BrokenTeardown(RecoveryScheme):
    name = "broken-teardown"

    def deploy(self, host, apps=()) -> None:
        self.host = host
        host.boot(0)

    def on_crash(self, fault=None, timeout=60.0):
        raise NotImplementedError

    def teardown(self) -> None:
        raise OSError("the scheme could not stop")


@pytest.mark.root
def test_a_failed_scheme_teardown_still_closes_the_host_and_keeps_the_record(records):
    with pytest.raises(OSError, match="could not stop"):
        with Testbed(kind="test", delay=False) as bed:
            bed.deploy(BrokenTeardown())
            seen = paths_of(bed)
    assert gone(seen) == []  # kernel, mount, memory, scratch dir
    assert [r.tag for r in owners.records()] == [bed.host.tag]  # `down --all` finds it


def test_a_failed_bring_up_removes_the_scratch_directory_it_made(tmp_path, records, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(MachineError):
        with Testbed(kind="test", machine_file=str(tmp_path / "no-such-machine.toml")):
            pass
    assert list(scratch.iterdir()) == [] and list(records.glob("*.json")) == []


def test_a_testbed_given_a_work_directory_keeps_it(tmp_path, records):
    wd = tmp_path / "lab"
    with Testbed(kind="test", workdir=wd, delay=False) as bed:
        assert bed.workdir == wd.resolve()
        mem = bed.host.physmem
        assert os.path.exists(mem)
    assert wd.is_dir() and not os.path.exists(mem)


@pytest.mark.root
def test_sigterm_takes_the_machine_down_like_ctrl_c(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from harness.testbed import Testbed
        with Testbed(kind="test", delay=False) as bed:
            kp = bed.host.boot(0)
            print(bed.workdir, bed.host.physmem, bed.host.tag, flush=True)
            time.sleep(120)
    """)
    p = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        workdir, memory, tag = p.stdout.readline().split()
        assert os.path.ismount(f"{workdir}/mnt-p0")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(workdir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone({"workdir": workdir, "memory": memory}) == []
    assert tag not in [r.tag for r in owners.records()]
