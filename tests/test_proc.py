"""Processes of a partition: process sets and fencing, launching apps, the process table,
runtime-aware state segments and the demo editor.

Every process a test starts is in a process set that the fixture fences and removes in a
``finally`` (also when the test fails), and every kernel stand-in is killed there too;
physical memory is a file in the test's tmp_path. Waits are bounded (WAIT_S) and never
stand in for a result: what a test asserts is observed in /proc, a cgroup or memory.
"""

import ctypes
import ctypes.util
import os
import secrets
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kernel import param
from kernel.core import rtaware
from kernel.core.proc import (
    MODES,
    PF_FILES_OVERFLOW,
    PF_RUNTIME_AWARE,
    PF_USED,
    PROC_ENTRY,
    PROC_FILES,
    App,
    AppSpec,
    LaunchError,
    ProcError,
    ProcessSet,
    ProcTable,
    cleanup_stale,
    launch,
    read_proc_table,
)
from kernel.hw import procset
from kernel.hw.physmem import CorruptObject, PhysMem, partition_layout

ROOT = os.geteuid() == 0
SIZE = 64 << 20
WAIT_S = 15.0
LEN = param.PROC_STATE_BYTES
REPO = str(Path(__file__).resolve().parent.parent)
NCPU = os.cpu_count() or 1


def wait_for(cond, what: str, timeout: float = WAIT_S):
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting ({timeout} s) for {what}")
        time.sleep(0.005)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cmdline(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[:-1]


def dead(pid: int) -> bool:
    """Gone or a zombie (a zombie holds nothing; its reaper is not ours to wait for)."""
    try:
        return status(pid)["State"][0] in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return True


def doomed_or_dead(pid: int) -> bool:
    """Dead, or a SIGKILL is already pending for it: no waiting involved."""
    try:
        st = status(pid)
    except FileNotFoundError:
        return True
    pending = int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)
    return st["State"][0] in "ZX" or bool(pending & (1 << (signal.SIGKILL - 1)))


def tag() -> str:
    return "t" + secrets.token_hex(4)


def cgroup_leftovers(t: str) -> list[str]:
    return [p for m, p in procset._locations(f"{t}-p0").items() if os.path.exists(p)]


class Lab:
    """A process set plus everything started for it; ``close`` leaves nothing behind."""

    def __init__(self, mode: str | None):
        self.tag = tag()
        self.pset = ProcessSet(self.tag, 0, mode)
        self.apps: list[App] = []
        self.others: list[subprocess.Popen] = []
        self.strays: list[tuple[int, str | None]] = []  # (pid, start time): teardown kills

    def launch(self, spec: AppSpec, **kw) -> App:
        kw.setdefault("cpus", (0,))
        app = launch(spec, self.pset, **kw)
        self.apps.append(app)
        return app

    def popen(self, code: str, **kw) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
            **kw,
        )
        self.others.append(p)
        return p

    def close(self) -> None:
        try:
            for p in self.others:
                p.kill()
                p.wait()
            self.pset.remove()
            cleanup_stale(self.tag)
        finally:
            force_cleanup(self.tag)
            for pid, start in self.strays:
                if start is not None and _start(pid) == start:
                    os.kill(pid, signal.SIGKILL)
            for a in self.apps:  # apps are in the set; this only reaps (or kills strays)
                if a.alive():
                    a.popen.kill()
                a.popen.wait()
        assert not cgroup_leftovers(self.tag)


def _start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _kill_tree(registry: str) -> None:
    """pids mode: SIGKILL the registered processes (same start time) and all descendants."""
    procs = {}
    for n in os.listdir("/proc"):
        try:
            with open(f"/proc/{n}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            procs[int(n)] = (int(rest[1]), rest[19])
        except (OSError, ValueError):
            pass
    with open(registry) as f:
        todo = [
            int(x.split()[0])
            for x in f
            if x[0].isdigit() and procs.get(int(x.split()[0]), (0, None))[1] == x.split()[1]
        ]
    seen = set()
    while todo:
        p = todo.pop()
        if p not in seen and p != os.getpid():
            seen.add(p)
            todo += [c for c, (pp, _) in procs.items() if pp == p]
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def force_cleanup(t: str) -> None:
    """Last resort, not relying on the fencing under test: kill whatever a set of lab `t`
    still holds and remove it, so a failing test leaves nothing behind either."""
    for mode, path in procset._locations(f"{t}-p0").items():
        parent = os.path.dirname(path)
        names = [
            n
            for n in (os.listdir(parent) if os.path.isdir(parent) else [])
            if n.startswith(f"{t}-p")
        ]
        for n in names:
            d = os.path.join(parent, n)
            if mode == "pids":
                _kill_tree(d)
                os.unlink(d)
                continue
            if mode == "freezer":
                with open(os.path.join(d, "freezer.state"), "w") as f:
                    f.write("THAWED")
            end = time.monotonic() + WAIT_S
            while True:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    left = [int(x) for x in f.read().split()]
                if not left or time.monotonic() > end:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)
            os.rmdir(d)
        if names:
            try:
                os.rmdir(parent)
            except OSError:
                pass


def _lab(mode: str):
    if mode != "pids" and not ROOT:
        pytest.skip("cgroups need root")
    try:
        lb = Lab(mode)
    except ProcError as e:
        pytest.skip(f"mode {mode} unusable here: {e}")
    try:
        yield lb
    finally:
        lb.close()


@pytest.fixture(params=MODES)
def lab(request):
    yield from _lab(request.param)


@pytest.fixture(params=[m for m in MODES if m != "pids"])
def cg_lab(request):
    """Only the cgroup modes promise to find orphaned setsid() grandchildren."""
    yield from _lab(request.param)


@pytest.fixture
def mem(tmp_path):
    m = PhysMem(str(tmp_path / "physmem"), SIZE, create=True)
    try:
        yield m
    finally:
        m.close()


def second_mapping(tmp_path) -> PhysMem:
    return PhysMem(str(tmp_path / "physmem"), readonly=True)


# ---------------------------------------------------------------- launching


def test_launch_sets_cpus_set_env_cwd_and_log(lab, tmp_path):
    cpu = NCPU - 1
    log = tmp_path / "logs" / "app.log"
    app = lab.launch(
        AppSpec(
            "envapp",
            ["sh", "-c", 'echo "foo=$FOO"; pwd; exec sleep 1000'],
            cwd=str(tmp_path),
            env={"FOO": "bar baz"},
            log=str(log),
        ),
        cpus=(cpu,),
    )
    wait_for(lambda: log.exists() and str(tmp_path) in log.read_text(), "the app's log")
    wait_for(lambda: cmdline(app.pid) == [b"sleep", b"1000"], "the exec of sleep")  # exec settled
    st = status(app.pid)
    assert st["Cpus_allowed_list"] == str(cpu)
    assert app.pid in lab.pset.pids()
    assert os.readlink(f"/proc/{app.pid}/cwd") == str(tmp_path)
    with open(f"/proc/{app.pid}/environ", "rb") as f:
        assert b"FOO=bar baz" in f.read().split(b"\0")
    assert log.read_text().splitlines() == ["foo=bar baz", str(tmp_path)]
    assert os.getpgid(app.pid) == app.pid  # its own process group
    assert app.alive()
    assert app.stop(timeout=WAIT_S) == -signal.SIGTERM
    assert not app.alive() and app.pid not in lab.pset.pids()


@pytest.mark.root
def test_app_started_as_nobody_runs_as_nobody(lab, tmp_path):
    log = tmp_path / "id.log"
    app = lab.launch(
        AppSpec(
            "nobodyapp",
            ["sh", "-c", 'id -u; id -g; id -G; echo "$HOME"; exec sleep 1000'],
            cwd="/",
            user="nobody",
            log=str(log),
        )
    )
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 4, "the app's id output")
    wait_for(lambda: cmdline(app.pid) == [b"sleep", b"1000"], "the exec of sleep")
    nobody = __import__("pwd").getpwnam("nobody")
    uid, gid = str(nobody.pw_uid), str(nobody.pw_gid)
    st = status(app.pid)
    assert st["Uid"].split() == [uid] * 4 and st["Gid"].split() == [gid] * 4
    assert st["Groups"].split() == [gid]  # root's supplementary groups dropped
    assert log.read_text().splitlines() == [uid, gid, gid, nobody.pw_dir]
    assert app.pid in lab.pset.pids()


_CLONE_NEWNET = 0x40000000


@pytest.mark.root
def test_netns_enter_runs_in_the_child_before_the_user_switch(lab):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    def enter():  # what kernel/hw/net.py's Network.enter does, into a fresh namespace
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare")

    mine = os.stat("/proc/self/ns/net").st_ino
    app = lab.launch(AppSpec("nsapp", ["sleep", "1000"], user="nobody"), netns_enter=enter)
    assert os.stat(f"/proc/{app.pid}/ns/net").st_ino != mine
    assert os.stat("/proc/self/ns/net").st_ino == mine
    assert status(app.pid)["Uid"].split()[0] != "0"


def test_failed_launches_name_the_step_and_leave_nothing(lab):
    def broken():
        raise OSError("no such namespace")

    with pytest.raises(LaunchError, match="network namespace: .*no such namespace"):
        lab.launch(AppSpec("a", ["sleep", "1000"]), netns_enter=broken)
    with pytest.raises(LaunchError, match="exec /no/such/binary"):
        lab.launch(AppSpec("b", ["/no/such/binary"]))
    with pytest.raises(LaunchError, match="user: no such user"):
        lab.launch(AppSpec("c", ["sleep", "1000"], user="no-such-user-here"))
    with pytest.raises(LaunchError, match="cpus"):
        lab.launch(AppSpec("d", ["sleep", "1000"]), cpus=(NCPU + 5,))
    with pytest.raises(ValueError, match="name"):
        AppSpec("x" * 40, ["sleep"])
    with pytest.raises(ValueError, match="argv"):
        AppSpec("e", "sleep 1")
    assert lab.pset.pids() == []


# ---------------------------------------------------------------- fencing

GRANDCHILD = """
import os, sys, time
out, orphan = sys.argv[1], sys.argv[2] == "orphan"
c = os.fork()
if c == 0:                      # the child: a new session, then a grandchild
    os.setsid()
    with open(out + ".child", "w") as f:
        f.write(str(os.getpid()))
    if os.fork() == 0:
        with open(out + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(out + ".tmp", out)
        time.sleep(1000)
    if orphan:
        os._exit(0)             # the grandchild is reparented away from the app
    time.sleep(1000)
if orphan:
    os.waitpid(c, 0)
time.sleep(1000)
"""


def _spawn_family(lab, tmp_path, orphan: bool):
    """app -> child (setsid) -> grandchild; with `orphan` the child exits at once, so the
    grandchild is reparented away from the app: only a cgroup still knows it."""
    out = tmp_path / "grandchild.pid"
    app = lab.launch(
        AppSpec(
            "family", [sys.executable, "-c", GRANDCHILD, str(out), "orphan" if orphan else "stay"]
        )
    )
    gpid = int(wait_for(lambda: out.exists() and out.read_text(), "the grandchild"))
    cpid = int((tmp_path / "grandchild.pid.child").read_text())
    lab.strays += [(p, _start(p)) for p in (app.pid, cpid, gpid)]  # for teardown only
    n = 2 if orphan else 3
    wait_for(lambda: len(lab.pset.pids()) == n, f"{n} processes in the set")
    st = status(gpid)
    assert int(st["PPid"]) != app.pid and os.getsid(gpid) != os.getsid(app.pid)
    return app, gpid


def test_fence_kills_setsid_descendants(lab, tmp_path):
    app, gpid = _spawn_family(lab, tmp_path, orphan=False)
    members = lab.pset.pids()
    assert app.pid in members and gpid in members
    rep = lab.pset.fence()
    assert rep.killed == 3 and set(rep.pids) == set(members)
    assert rep.mode == lab.pset.mode and rep.seconds >= 0
    assert all(dead(p) for p in members)
    assert lab.pset.pids() == []


def test_fence_kills_orphaned_setsid_grandchildren(cg_lab, tmp_path):
    lab = cg_lab
    app, gpid = _spawn_family(lab, tmp_path, orphan=True)
    assert int(status(gpid)["PPid"]) != app.pid  # orphaned: outside the app's tree
    rep = lab.pset.fence()
    assert rep.killed == 2 and set(rep.pids) == {app.pid, gpid}
    assert dead(app.pid) and dead(gpid)
    assert lab.pset.pids() == []


KERNEL_STANDIN = """
import os, sys, threading, time
from kernel.core.proc import AppSpec, ProcessSet, launch
ps = ProcessSet({tag!r}, 0, {mode!r}, create=False)
if {join}:
    ps.add(os.getpid())
box = {{}}
def go():
    box["tid"] = threading.get_native_id()
    box["apps"] = [launch(AppSpec("app%d" % i, ["sleep", "1000"]), ps, cpus=(0,)) for i in range({n})]
t = threading.Thread(target=go)
t.start()
t.join()
while os.path.exists("/proc/self/task/%d" % box["tid"]):   # the launching thread is gone
    time.sleep(0.001)
print(" ".join(str(a.pid) for a in box["apps"]), flush=True)
time.sleep(1000)
"""


def readline(p: subprocess.Popen, timeout: float = WAIT_S) -> str:
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, "the helper process said nothing"
    return p.stdout.readline()


def _standin(lab, n: int, join: bool) -> tuple[subprocess.Popen, list[int]]:
    k = lab.popen(KERNEL_STANDIN.format(tag=lab.tag, mode=lab.pset.mode, join=join, n=n))
    pids = [int(x) for x in readline(k).split()]
    assert len(pids) == n, "the kernel stand-in did not start its apps"
    return k, pids


def test_fence_kills_the_kernel_with_its_apps(lab):
    k, apps = _standin(lab, 2, join=True)
    assert set(lab.pset.pids()) == {k.pid, *apps}
    rep = lab.pset.fence()
    assert rep.killed == 3 and set(rep.pids) == {k.pid, *apps}
    assert k.wait(WAIT_S) == -signal.SIGKILL
    assert all(dead(p) for p in apps)


def test_app_dies_with_its_kernel_not_with_the_launching_thread(lab):
    k, (app,) = _standin(lab, 1, join=False)
    # The thread that called launch() has exited; the app must not have been signalled.
    assert not doomed_or_dead(app)
    os.kill(k.pid, signal.SIGKILL)  # the kernel alone (not the set)
    k.wait()
    wait_for(lambda: dead(app), "the app to die with its kernel (PR_SET_PDEATHSIG)")


def test_a_process_never_fences_its_own_set(lab):
    k = lab.popen(f"""
        import os
        from kernel.core.proc import ProcessSet, ProcError
        ps = ProcessSet({lab.tag!r}, 0, {lab.pset.mode!r}, create=False)
        ps.add(os.getpid())
        try:
            ps.fence()
            print("fenced")
        except ProcError as e:
            print("refused", e)
    """)
    out = readline(k)
    assert k.wait(WAIT_S) == 0 and out.startswith("refused"), out


# ---------------------------------------------------------------- set life cycle and modes


def test_sets_attach_across_processes_and_cleanup_stale_removes_everything(lab, monkeypatch):
    monkeypatch.delenv(procset.MODE_ENV, raising=False)
    other = ProcessSet(lab.tag, 0)  # auto mode: attaches to the existing set
    assert (other.mode, other.path) == (lab.pset.mode, lab.pset.path)
    ps1 = ProcessSet(lab.tag, 1, lab.pset.mode)
    a0 = lab.launch(AppSpec("s0", ["sleep", "1000"]))
    a1 = launch(AppSpec("s1", ["sleep", "1000"]), ps1, cpus=(0,))
    lab.apps.append(a1)
    reports = cleanup_stale(lab.tag)
    assert sorted((r.name, r.killed) for r in reports) == [
        (f"{lab.tag}-p0", 1),
        (f"{lab.tag}-p1", 1),
    ]
    assert dead(a0.pid) and dead(a1.pid)
    assert not lab.pset.exists() and not ps1.exists()
    lab.pset.remove()  # idempotent
    assert lab.pset.fence().killed == 0  # a fence of a set that is gone is a no-op
    with pytest.raises(ProcError, match="does not exist"):
        ProcessSet(lab.tag, 0, create=False)


def test_unusable_cgroups_degrade_to_the_pids_registry(tmp_path, monkeypatch):
    fake = {"cgroup2": str(tmp_path / "v2"), "freezer": str(tmp_path / "v1")}
    for p in fake.values():
        os.mkdir(p)  # plain directories, not cgroups
    monkeypatch.setattr(procset, "_cgroup_mounts", lambda: fake)
    monkeypatch.delenv(procset.MODE_ENV, raising=False)
    t = tag()
    ps = ProcessSet(t, 0)
    try:
        assert ps.mode == "pids"
        assert "cgroup.kill" in ps.why_not["cgroup2"] and "freezer.state" in ps.why_not["freezer"]
        assert os.listdir(fake["cgroup2"]) == [] and os.listdir(fake["freezer"]) == []
    finally:
        ps.remove()
    assert not ps.exists()
    with pytest.raises(ValueError, match="tag"):
        ProcessSet("Bad/Tag", 0)


# ---------------------------------------------------------------- the process table


def fake_app(pid: int, name: str, argv=("prog", "--x"), runtime_aware=False, uid=0) -> App:
    popen = SimpleNamespace(pid=pid, poll=lambda: None)
    return App(AppSpec(name, list(argv), runtime_aware=runtime_aware), popen, (0,), uid)


def test_proc_table_round_trip_from_a_second_mapping(mem, tmp_path):
    lay = partition_layout(0, 0, SIZE)
    tab = ProcTable(mem, lay)
    editor = fake_app(4242, "editor", ("python", "-m", "editor"), runtime_aware=True, uid=65534)
    web = fake_app(4343, "web")
    ss = tab.reserve_state()
    seen = []
    mem.watchers.append(lambda phys, data: seen.append((phys, len(data))))
    s_editor = tab.register(editor, state_slot=ss)
    s_web = tab.register(web)
    assert tab.record_open(4242, 17, os.O_RDWR)
    assert tab.record_open(4242, 17, os.O_RDWR)  # same handle twice: two references
    assert tab.record_open(4242, 18, os.O_RDONLY)
    assert tab.record_open(4343, 99, os.O_WRONLY | os.O_APPEND)
    assert tab.record_close(4242, 18)
    assert not tab.record_open(999999, 5, 0)  # not a registered app
    assert not tab.record_close(4343, 12345)  # never opened
    table = range(lay.proc, lay.proc + lay.n_proc * PROC_ENTRY.size)
    assert len(seen) == 7 and all(p in table and p + n - 1 in table for p, n in seen)

    r = second_mapping(tmp_path)
    try:
        entries, rejected = read_proc_table(r, lay)
    finally:
        r.close()
    assert rejected == []
    by = {e["name"]: e for e in entries}
    assert set(by) == {"editor", "web"}
    e = by["editor"]
    assert (e["slot"], e["pid"], e["uid"], e["state_slot"]) == (s_editor, 4242, 65534, ss)
    assert e["flags"] == PF_USED | PF_RUNTIME_AWARE and e["runtime_aware"]
    assert e["state_phys"] == lay.state_phys(ss)
    assert e["argv_hash"] == editor.spec.argv_hash() != web.spec.argv_hash()
    assert e["files"] == [{"fh": 17, "ino": 17, "oflags": os.O_RDWR, "refs": 2}]
    w = by["web"]
    assert (w["slot"], w["state_slot"], w["runtime_aware"]) == (s_web, None, False)
    assert w["files"] == [{"fh": 99, "ino": 99, "oflags": os.O_WRONLY | os.O_APPEND, "refs": 1}]
    assert sorted(tab.entries(), key=lambda x: x["slot"]) == sorted(
        entries, key=lambda x: x["slot"]
    )

    assert tab.unregister(4343) and not tab.unregister(4343)
    entries, rejected = read_proc_table(mem, lay)
    assert [x["name"] for x in entries] == ["editor"] and rejected == []


def test_open_files_beyond_the_entry_are_flagged_not_lost_silently(mem):
    lay = partition_layout(0, 0, SIZE)
    tab = ProcTable(mem, lay)
    tab.register(fake_app(7, "many"))
    for ino in range(1, PROC_FILES + 3):
        assert tab.record_open(7, ino, 0)
    (e,), _ = read_proc_table(mem, lay)
    assert len(e["files"]) == PROC_FILES and e["files_overflow"] and e["flags"] & PF_FILES_OVERFLOW


def test_opens_by_a_thread_count_for_its_process(mem):
    lay = partition_layout(0, 0, SIZE)
    tab = ProcTable(mem, lay)
    tab.register(fake_app(os.getpid(), "me"))
    box, done = {}, threading.Event()

    def thread():
        box["tid"] = threading.get_native_id()
        done.wait(WAIT_S)

    t = threading.Thread(target=thread)
    t.start()
    try:
        tid = wait_for(lambda: box.get("tid"), "the thread id")
        assert tid != os.getpid() and tab.record_open(tid, 5, 0)
    finally:
        done.set()
        t.join()
    assert tab.entries()[0]["files"] == [{"fh": 5, "ino": 5, "oflags": 0, "refs": 1}]


def test_a_release_without_a_pid_closes_the_record_of_its_handle(mem):
    # the host sends FUSE RELEASE without credentials: pid 0
    lay = partition_layout(0, 0, SIZE)
    tab = ProcTable(mem, lay, keep_apps=True)
    tab.register(fake_app(7, "web"))
    tab.opened(7, 40, os.O_RDONLY)
    tab.opened(7, 41, os.O_RDONLY)
    tab.released(0, 40)
    (e,), _ = read_proc_table(mem, lay)
    assert e["files"] == [{"fh": 41, "ino": 41, "oflags": os.O_RDONLY, "refs": 1}]


def test_a_release_without_a_pid_closes_the_right_holder_of_a_shared_inode(mem):
    # two processes hold inode 40 open, each through its own handle (open id in the high
    # half); the second's release comes from a kernel thread, pid 0, after it exited
    lay = partition_layout(0, 0, SIZE)
    tab = ProcTable(mem, lay, keep_apps=True)
    tab.register(fake_app(7, "first"))
    tab.register(fake_app(8, "second"))
    first, second = 1 << 32 | 40, 2 << 32 | 40
    tab.opened(7, first, os.O_RDONLY)
    tab.opened(8, second, os.O_RDONLY)
    tab.released(0, second)
    files = {e["name"]: e["files"] for e in read_proc_table(mem, lay)[0]}
    assert files == {
        "first": [{"fh": first, "ino": 40, "oflags": os.O_RDONLY, "refs": 1}],
        "second": [],
    }
    assert not tab.record_release(second)  # released once, gone


def test_an_adopted_entry_keeps_pid_name_argv_hash_and_open_files(mem, tmp_path):
    dead, mine = partition_layout(0, 0, SIZE // 2), partition_layout(1, SIZE // 2, SIZE // 2)
    old = ProcTable(mem, dead)
    old.register(fake_app(4343, "web"))
    old.record_open(4343, 99, os.O_WRONLY)
    (e,), _ = read_proc_table(mem, dead)
    new = ProcTable(mem, mine, keep_apps=True)
    new.adopt(e)
    (a,), rejected = read_proc_table(mem, mine)
    assert rejected == []
    same = ("pid", "name", "argv_hash", "uid", "started_ns", "files")
    assert {k: a[k] for k in same} == {k: e[k] for k in same}
    with pytest.raises(ValueError):
        new.adopt(e)  # one pid, one entry
    assert [r[:2] for r in new.open_file_records()] == [(4343, "web")]


def test_an_entry_adopted_in_its_own_partition_keeps_its_state_segment(mem):
    lay = partition_layout(0, 0, SIZE)
    old = ProcTable(mem, lay)
    old.register(fake_app(4444, "editor", runtime_aware=True), state_slot=3)
    (e,), _ = read_proc_table(mem, lay)
    new = ProcTable(mem, lay, keep_apps=True)  # the crash kernel's table, same partition
    new.adopt(e, keep_state=True)
    (a,), _ = read_proc_table(mem, lay)
    assert a["runtime_aware"] and a["state_slot"] == 3
    assert new.reserve_state() != 3  # an app started now never gets the kept one's segment
    moved = ProcTable(mem, partition_layout(0, 0, SIZE))
    moved.adopt(e)  # elsewhere: entered without the segment
    (b,), _ = read_proc_table(mem, lay)
    assert not b["runtime_aware"] and b["state_slot"] is None


def test_read_proc_table_rejects_each_corruption_with_its_own_message(mem, tmp_path):
    lay = partition_layout(0, 0, SIZE)
    tab = ProcTable(mem, lay)
    slots = [tab.register(fake_app(100 + i, f"app{i}")) for i in range(5)]
    phys = [tab.phys(s) for s in slots]
    mem.write(phys[0], b"XXXX")  # bad magic
    raw = bytearray(mem.read(phys[1], PROC_ENTRY.size))
    raw[40] ^= 0x01  # a bit of the name
    mem.write(phys[1], bytes(raw))
    mem.write(
        phys[2],
        PROC_ENTRY.encode(flags=PF_USED | PF_RUNTIME_AWARE, pid=102, state_slot=999, name=b"app2"),
    )  # valid, but out of bounds
    for p, pid in ((phys[3], 103), (phys[4], 104)):  # one segment, two owners
        mem.write(
            p,
            PROC_ENTRY.encode(flags=PF_USED | PF_RUNTIME_AWARE, pid=pid, state_slot=3, name=b"dup"),
        )
    r = second_mapping(tmp_path)
    try:
        entries, rejected = read_proc_table(r, lay)
    finally:
        r.close()
    assert entries == []
    why = {e.phys: (e.field, str(e)) for e in rejected}
    assert len(rejected) == 5 and set(why) == set(phys)
    assert why[phys[0]][0] == "magic" and "bad magic" in why[phys[0]][1]
    assert why[phys[1]][0] == "checksum" and "bad checksum" in why[phys[1]][1]
    assert why[phys[2]][0] == "state_slot" and "999 outside" in why[phys[2]][1]
    assert why[phys[3]][0] == why[phys[4]][0] == "state_slot"
    assert "claimed by 2 entries" in why[phys[3]][1]
    assert all("process-table entry at" in m for _, m in why.values())


# ---------------------------------------------------------------- runtime-aware state


@pytest.fixture
def seg(mem, tmp_path):
    lay = partition_layout(0, 0, SIZE)
    phys = lay.state_phys(2)
    rtaware.clear_state(mem, phys, LEN)
    s = rtaware.StateSegment.from_env(
        {
            rtaware.ENV_PHYSMEM: str(tmp_path / "physmem"),
            rtaware.ENV_STATE_PHYS: str(phys),
            rtaware.ENV_STATE_LEN: str(LEN),
        }
    )
    try:
        yield s
    finally:
        s.close()


def test_state_save_load_round_trip(seg, tmp_path):
    assert seg.load() is None and seg.last_scan.empty
    assert seg.save(b"first") == 1 and seg.load() == b"first"
    assert seg.save(b"") == 2 and seg.load() == b""
    big = os.urandom(seg.capacity)
    assert seg.save(big) == 3 and seg.load() == big
    r = second_mapping(tmp_path)
    try:
        assert rtaware.read_state(r, seg.phys, LEN) == big
    finally:
        r.close()
    with pytest.raises(ValueError, match="exceeds"):
        seg.save(big + b"!")
    assert seg.load() == big


def _torn(seg, new: bytes, cut: int) -> None:
    """Replay the stores of save(new) up to byte `cut` of their concatenation: a crash."""
    _, stores = seg.plan(new)
    for off, data in stores:
        n = min(len(data), max(0, cut))
        seg.mm[off : off + n] = data[:n]
        cut -= len(data)


@pytest.mark.parametrize(
    "prior,new",
    [(b"older", b"A" * 1000), (b"old state", b"old state+more"), (b"older", os.urandom(5000))],
    ids=["other", "extends-old", "random"],
)
def test_a_torn_save_keeps_the_previous_valid_state(seg, tmp_path, prior, new):
    old = b"old state"
    seg.save(prior)  # the half the next save overwrites
    seg.save(old)
    _, stores = seg.plan(new)
    total = sum(len(d) for _, d in stores)
    plen = len(stores[0][1])
    cuts = sorted({0, 1, plen // 2, plen - 1, plen, *range(plen, total)})  # every header byte
    base = bytes(seg.mm[:])
    r = second_mapping(tmp_path)
    try:
        for cut in cuts:
            seg.mm[:] = base
            _torn(seg, new, cut)
            assert seg.load() == old, f"crash after {cut} of {total} bytes"
            assert rtaware.read_state(r, seg.phys, LEN) == old
        seg.mm[:] = base
        _torn(seg, new, total)  # the save completed
        assert seg.load() == new and rtaware.read_state(r, seg.phys, LEN) == new
    finally:
        r.close()


def test_a_torn_first_save_leaves_no_state(seg, tmp_path):
    _torn(seg, b"x" * 100, 100)  # payload written, header not yet
    assert seg.load() is None
    _torn(seg, b"x" * 100, 130)  # header half written
    assert seg.load() is None and seg.last_scan.rejected
    r = second_mapping(tmp_path)
    try:
        with pytest.raises(CorruptObject, match="checksum"):
            rtaware.read_state(r, seg.phys, LEN)  # something is there and nothing validates
    finally:
        r.close()


def test_a_corrupted_segment_is_rejected(seg, mem, tmp_path):
    seg.save(b"only state")
    half = None
    for h in (0, 1):
        if bytes(seg.mm[h * LEN // 2 : h * LEN // 2 + 4]) == b"RTST":
            half = h * LEN // 2
    r = second_mapping(tmp_path)
    try:
        seg.mm[half + 64] ^= 0x40  # a bit of the payload
        with pytest.raises(CorruptObject, match="payload checksum mismatch") as e:
            rtaware.read_state(r, seg.phys, LEN)
        assert e.value.field == "payload"
        seg.mm[half + 64] ^= 0x40
        seg.mm[half : half + 4] = b"JUNK"  # the header's magic
        with pytest.raises(CorruptObject, match="bad magic") as e:
            rtaware.read_state(r, seg.phys, LEN)
        assert e.value.field == "magic"
        mem.write(seg.phys + half, rtaware.STATE_HEADER.encode(seq=9, length=LEN, payload_csum=0))
        with pytest.raises(CorruptObject, match="beyond the half") as e:
            rtaware.read_state(r, seg.phys, LEN)  # a checksummed header that lies
        assert e.value.field == "length"
        # Two records: the newest corrupted, the previous one is returned and the
        # rejection is reported, not hidden.
        rtaware.clear_state(mem, seg.phys, LEN)
        seg.save(b"v1")
        seg.save(b"v2")
        newest = seg.scan().half * (LEN // 2)
        seg.mm[newest + 64] ^= 0xFF
        scan = rtaware.scan_state(r, seg.phys, LEN)
        assert scan.payload == b"v1" and [x.field for x in scan.rejected] == ["payload"]
    finally:
        r.close()


# ---------------------------------------------------------------- the demo editor


def _log_lines(path: Path) -> list[str]:
    """The complete lines of a log another process is writing."""
    text = path.read_text() if path.exists() else ""
    return text[: text.rfind("\n") + 1].splitlines()


def test_editor_survives_its_crash_through_its_state_segment(lab, mem, tmp_path):
    lay0 = partition_layout(0, 0, SIZE // 2)
    lay1 = partition_layout(1, SIZE // 2, SIZE // 2)
    tab0 = ProcTable(mem, lay0)
    fifo, log = tmp_path / "editor.fifo", tmp_path / "editor.log"
    spec = AppSpec(
        "editor",
        [sys.executable, "-m", "kernel.apps.rtaware_editor", "--fifo", str(fifo)],
        cwd=REPO,
        log=str(log),
        runtime_aware=True,
    )
    app = tab0.launch(spec, lab.pset, cpus=(0,))
    lab.apps.append(app)
    wait_for(
        lambda: fifo.exists() and any(x.startswith("loaded") for x in _log_lines(log)), "the editor"
    )
    assert _log_lines(log)[0].startswith("loaded seq=0 lines=0")
    with open(fifo, "w") as f:
        f.write("hello\nworld\n")
    wait_for(lambda: any("lines=2" in x for x in _log_lines(log)), "two saved lines")
    os.kill(app.pid, signal.SIGUSR1)
    wait_for(lambda: any("lines=3" in x for x in _log_lines(log)), "the signal line")
    acked = _log_lines(log)[-1]

    lab.pset.fence()  # the crash: the editor gets no warning
    app.wait()
    r = second_mapping(tmp_path)
    try:
        (entry,), rejected = read_proc_table(r, lay0)
        assert rejected == [] and entry["name"] == "editor" and entry["runtime_aware"]
        assert entry["argv_hash"] == spec.argv_hash() and entry["pid"] == app.pid
        state = rtaware.read_state(r, entry["state_phys"], LEN)
    finally:
        r.close()
    assert state == b"hello\nworld\nsignal 1\n"

    # Resurrection in partition 1: a new segment holding the dead process's state.
    tab1 = ProcTable(mem, lay1)
    log.write_text("")
    app2 = tab1.launch(spec, lab.pset, cpus=(0,), state=state)
    lab.apps.append(app2)
    assert lay1.state <= lay1.state_phys(app2.state_slot) < lay1.icore
    wait_for(lambda: _log_lines(log), "the resurrected editor")
    first = _log_lines(log)[0]
    assert first.startswith("loaded seq=1 lines=3") and first.split()[-1] == acked.split()[-1]
    with open(fifo, "w") as f:
        f.write("again\n")
    wait_for(
        lambda: any("lines=4" in x for x in _log_lines(log)), "the resurrected editor to go on"
    )
    assert (
        rtaware.read_state(mem, lay1.state_phys(app2.state_slot), LEN)
        == b"hello\nworld\nsignal 1\nagain\n"
    )
    app2.stop(WAIT_S)
    assert [a.name for a in tab1.reap()] == ["editor"] and read_proc_table(mem, lay1) == ([], [])


CRASH_PROC = """
import sys, time
from kernel.core import rtaware
if sys.argv[1] == "yes":
    rtaware.on_crash(lambda: print("crash procedure ran", flush=True))
print("ready", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("registers", [True, False])
def test_a_registered_crash_procedure_is_seen_by_the_kernel_and_runs_on_its_signal(registers):
    p = subprocess.Popen(
        [sys.executable, "-c", CRASH_PROC, "yes" if registers else "no"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert readline(p).strip() == "ready"
        assert rtaware.catches_crash_signal(p.pid) == registers
        if registers:
            os.kill(p.pid, rtaware.CRASH_SIGNAL)
            assert readline(p).strip() == "crash procedure ran"
    finally:
        p.kill()
        p.wait()
    assert not rtaware.catches_crash_signal(p.pid)  # no such process: nothing registered
