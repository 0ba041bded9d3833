"""Processes of a partition: launching apps, the process table in physical memory.

Promises to the kernel daemon (kernel/core/kernel.py), to the recovery schemes (systems/) and to
the harness:

* The partition's process set and fencing live in kernel/hw/procset.py (``ProcessSet``,
  ``fence``, ``FenceReport``, ``cleanup_stale``; re-exported here): a cgroup per partition,
  so a fence kills the kernel and every app of its partition, setsid() grandchildren
  included.
* ``launch(spec, pset, netns_enter=, cpus=)`` starts an app as a real process: its own
  process group, CPU affinity ``cpus``, the network namespace ``netns_enter`` (a preexec
  callable, kernel/hw/net.py ``Network.enter``), cwd, environment, user/group (dropped last,
  after everything that needs root), stdout+stderr appended to its log, joined to the set
  before it execs, and PR_SET_PDEATHSIG(SIGKILL) so it dies at once when its kernel
  process dies. Every fork is made by one long-lived launcher thread: the parent-death
  signal fires when the *thread* that forked exits, and a pool thread that ends would
  kill its apps. A launch that fails raises ``LaunchError`` naming the step.
* ``ProcTable(mem, lay)`` is the partition's process table in physical memory (one
  ``PROC_ENTRY`` of PROC_ENTRY_BYTES per process; every store through ``mem.write``):
  pid, flags (USED, RUNTIME_AWARE, FILES_OVERFLOW), name, argv hash (to match the app
  against the deployment's specs for a restart), uid, state-segment slot, and up to
  ``PROC_FILES`` open files (file handle, open flags, references) recorded by the kernel.
  More open files than fit set FILES_OVERFLOW: the list is then known to be incomplete.
  The FUSE server reports opens and releases to ``opened``/``released`` when the kernel
  keeps its apps (``keep_apps``: apps launched without a parent-death signal). A record
  is keyed by the file handle, which names one open file of the host (kernel/core/fuse.py):
  a release closes the record of its handle in whichever process holds it, so one that
  comes without a pid (the host sends it from a kernel thread after the process exited)
  closes exactly that open, never another holder's of the same inode;
  ``adopt(entry)`` enters a process kept from a dead kernel's table, with its open files
  (and, ``keep_state``, in the dead kernel's own partition, with its state segment).
  Free entries are all zeros. ``ProcTable.launch`` reserves a state segment for a
  runtime-aware app, tells the app where it is (kernel/core/rtaware.py), launches and
  registers it.
* ``read_proc_table(mem, lay)`` reads a (possibly dead) kernel's table from raw memory:
  every non-zero entry is validated (magic, version, checksum, flags, pid, state-slot
  bounds, a state segment claimed twice, file records) and what fails is returned as a
  ``CorruptObject`` in ``rejected``, never as an entry.

Process-table entry (PROC_ENTRY_BYTES = 256, little-endian)::

    0   magic "PROC" u32 | version u16 | flags u16
    8   pid u32 | state_slot i32 (-1: none)
    16  uid u32 | n_files u16 | pad u16
    24  started_ns u64 (CLOCK_MONOTONIC at register)
    32  argv_hash u64 (xxh3-64 of the NUL-joined argv)
    40  name 32 bytes (UTF-8, NUL-padded)
    72  PROC_FILES x { fh u64 (inode in the low 32 bits) | oflags u32 | refs u32 }
    248 csum u64 (xxh3-64 of bytes 0..247)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd
import queue
import signal
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import xxhash

from kernel import param
from kernel.hw.physmem import CorruptObject, Layout, PartLayout, PhysMem
from kernel.hw.procset import (
    MODES,
    FenceError,
    FenceReport,
    ProcError,
    ProcessSet,
    _kill,
    cleanup_stale,
)

__all__ = [
    "AppSpec",
    "App",
    "launch",
    "argv_hash",
    "name_thread",
    "LaunchError",
    "ProcTable",
    "ProcTableFull",
    "read_proc_table",
    "PROC_ENTRY",
    "PROC_FILES",
    "PF_USED",
    "PF_RUNTIME_AWARE",
    "PF_FILES_OVERFLOW",
    # kernel/hw/procset.py
    "ProcessSet",
    "FenceReport",
    "FenceError",
    "ProcError",
    "cleanup_stale",
    "MODES",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def name_thread(name: str) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) as its name in /proc
    (``task/<tid>/comm``), so CPU accounting from outside can tell the thread apart."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    if _libc.prctl(_PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


class LaunchError(ProcError):
    """An app could not be started; the message names the app and the step that failed."""


# ---------------------------------------------------------------- launching apps

NAME_BYTES = 32


@dataclass
class AppSpec:
    """One application of a partition. ``env`` is added to the launcher's environment
    (with HOME, USER and LOGNAME of ``user`` when one is given); ``user``/``group`` are
    names or numeric ids (group defaults to the user's primary group); ``log`` receives
    stdout and stderr (appended); ``runtime_aware`` apps get a state segment."""

    name: str
    argv: Sequence[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | int | None = None
    log: str | None = None
    runtime_aware: bool = False
    group: str | int | None = None

    def __post_init__(self):
        if (
            not isinstance(self.name, str)
            or not self.name
            or "\0" in self.name
            or len(self.name.encode()) > NAME_BYTES
        ):
            raise ValueError(
                f"name: {self.name!r} must be 1-{NAME_BYTES} bytes of UTF-8 without NUL"
            )
        if (
            isinstance(self.argv, (str, bytes))
            or not self.argv
            or not all(isinstance(a, str) and "\0" not in a for a in self.argv)
        ):
            raise ValueError(
                f"argv of {self.name}: must be a non-empty list of strings without NUL"
            )
        self.argv = list(self.argv)
        for k, v in self.env.items():
            if (
                not isinstance(k, str)
                or not isinstance(v, str)
                or not k
                or "=" in k
                or "\0" in k + v
            ):
                raise ValueError(f"env of {self.name}: bad variable {k!r}={v!r}")

    def argv_hash(self) -> int:
        return argv_hash(self.argv)


def argv_hash(argv: Sequence[str]) -> int:
    return xxhash.xxh3_64_intdigest("\0".join(argv).encode())


class App:
    """A launched app. The launching process is its parent and reaps it."""

    def __init__(self, spec: AppSpec, popen: subprocess.Popen, cpus: tuple[int, ...], uid: int):
        self.spec, self.popen, self.cpus, self.uid = spec, popen, cpus, uid
        self.pid, self.name = popen.pid, spec.name
        self.table_slot: int | None = None  # set by ProcTable.register
        self.state_slot: int | None = None  # set by ProcTable.launch (runtime-aware apps)

    def __repr__(self) -> str:
        return f"App({self.name!r}, pid={self.pid}, alive={self.alive()})"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL (to its process group) after `timeout`; its exit status."""
        if self.alive():
            _kill(self.pid, signal.SIGTERM)
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    _kill(self.pid)
        return self.popen.wait()


class _Launcher:
    """Runs every fork on one long-lived thread (see the module docstring: PDEATHSIG)."""

    def __init__(self):
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._q: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable):
        if threading.current_thread() is self._thread:
            return fn()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._q = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._loop, args=(self._q,), name="crashbench-launcher", daemon=True
                )
                self._thread.start()
            q = self._q
        fut: Future = Future()
        q.put((fn, fut))
        return fut.result()

    @staticmethod
    def _loop(q: queue.SimpleQueue) -> None:
        while True:
            fn, fut = q.get()
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)
            del fn, fut


_launcher = _Launcher()


def _resolve_user(spec: AppSpec) -> tuple[int, int, list[int], dict[str, str]] | None:
    if spec.user is None and spec.group is None:
        return None
    env: dict[str, str] = {}
    try:
        pw = (
            pwd.getpwnam(spec.user)
            if isinstance(spec.user, str)
            else pwd.getpwuid(os.getuid() if spec.user is None else spec.user)
        )
    except KeyError:
        if not isinstance(spec.user, int):
            raise LaunchError(f"{spec.name}: user: no such user {spec.user!r}") from None
        pw = None
    uid = pw.pw_uid if pw else spec.user
    if spec.group is not None:
        try:
            gid = grp.getgrnam(spec.group).gr_gid if isinstance(spec.group, str) else spec.group
        except KeyError:
            raise LaunchError(f"{spec.name}: group: no such group {spec.group!r}") from None
    elif pw is not None:
        gid = pw.pw_gid
    else:
        raise LaunchError(f"{spec.name}: user: uid {spec.user} has no passwd entry; give group too")
    groups = os.getgrouplist(pw.pw_name, gid) if pw else [gid]
    if pw is not None:
        env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name}
    if os.geteuid() != 0 and (uid != os.geteuid() or gid != os.getegid()):
        raise LaunchError(f"{spec.name}: user: running as uid {uid} gid {gid} needs root")
    return uid, gid, groups, env


def launch(
    spec: AppSpec,
    pset: ProcessSet,
    *,
    netns_enter: Callable[[], None] | None = None,
    cpus: Sequence[int],
    pass_fds: Sequence[int] = (),
    keep: bool = False,
) -> App:
    """Start `spec` as a real process of the partition (see the module docstring).
    ``keep``: no parent-death signal and its own session (not only its own group), so
    the process outlives its kernel process for a scheme that keeps processes to continue it.

    In the child, in this order: own process group, cwd, join `pset`, `netns_enter()`,
    CPU affinity, drop to user/group, PR_SET_PDEATHSIG(SIGKILL) (after the credential
    change, which would clear it), check the parent still lives, clear the signal mask,
    exec."""
    cpus = tuple(cpus)
    ncpu = os.cpu_count() or 1
    if not cpus or not all(isinstance(c, int) and 0 <= c < ncpu for c in cpus):
        raise LaunchError(
            f"{spec.name}: cpus: {cpus!r} must be CPUs of this machine (0-{ncpu - 1})"
        )
    if spec.cwd is not None and not os.path.isdir(spec.cwd):
        raise LaunchError(f"{spec.name}: cwd: {spec.cwd} is not a directory")
    cred = _resolve_user(spec)
    env = dict(os.environ)
    if cred:
        env.update(cred[3])
    env.update(spec.env)
    join = pset.child_join()
    parent = os.getpid()
    errr, errw = os.pipe2(os.O_CLOEXEC)

    def preexec() -> None:
        step = "join the process set"
        try:
            join()
            step = "enter the network namespace"
            if netns_enter is not None:
                netns_enter()
            step = "set CPU affinity"
            os.sched_setaffinity(0, cpus)
            if cred is not None:
                step = "switch user"
                os.setgroups(cred[2])
                os.setgid(cred[1])
                os.setuid(cred[0])
            step = "set the parent-death signal"
            if not keep and _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
            if not keep and os.getppid() != parent:  # the kernel died before we could notice
                os.kill(os.getpid(), signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
        except BaseException as e:
            os.write(errw, f"{step}: {e}".encode(errors="replace"))
            raise

    logf = None
    try:
        if spec.log:
            os.makedirs(os.path.dirname(os.path.abspath(spec.log)), exist_ok=True)
            logf = open(spec.log, "ab")
        out = logf if logf is not None else subprocess.DEVNULL
        try:
            popen = _launcher.run(
                lambda: subprocess.Popen(
                    spec.argv,
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=preexec,
                    # a kept app gets its own session: a stopped process group orphaned by
                    # its kernel's death would be sent SIGHUP
                    process_group=None if keep else 0,
                    start_new_session=keep,
                    close_fds=True,
                    pass_fds=tuple(pass_fds),
                )
            )
        except subprocess.SubprocessError:
            os.close(errw)
            errw = -1
            why = os.read(errr, 4096).decode(errors="replace") or "preexec failed"
            raise LaunchError(f"{spec.name}: {why}") from None
        except OSError as e:
            raise LaunchError(f"{spec.name}: exec {spec.argv[0]}: {e.strerror or e}") from None
    finally:
        if logf is not None:
            logf.close()
        if errw >= 0:
            os.close(errw)
        os.close(errr)
    return App(spec, popen, cpus, cred[0] if cred else os.geteuid())


# ---------------------------------------------------------------- the process table

PF_USED, PF_RUNTIME_AWARE, PF_FILES_OVERFLOW = 1, 2, 4
_PF_ALL = PF_USED | PF_RUNTIME_AWARE | PF_FILES_OVERFLOW
_HEAD = [
    ("pid", "I"),
    ("state_slot", "i"),
    ("uid", "I"),
    ("n_files", "H"),
    ("pad", "H"),
    ("started_ns", "Q"),
    ("argv_hash", "Q"),
    ("name", f"{NAME_BYTES}s"),
]
_HEAD_BYTES = 8 + 4 + 4 + 4 + 2 + 2 + 8 + 8 + NAME_BYTES
_FILE_BYTES = 16
PROC_FILES = (param.PROC_ENTRY_BYTES - _HEAD_BYTES - 8) // _FILE_BYTES
_FILE_FIELDS = [
    (f"f{i}_{k}", c)
    for i in range(PROC_FILES)
    for k, c in (("fh", "Q"), ("oflags", "I"), ("refs", "I"))
]
FH_INO = 0xFFFF_FFFF  # the inode number in a file handle's low half
PROC_ENTRY = Layout("process-table entry", "PROC", 2, _HEAD + _FILE_FIELDS, param.PROC_ENTRY_BYTES)
_ZERO_ENTRY = bytes(PROC_ENTRY.size)


class ProcTableFull(ProcError):
    """No free process-table entry or state segment."""


class ProcTable:
    """The partition's process table, kept by its kernel (see the module docstring).

    ``clear=True`` (a booting kernel owns its table) zeroes every entry first."""

    def __init__(
        self, mem: PhysMem, lay: PartLayout, *, clear: bool = True, keep_apps: bool = False
    ):
        self.mem, self.lay, self.keep_apps = mem, lay, keep_apps
        self._lock = threading.Lock()
        self._slot_of: dict[int, int] = {}  # pid -> table slot
        self._e: dict[int, dict] = {}  # table slot -> entry values
        self._states: set[int] = set()  # state slots in use
        self._apps: dict[int, App] = {}  # table slot -> the App launched here
        if clear:
            mem.write(lay.proc, bytes(lay.n_proc * PROC_ENTRY.size))

    def phys(self, slot: int) -> int:
        return self.lay.proc + slot * PROC_ENTRY.size

    # --- state segments -------------------------------------------------------------------
    def reserve_state(self, payload: bytes | None = None) -> int:
        """A free state segment, emptied (or holding `payload` as its one valid state: how a
        resurrected process finds the state it had in the dead partition)."""
        from kernel.core import rtaware

        with self._lock:
            free = [s for s in range(self.lay.n_state) if s not in self._states]
            if not free:
                raise ProcTableFull(
                    f"partition {self.lay.part_id}: all {self.lay.n_state} state segments in use"
                )
            slot = free[0]
            self._states.add(slot)
        phys = self.lay.state_phys(slot)
        rtaware.clear_state(self.mem, phys, param.PROC_STATE_BYTES)
        if payload is not None:
            rtaware.write_state(self.mem, phys, param.PROC_STATE_BYTES, payload)
        return slot

    def release_state(self, slot: int) -> None:
        with self._lock:
            self._states.discard(slot)

    def state_env(self, slot: int, fd: int | None = None) -> dict[str, str]:
        """What a runtime-aware app is told about its state segment (kernel/core/rtaware.py)."""
        from kernel.core import rtaware

        env = {
            rtaware.ENV_PHYSMEM: self.mem.path,
            rtaware.ENV_STATE_PHYS: str(self.lay.state_phys(slot)),
            rtaware.ENV_STATE_LEN: str(param.PROC_STATE_BYTES),
        }
        if fd is not None:
            env[rtaware.ENV_PHYSMEM_FD] = str(fd)
        return env

    def launch(
        self,
        spec: AppSpec,
        pset: ProcessSet,
        *,
        netns_enter=None,
        cpus: Sequence[int],
        state: bytes | None = None,
    ) -> App:
        """Launch and register `spec`; a runtime-aware app first gets a state segment
        (holding `state` if given) and an inherited descriptor of physical memory, so it can
        map its segment also when it runs as a user who may not open the file."""
        if not spec.runtime_aware:
            app = launch(spec, pset, netns_enter=netns_enter, cpus=cpus, keep=self.keep_apps)
            self.register(app)
            return app
        slot = self.reserve_state(state)
        fd = os.open(self.mem.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            s = AppSpec(
                spec.name,
                spec.argv,
                spec.cwd,
                {**spec.env, **self.state_env(slot, fd)},
                spec.user,
                spec.log,
                spec.runtime_aware,
                spec.group,
            )
            app = launch(
                s, pset, netns_enter=netns_enter, cpus=cpus, pass_fds=(fd,), keep=self.keep_apps
            )
        except BaseException:
            self.release_state(slot)
            raise
        finally:
            os.close(fd)
        app.spec = spec
        self.register(app, state_slot=slot)
        return app

    # --- entries ------------------------------------------------------------------------
    def _store(self, slot: int) -> None:
        e = self._e[slot]
        vals = [
            PROC_ENTRY.magic,
            PROC_ENTRY.version,
            e["flags"],
            e["pid"],
            e["state_slot"],
            e["uid"],
            sum(1 for f in e["files"] if f[2]),
            0,
            e["started_ns"],
            e["argv_hash"],
            e["name"],
        ]
        for fh, oflags, refs in e["files"]:
            vals += (fh, oflags, refs)
        self.mem.write(self.phys(slot), PROC_ENTRY.encode_tuple(tuple(vals)))

    def register(self, app: App, state_slot: int | None = None) -> int:
        """Enter a launched app; returns its table slot (also ``app.table_slot``)."""
        if state_slot is None:
            state_slot = app.state_slot
        if app.spec.runtime_aware and state_slot is None:
            raise ValueError(
                f"register {app.name}: a runtime-aware app needs its state segment "
                "(launch it with ProcTable.launch, or pass state_slot)"
            )
        if state_slot is not None and not 0 <= state_slot < self.lay.n_state:
            raise ValueError(
                f"register {app.name}: state_slot {state_slot} out of 0-{self.lay.n_state - 1}"
            )
        with self._lock:
            if app.pid in self._slot_of:
                raise ValueError(f"register {app.name}: pid {app.pid} is already registered")
            free = [s for s in range(self.lay.n_proc) if s not in self._e]
            if not free:
                raise ProcTableFull(
                    f"partition {self.lay.part_id}: all {self.lay.n_proc} "
                    "process-table entries in use"
                )
            slot = free[0]
            flags = PF_USED | (PF_RUNTIME_AWARE if app.spec.runtime_aware else 0)
            self._e[slot] = {
                "flags": flags,
                "pid": app.pid,
                "state_slot": -1 if state_slot is None else state_slot,
                "uid": app.uid,
                "started_ns": time.monotonic_ns(),
                "argv_hash": app.spec.argv_hash(),
                "name": app.spec.name.encode(),
                "files": [(0, 0, 0)] * PROC_FILES,
            }
            if state_slot is not None:
                self._states.add(state_slot)
            self._slot_of[app.pid] = slot
            self._apps[slot] = app
            self._store(slot)
        app.table_slot, app.state_slot = slot, state_slot
        return slot

    def adopt(self, entry: dict, keep_state: bool = False) -> int:
        """Enter a process kept from a dead kernel's table (an entry ``read_proc_table``
        validated), with its open files; returns its slot. It has no App here: the dead
        kernel launched it, and init reaps it. ``keep_state``: the table is the dead
        kernel's own partition's, so a runtime-aware process keeps its state segment
        (still mapped by it) and stays runtime-aware; otherwise it is entered without."""
        files = [(f["fh"], f["oflags"], f["refs"]) for f in entry["files"]]
        files += [(0, 0, 0)] * (PROC_FILES - len(files))
        state = entry["state_slot"] if keep_state and entry["state_slot"] is not None else -1
        with self._lock:
            if state >= 0 and state in self._states:
                raise ValueError(f"adopt {entry['name']}: state segment {state} already in use")
            if entry["pid"] in self._slot_of:
                raise ValueError(f"adopt {entry['name']}: pid {entry['pid']} already registered")
            free = [s for s in range(self.lay.n_proc) if s not in self._e]
            if not free:
                raise ProcTableFull(f"partition {self.lay.part_id}: process table full")
            slot = free[0]
            self._e[slot] = {
                "flags": entry["flags"] & ~(0 if state >= 0 else PF_RUNTIME_AWARE),
                "pid": entry["pid"],
                "state_slot": state,
                "uid": entry["uid"],
                "started_ns": entry["started_ns"],
                "argv_hash": entry["argv_hash"],
                "name": entry["name"].encode()[:NAME_BYTES],
                "files": files,
            }
            self._slot_of[entry["pid"]] = slot
            if state >= 0:
                self._states.add(state)
            self._store(slot)
        return slot

    def open_file_records(self) -> list[tuple[int, str, int]]:
        """(pid, name, physical address) of every open-file record in use."""
        with self._lock:
            return [
                (
                    e["pid"],
                    e["name"].decode(errors="replace"),
                    self.phys(slot) + _HEAD_BYTES + _FILE_BYTES * i,
                )
                for slot, e in sorted(self._e.items())
                for i, f in enumerate(e["files"])
                if f[2]
            ]

    # the FUSE server's open-file hooks (kernel/core/fuse.py ``files``)
    def opened(self, pid: int, fh: int, flags: int) -> None:
        self.record_open(pid, fh, flags)

    def released(self, pid: int, fh: int) -> None:
        # The pid is not used: the host sends RELEASE from a kernel thread (pid 0) once
        # the last holder let go, and the handle alone names the open file.
        self.record_release(fh)

    def record_release(self, fh: int) -> bool:
        """Release the open file `fh` in whichever process holds its record; False if none."""
        with self._lock:
            return any(self._close_in(slot, fh) for slot in list(self._e))

    def _lookup(self, pid: int) -> int | None:
        """Table slot of `pid`, also when `pid` is a thread of a registered process (FUSE
        reports the thread id of the caller). Called with the lock held."""
        slot = self._slot_of.get(pid)
        if slot is not None or not self._slot_of:
            return slot
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Tgid:"):
                        return self._slot_of.get(int(line.split()[1]))
        except (OSError, ValueError):
            pass
        return None

    def record_open(self, pid: int, fh: int, oflags: int) -> bool:
        """The kernel opened handle `fh` for `pid`; False when `pid` is not a registered app."""
        with self._lock:
            slot = self._lookup(pid)
            if slot is None:
                return False
            e = self._e[slot]
            files = e["files"]
            for i, (ffh, fl, refs) in enumerate(files):
                if refs and ffh == fh and fl == oflags:
                    files[i] = (fh, oflags, refs + 1)
                    break
            else:
                for i, (_, _, refs) in enumerate(files):
                    if not refs:
                        files[i] = (fh, oflags, 1)
                        break
                else:
                    e["flags"] |= PF_FILES_OVERFLOW  # the list is now known incomplete
            self._store(slot)
            return True

    def record_close(self, pid: int, fh: int) -> bool:
        """The kernel released handle `fh` of `pid`; False when none was recorded."""
        with self._lock:
            slot = self._lookup(pid)
            return slot is not None and self._close_in(slot, fh)

    def _close_in(self, slot: int, fh: int) -> bool:
        """One reference to `fh` less in the entry at `slot`. Called with the lock held."""
        files = self._e[slot]["files"]
        for i, (ffh, fl, refs) in enumerate(files):
            if refs and ffh == fh:
                files[i] = (fh, fl, refs - 1) if refs > 1 else (0, 0, 0)
                self._store(slot)
                return True
        return False

    def unregister(self, pid: int) -> bool:
        """The app exited: its entry is zeroed and its state segment freed."""
        with self._lock:
            slot = self._slot_of.pop(pid, None)
            if slot is None:
                return False
            e = self._e.pop(slot)
            self._apps.pop(slot, None)
            if e["state_slot"] >= 0:
                self._states.discard(e["state_slot"])
            self.mem.write(self.phys(slot), _ZERO_ENTRY)
            return True

    def reap(self) -> list[App]:
        """Unregister every app launched through this table that has exited; those apps."""
        with self._lock:
            gone = [a for a in self._apps.values() if a.popen.poll() is not None]
        for a in gone:
            self.unregister(a.pid)
        return gone

    def entries(self) -> list[dict]:
        """This kernel's own view (no validation needed), in read_proc_table's form."""
        with self._lock:
            return [
                _entry_dict(slot, self.phys(slot), e, e["files"], self.lay)
                for slot, e in sorted(self._e.items())
            ]


def _entry_dict(slot: int, phys: int, d: dict, files, lay: PartLayout) -> dict:
    ss = d["state_slot"]
    return {
        "slot": slot,
        "phys": phys,
        "pid": d["pid"],
        "flags": d["flags"],
        "runtime_aware": bool(d["flags"] & PF_RUNTIME_AWARE),
        "files_overflow": bool(d["flags"] & PF_FILES_OVERFLOW),
        "name": d["name"].rstrip(b"\0").decode(errors="replace"),
        "argv_hash": d["argv_hash"],
        "uid": d["uid"],
        "started_ns": d["started_ns"],
        "state_slot": None if ss < 0 else ss,
        "state_phys": None if ss < 0 else lay.state_phys(ss),
        "files": [
            {"fh": fh, "ino": fh & FH_INO, "oflags": fl, "refs": refs}
            for fh, fl, refs in files
            if refs
        ],
    }


def read_proc_table(mem: PhysMem, lay: PartLayout) -> tuple[list[dict], list[CorruptObject]]:
    """Every used entry of a (possibly dead) kernel's process table, validated; what fails
    a check is rejected with its own CorruptObject and never returned as an entry."""
    entries: list[dict] = []
    rejected: list[CorruptObject] = []
    kind = PROC_ENTRY.kind
    for slot in range(lay.n_proc):
        phys = lay.proc + slot * PROC_ENTRY.size
        raw = mem.read(phys, PROC_ENTRY.size)
        if raw == _ZERO_ENTRY:
            continue  # never used, or unregistered
        try:
            d = PROC_ENTRY.decode(raw, 0, phys)
            if d["flags"] & ~_PF_ALL:
                raise CorruptObject(kind, phys, "flags", f"unknown flag bits {d['flags']:#06x}")
            if not d["flags"] & PF_USED:
                raise CorruptObject(kind, phys, "flags", "non-zero entry not marked used")
            if d["pid"] == 0:
                raise CorruptObject(kind, phys, "pid", "pid 0 in a used entry")
            ss = d["state_slot"]
            if ss != -1 and not 0 <= ss < lay.n_state:
                raise CorruptObject(
                    kind,
                    phys,
                    "state_slot",
                    f"state slot {ss} outside the partition's 0-{lay.n_state - 1}",
                )
            if d["flags"] & PF_RUNTIME_AWARE and ss == -1:
                raise CorruptObject(
                    kind, phys, "state_slot", "runtime-aware process without a state segment"
                )
            files = [(d[f"f{i}_fh"], d[f"f{i}_oflags"], d[f"f{i}_refs"]) for i in range(PROC_FILES)]
            bad = [
                i
                for i, (ino, fl, refs) in enumerate(files)
                if (refs == 0) != (ino == 0 and fl == 0)
            ]
            if bad:
                raise CorruptObject(kind, phys, f"f{bad[0]}", "open-file record half filled")
            if d["n_files"] != sum(1 for f in files if f[2]):
                raise CorruptObject(
                    kind,
                    phys,
                    "n_files",
                    f"says {d['n_files']} open files, records hold {sum(1 for f in files if f[2])}",
                )
        except CorruptObject as e:
            rejected.append(e)
            continue
        entries.append(_entry_dict(slot, phys, d, files, lay))
    claims: dict[int, list[dict]] = {}
    for e in entries:
        if e["state_slot"] is not None:
            claims.setdefault(e["state_slot"], []).append(e)
    for ss, es in claims.items():
        if len(es) > 1:
            for e in es:
                rejected.append(
                    CorruptObject(
                        kind,
                        e["phys"],
                        "state_slot",
                        f"state segment {ss} claimed by {len(es)} entries",
                    )
                )
                entries.remove(e)
    return entries, rejected
