"""Every registered scheme honours the contract of systems/base.py, and its declared capabilities.

Each registered scheme (the ``crashbench.schemes`` entry points: a new one is covered by
registering it) is deployed on the default machine with its NIC up and a runtime-aware
application, holds fsynced and unsynced files, and is crashed by ``panic``, ``kill`` and
``hang`` through its own ``inject``. Its report must pass ``check_report`` and match what
it declares (``Capabilities``) and what happened: a scheme that keeps the dirty cache has
every dirty page back and the unsynced files byte for byte; one that does not claims none;
one that keeps processes resumes the application with its unsaved state, one that recovers
without it restarts it empty. A scheme that declares ``keeps_processes_in_request`` is
also crashed by ``panic`` and ``kill`` inside a create request, and must keep the cache,
the editor (same pid) and the request's file. After ``teardown`` nothing of the deployment remains: no
kernel or application process, process set, mount, memory or VMM file, namespace.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.testbed import Testbed
from kernel.hw import machine
from kernel.hw.procset import ProcError, ProcessSet
from systems import base
from systems.base import RegistryError, check_report, registry

PAGE = 4096
# other modes of a scheme (its options), held to the contract as the scheme itself is
VARIANTS = {"orthros+restart": lambda: registry()["orthros"](keep_processes=False)}
FILES, PAGES_EACH = 3, 10
DETECTED_BY = {"panic": "dying message", "kill": "heartbeat", "hang": "heartbeat"}
LINES = b"first line\nsecond line\n"  # the editor's unsaved buffer at the crash
N_LINES = 2


class Deployment:
    """A scheme deployed on a fresh machine with its network and one runtime-aware editor."""

    def __init__(self, name: str):
        self.bed = Testbed(kind="test", delay=False, network=True)
        self.scheme = VARIANTS[name]() if name in VARIANTS else registry()[name]()

    def deploy(self) -> None:
        self.bed.up()
        self.host, self.net, self.wd = self.bed.host, self.bed.net, self.bed.workdir
        self.fifo, self.log = self.wd / "editor.fifo", self.wd / "editor.log"
        apps = [
            {
                "name": "editor",
                "runtime_aware": True,
                "log": str(self.log),
                "argv": [
                    sys.executable,
                    "-m",
                    "kernel.apps.rtaware_editor",
                    "--fifo",
                    str(self.fifo),
                ],
            }
        ]
        self.bed.deploy(self.scheme, apps)

    @property
    def mount(self) -> Path:
        return Path(self.host.kernels[self.scheme.active].mount)

    def loaded(self) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return [ln for ln in text.splitlines() if ln.startswith("loaded")]

    def wait_log(self, ok, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                log = self.log.read_text() if self.log.exists() else "(no log)"
                raise AssertionError(f"{what} within {timeout} s; the editor's log:\n{log}")
            time.sleep(0.05)

    def editor_pid(self) -> int:
        ps = subprocess.run(["pgrep", "-f", str(self.fifo)], capture_output=True, text=True)
        (pid,) = ps.stdout.split()
        return int(pid)

    def teardown(self) -> list[str]:
        """The scheme's own teardown (and the network's, which the harness owns); what remains."""
        if self.bed.host is None:
            return []
        try:
            self.scheme.teardown()
        finally:
            self.net.down()
        return self.leftovers()

    def close(self) -> None:
        self.bed.down()  # whatever a failed deploy or teardown left

    def leftovers(self) -> list[str]:
        left = []
        if str(self.wd) in Path("/proc/mounts").read_text():
            left.append("mount")
        left += [
            f"/dev/shm/{f}"
            for f in os.listdir("/dev/shm")
            if f"/dev/shm/{f}".startswith(self.host.physmem)
        ]
        ps = subprocess.run(["pgrep", "-f", str(self.wd)], capture_output=True, text=True).stdout
        left += [f"process {pid}" for pid in ps.split()]
        for p in self.host.machine.partitions:
            try:
                ProcessSet(self.host.tag, p.id, create=False)
                left.append(f"process set of partition {p.id}")
            except ProcError:
                pass
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [ln for ln in ns.splitlines() if ln.startswith(f"cb{self.host.tag}-")]
        return left


def write_files(mnt: Path, prefix: str, synced: bool) -> dict[str, bytes]:
    files = {f"{prefix}{i}": os.urandom(PAGES_EACH * PAGE) for i in range(FILES)}
    for name, data in files.items():
        with open(mnt / name, "wb") as f:
            f.write(data)
            if synced:
                f.flush()
                os.fsync(f.fileno())
    return files


@pytest.mark.root
@pytest.mark.parametrize("fault", sorted(DETECTED_BY))
@pytest.mark.parametrize("name", sorted(registry()) + sorted(VARIANTS))
def test_a_scheme_keeps_its_contract_and_its_declared_capabilities(name, fault):
    d = Deployment(name)
    caps = d.scheme.capabilities
    try:
        assert len(machine.load().partitions) >= caps.partitions_needed
        d.deploy()
        d.wait_log(lambda: d.loaded(), "the editor did not start")
        fd = os.open(d.fifo, os.O_WRONLY)
        os.write(fd, LINES)
        os.close(fd)
        d.wait_log(
            lambda: f"lines={N_LINES}" in d.log.read_text(), "the editor did not take its lines"
        )
        editor = d.editor_pid()
        synced = write_files(d.mount, "s", synced=True)
        unsynced = write_files(d.mount, "u", synced=False)

        reply = d.scheme.inject(fault)
        assert reply["ok"], reply
        r = check_report(d.scheme.on_crash(reply, timeout=60))

        assert (r.scheme, r.fault, r.detected_by) == (d.scheme.name, fault, DETECTED_BY[fault])
        assert r.recovered == caps.recovers
        c = r.cache
        if caps.recovers:  # a scheme that recovers counts what the dead kernel held
            assert c.dirty_pages_before == FILES * PAGES_EACH
        if caps.keeps_dirty_cache:
            assert c.dirty_pages_recovered == c.dirty_pages_before and c.dirty_pages_lost == 0
        else:
            assert c.dirty_pages_recovered == 0 and c.dirty_pages_lost == c.dirty_pages_before
        if caps.keeps_cache:  # the fsynced files' pages were clean in the cache
            assert c.pages_recovered - c.dirty_pages_recovered >= FILES * PAGES_EACH
        else:
            assert c.pages_recovered == 0 and c.pages_preserved == 0
        assert ("cache migration" in [p.name for p in r.phases]) == caps.migrates_cache
        if not caps.recovers:
            assert r.service_at is None and r.verdict == "not recovered"
            assert r.processes_recovered == 0
            return

        assert r.processes_before == r.processes_recovered == 1
        for fname, data in synced.items():
            assert (d.mount / fname).read_bytes() == data, f"{fname} differs after recovery"
        if caps.keeps_dirty_cache:
            for fname, data in unsynced.items():
                assert (d.mount / fname).read_bytes() == data, f"{fname} differs after recovery"
        (d.mount / "after").write_bytes(b"served")
        assert (d.mount / "after").read_bytes() == b"served"
        if caps.keeps_unmodified_processes:  # the editor ran on: never loaded again
            assert [(p.name, p.pid, p.fate) for p in r.processes] == [
                ("editor", editor, "preserved")
            ]
            fd = os.open(d.fifo, os.O_WRONLY)
            os.write(fd, b"third line\n")
            os.close(fd)
            d.wait_log(
                lambda: f"lines={N_LINES + 1}" in d.log.read_text(), "the kept editor went not on"
            )
            assert len(d.loaded()) == 1 and d.editor_pid() == editor
            return
        d.wait_log(lambda: len(d.loaded()) >= 2, "the editor did not come back")
        lines = N_LINES if caps.keeps_processes else 0
        assert d.loaded()[-1].split()[2] == f"lines={lines}"
    finally:
        try:
            left = d.teardown()
        finally:
            d.close()
    assert not left, f"{name} left behind after teardown: {left}"


# the schemes that declare they keep the processes when the kernel dies inside a request
IN_REQUEST = sorted(n for n, c in registry().items() if c.capabilities.keeps_processes_in_request)


@pytest.mark.root
@pytest.mark.parametrize("fault", ["panic", "kill"])
@pytest.mark.parametrize("name", IN_REQUEST)
def test_a_death_inside_a_request_keeps_the_processes_the_cache_and_the_request(name, fault):
    d = Deployment(name)
    try:
        d.deploy()
        d.wait_log(lambda: d.loaded(), "the editor did not start")
        fd = os.open(d.fifo, os.O_WRONLY)
        os.write(fd, LINES)
        os.close(fd)
        d.wait_log(
            lambda: f"lines={N_LINES}" in d.log.read_text(), "the editor did not take its lines"
        )
        editor = d.editor_pid()
        unsynced = write_files(d.mount, "u", synced=False)
        during = os.urandom(3 * PAGE)
        reply = d.scheme.inject(fault, site="vfs.create")  # the next create dies in its request
        assert reply["ok"], reply
        writer = threading.Thread(target=(d.mount / "during").write_bytes, args=(during,))
        writer.start()
        r = check_report(d.scheme.on_crash(reply, timeout=60))
        writer.join(30)
        assert not writer.is_alive(), "the request in hand at the death was never answered"
        assert r.recovered and "cache migration" in [p.name for p in r.phases]
        c = r.cache
        assert c.dirty_pages_before >= FILES * PAGES_EACH
        assert c.dirty_pages_recovered == c.dirty_pages_before and c.pages_rejected == 0
        assert [(p.name, p.pid, p.fate) for p in r.processes] == [("editor", editor, "preserved")]
        for fname, data in unsynced.items():
            assert (d.mount / fname).read_bytes() == data, f"{fname} differs after recovery"
        assert (d.mount / "during").read_bytes() == during
        fd = os.open(d.fifo, os.O_WRONLY)
        os.write(fd, b"third line\n")
        os.close(fd)
        d.wait_log(
            lambda: f"lines={N_LINES + 1}" in d.log.read_text(), "the kept editor went not on"
        )
        assert len(d.loaded()) == 1 and d.editor_pid() == editor
    finally:
        try:
            left = d.teardown()
        finally:
            d.close()
    assert not left, f"{name} left behind after teardown: {left}"


def _with_entry_points(monkeypatch, *eps: tuple[str, str]) -> None:
    from importlib.metadata import EntryPoint

    real = base.entry_points
    extra = [EntryPoint(n, v, base.SCHEME_GROUP) for n, v in eps]
    monkeypatch.setattr(base, "entry_points", lambda group: [*real(group=group), *extra])


def test_the_registry_finds_a_scheme_from_another_package_by_its_entry_point(monkeypatch):
    _with_entry_points(monkeypatch, ("lab-only", "tests.test_conformance:LabOnly"))
    reg = registry()
    assert reg["lab-only"] is LabOnly and {"none", "reboot", "orthros", "warmcache"} <= set(reg)
    assert "tests.lab_only_kernel" in base.kernel_modules.__wrapped__()


@pytest.mark.parametrize(
    "value, says",
    [
        (
            "systems.no_such_scheme:Gone",
            "crashbench.schemes entry point 'broken' "
            "(systems.no_such_scheme:Gone) failed to load: ModuleNotFoundError",
        ),
        (
            "tests.test_conformance:LabOnly",
            "entry point 'broken' (tests.test_conformance:LabOnly) "
            "is named 'lab-only', not 'broken'",
        ),
        ("tests.test_conformance:NotAScheme", "entry point 'broken' is not a RecoveryScheme"),
    ],
)
def test_a_bad_entry_point_is_refused_naming_it(monkeypatch, value, says):
    _with_entry_points(monkeypatch, ("broken", value))
    with pytest.raises(RegistryError) as e:
        registry()
    assert says in str(e.value)


class LabOnly(base.RecoveryScheme):
    """A scheme registered only by the tests above (never deployed)."""

    name = "lab-only"
    kernel_modules = ("kernel.core.kernel", "tests.lab_only_kernel")

    def deploy(self, host, apps=()) -> None:
        raise NotImplementedError

    def on_crash(self, fault=None, timeout=60.0):
        raise NotImplementedError


class NotAScheme:
    name = "broken"
