"""The lab commands as a new user runs them: up, status, crash, inspect, down — and nothing left."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kernel.hw.host import physmem_path_for

pytestmark = [pytest.mark.root]


def cb(*args, check=True, cwd=None):
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"crashbench {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        )
    return r


def leftovers(workdir: Path) -> list[str]:
    left = []
    mounts = Path("/proc/mounts").read_text()
    if str(workdir) in mounts:
        left.append("mount")
    if os.path.exists(physmem_path_for(workdir)):
        left.append("physmem")
    if os.path.exists(physmem_path_for(workdir) + "-vmm"):
        left.append("vmm region")
    ps = subprocess.run(
        ["pgrep", "-f", f"(kernel.core.kernel|orthros.backup|supervisor).*{workdir}"],
        capture_output=True,
        text=True,
    )
    if ps.stdout.strip():
        left.append("process")
    from harness.lab import lab_tag

    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if f"cb{lab_tag(workdir)}" in ns:
        left.append("netns")
    return left


@pytest.fixture
def workdir():
    wd = Path(tempfile.mkdtemp(prefix="crashbench-lab-"))
    try:
        yield wd
    finally:
        if (wd / "lab.json").exists():
            cb("down", "--workdir", str(wd), check=False)
        subprocess.run(["rm", "-rf", str(wd)])


def test_up_crash_inspect_down_leaves_nothing(workdir):
    w = ["--workdir", str(workdir)]
    out = cb("up", *w).stdout
    assert "mounted at" in out and "198.18.0.1" in out
    second = cb("up", *w, check=False)
    assert second.returncode == 2 and "already running" in second.stderr
    st = json.loads(cb("status", *w, "--json").stdout)
    k = st["partitions"][0]["kernel"]
    assert k["alive"] and k["state"] == "running" and k["mounted"]
    Path(k["mount"], "notes.txt").write_text("unsaved work\n" * 500)
    res = json.loads(cb("crash", "--fault", "panic", "--wait", "--json", *w).stdout)
    assert res["report"]["verdict"] == "not recovered"
    assert res["report"]["detected_by"] == "dying message"
    info = json.loads(cb("inspect", "--json", *w).stdout)
    assert any(d["ino"] and d["dirty_pages"] == 2 for d in info["dirty_inodes"])
    assert info["mailbox"]["state"] == "panicked"
    assert info["mailbox"]["dying_message"] == "BUG: injected panic"
    assert info["processes"] == [] and info["rejected"] == []
    st = json.loads(cb("status", *w, "--json").stdout)
    assert st["partitions"][0]["kernel"]["state"] == "panicked"
    assert st["partitions"][0]["kernel"]["dying_message"] == "BUG: injected panic"
    cb("down", *w)
    assert leftovers(workdir) == []


def test_hang_is_reported_as_hung_and_down_cleans_it(workdir):
    w = ["--workdir", str(workdir)]
    cb("up", *w)
    res = json.loads(cb("crash", "--fault", "hang", "--wait", "--json", *w).stdout)
    assert res["report"]["detected_by"] == "heartbeat"
    cb("down", *w)
    assert leftovers(workdir) == []


def test_bad_input_is_refused_with_exit_2(workdir):
    w = ["--workdir", str(workdir)]
    r = cb("crash", "--fault", "meteor", *w, check=False)
    assert r.returncode == 2 and "unknown fault 'meteor'" in r.stderr
    r = cb("status", *w, check=False)
    assert r.returncode == 2 and "no lab in" in r.stderr
    bad = workdir / "m.toml"
    bad.write_text(
        '[machine]\nmemory = "1GiB"\n[[partition]]\ncpus = [0]\nmemory = { base = "0", size = "2GiB" }\n'
    )
    r = cb("up", "--machine", str(bad), *w, check=False)
    assert r.returncode == 2 and "beyond the machine's memory" in r.stderr
    r = cb("up", "--scheme", "reboot", "--keep-apps", *w, check=False)
    assert r.returncode == 2 and "--keep-apps: none of the schemes keeps" in r.stderr
    assert leftovers(workdir) == []


def test_reboot_scheme_recovers_twice_and_reports_phases(workdir):
    w = ["--workdir", str(workdir)]
    cb("up", "--scheme", "reboot", *w)
    for fault in ("panic", "kill"):
        mnt = json.loads(cb("status", *w, "--json").stdout)["partitions"][0]["kernel"]["mount"]
        Path(mnt, "f").write_text("x")
        out = cb("crash", "--fault", fault, "--wait", *w).stdout
        assert "recovery by reboot" in out and "crash to service" in out
    st = json.loads(cb("status", *w, "--json").stdout)
    k = st["partitions"][0]["kernel"]
    assert k["alive"] and k["state"] == "running"
    assert st["last_recovery"]["verdict"] in ("recovered", "recovered with loss")
    cb("down", *w)
    assert leftovers(workdir) == []


def test_orthros_lab_fails_over_twice_with_the_nic(workdir):
    w = ["--workdir", str(workdir)]
    # without keeping: kept processes would keep the NIC where they are
    out = cb("up", "--scheme", "orthros", "--no-keep-apps", *w).stdout
    assert "backup kernel" in out and "standby" in out and "processes kept" not in out
    assert json.loads(cb("status", *w, "--json").stdout)["keeps_processes"] is False
    mnt = json.loads(cb("status", *w, "--json").stdout)["partitions"][0]["kernel"]["mount"]
    for n, fault in enumerate(("panic", "hang")):
        Path(mnt, f"notes{n}.txt").write_text(f"unsaved {n}\n" * 1000)
        res = json.loads(cb("crash", "--fault", fault, "--wait", "--json", *w).stdout)
        r = res["report"]
        assert r["verdict"] == "recovered" and r["cache"]["dirty_pages_lost"] == 0
        assert "IP takeover" in [p["name"] for p in r["phases"]]
        st = json.loads(cb("status", *w, "--json").stdout)
        assert st["active"] == (1 if n == 0 else 0)
        net = st["network"]
        if net["mode"] == "netns":
            ns = subprocess.run(
                ["ip", "-n", net["netns"][str(st["active"])], "-o", "addr"],
                capture_output=True,
                text=True,
            ).stdout
            assert net["service_ip"] in ns  # the address moved with the service
    for n in range(2):
        assert Path(mnt, f"notes{n}.txt").read_text() == f"unsaved {n}\n" * 1000
    cb("down", *w)
    assert leftovers(workdir) == []


WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
i = 0
while not os.path.exists(sys.argv[2]):
    os.write(fd, b"%08d" % i * 512)  # 4 KiB, numbered
    i += 1
    time.sleep(0.01)
os.close(fd)
print(i)
"""


def test_an_orthros_lab_keeping_processes_lets_a_writer_on_the_mount_go_on(workdir):
    w = ["--workdir", str(workdir)]
    cb("up", "--scheme", "orthros", "--keep-apps", *w)
    st = json.loads(cb("status", *w, "--json").stdout)
    assert st["options"] == {"keep_processes": True} and st["keeps_processes"] is True
    path = Path(st["partitions"][0]["kernel"]["mount"], "stream.bin")
    stop = workdir / "stop-writing"
    argv = [sys.executable, "-c", WRITER, str(path), str(stop)]
    writer = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        for fault in ("panic", "kill"):
            res = json.loads(cb("crash", "--fault", fault, "--wait", "--json", *w).stdout)
            assert res["report"]["verdict"] == "recovered", fault
            assert writer.poll() is None, f"the writer stopped at the {fault}"
        stop.touch()
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0  # no error from the mount across two failovers
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert path.read_bytes() == b"".join(b"%08d" % i * 512 for i in range(int(out)))
    cb("down", *w)
    assert leftovers(workdir) == []


def test_warmcache_lab_keeps_the_cache_warm_through_a_crash(workdir):
    w = ["--workdir", str(workdir)]
    out = cb("up", "--scheme", "warmcache", *w).stdout
    assert "scheme: warmcache" in out
    mnt = json.loads(cb("status", *w, "--json").stdout)["partitions"][0]["kernel"]["mount"]
    data = os.urandom(64 * 4096)
    with open(Path(mnt, "kept"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    r = json.loads(cb("crash", "--fault", "panic", "--wait", "--json", *w).stdout)["report"]
    assert r["scheme"] == "warmcache" and r["verdict"] == "recovered"
    assert "cache check" in [p["name"] for p in r["phases"]]
    assert r["cache"]["pages_recovered"] >= 64
    assert Path(mnt, "kept").read_bytes() == data
    cb("down", *w)
    assert leftovers(workdir) == []


def test_demo_writes_its_results(workdir):
    r = cb("demo", "--workdir", str(workdir / "scratch"), "--out", str(workdir / "out"))
    assert "recovery by orthros" in r.stdout and "recovery by reboot" in r.stdout
    d = json.loads((workdir / "out" / "demo.json").read_text())
    assert d["schema_version"] == 1
    assert any(x["dirty_pages"] for x in d["inspect_after_crash"]["dirty_inodes"] if x["ino"])
    o, b = d["recovery_reports"]["orthros"], d["recovery_reports"]["reboot"]
    assert o["cache"]["dirty_pages_lost"] == 0 and o["verdict"] == "recovered"
    assert b["cache"]["dirty_pages_lost"] == b["cache"]["dirty_pages_before"] > 0
    assert leftovers(workdir / "scratch") == []


def test_a_failed_boot_leaves_no_process_set_or_anything_else(workdir):
    """The kernel joins its process set before it mounts; a boot that fails there (a disk
    image that is no crashbench file system) must not leave the set behind."""
    from harness import owners
    from harness.lab import lab_tag
    from kernel.hw.procset import ProcError, ProcessSet

    with open(workdir / "disk0.img", "wb") as f:
        f.write(b"\xa5" * (1 << 20))
    r = cb("up", "--workdir", str(workdir), check=False)
    assert r.returncode == 2 and "did not come up" in r.stderr, r.stdout + r.stderr
    for part in (0, 1):
        with pytest.raises(ProcError):
            ProcessSet(lab_tag(workdir), part, create=False)
    assert leftovers(workdir) == []
    assert not (workdir / "lab.json").exists()
    assert not any(x.tag == lab_tag(workdir) for x in owners.records())


def test_a_boot_failure_shows_its_real_cause_in_one_line(workdir):
    with open(workdir / "disk0.img", "wb") as f:
        f.truncate(20 << 20)  # an image of zeros: not a crashbench file system
    r = cb("up", "--workdir", str(workdir), check=False)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not a crashbench file system" in lines[0] and "watcher" not in r.stderr
    assert not (workdir / "lab.json").exists()
    assert leftovers(workdir) == []


def test_status_from_another_directory_finds_a_machine_named_relatively(workdir):
    from importlib import resources

    home, lab = workdir / "home", workdir / "lab"
    home.mkdir()
    (home / "m.toml").write_text(
        resources.files("kernel.hw.machines").joinpath("default.toml").read_text()
    )
    try:
        cb("up", "--machine", "m.toml", "--workdir", str(lab), cwd=home)
        st = json.loads(cb("status", "--json", "--workdir", str(lab), cwd=workdir).stdout)
        assert st["partitions"][0]["kernel"]["alive"]
    finally:
        if (lab / "lab.json").exists():
            cb("down", "--workdir", str(lab), check=False)
    assert leftovers(lab) == []
