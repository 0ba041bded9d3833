"""The process set of a partition, and fencing: make sure a dead kernel and its apps are gone.

Promises to the kernel daemon (kernel/core/kernel.py), to the recovery schemes (systems/), to
the launcher (kernel/core/proc.py) and to the lab commands:

* ``ProcessSet(tag, part_id)`` is every process of one partition, kept by the host kernel
  so that nothing of the partition can escape it: a cgroup ``crashbench/<tag>-p<N>``,
  cgroup2 with ``cgroup.kill`` when it is usable, else the cgroup-v1 freezer, else (no
  usable cgroup: not root, or none mounted) a registry of pids and process groups in
  /run/crashbench-procsets (or the temp directory). ``mode`` says which; ``why_not`` says
  why a better mode was not used. ``CRASHBENCH_PROCSET`` forces a mode. The mode is chosen
  once, when the set is made; every later ``ProcessSet(tag, part_id)`` (another process:
  the backup kernel, the harness, ``crashbench down``) attaches to the same set.
* The kernel daemon joins its set at boot (``add(os.getpid())``, before it starts anything)
  and every app joins before it execs (``child_join()``, called by kernel/core/proc.py in the
  forked child), so ``fence()`` kills the kernel and every app of the partition —
  children, and grandchildren that called setsid(), included (cgroup modes).
* ``fence(timeout)`` is what a recovery scheme calls before it takes a dead kernel's
  devices: when it returns, every process of the set has exited (zombies may wait for
  their reaper; they hold nothing); when it cannot make sure of that within ``timeout`` it
  raises ``FenceError`` naming what survived (pid, command, state, wait channel) — it
  never returns having failed. The ``FenceReport`` gives the measured seconds
  (time.monotonic around the real work) and how many processes were killed. A process
  never fences a set it (or an ancestor of it) is in.
    - cgroup2: the kernel kills the whole cgroup atomically (``cgroup.kill``, forks in
      flight included); fence waits until ``cgroup.events`` says unpopulated.
    - freezer (v1): freeze (bounded wait: a task in uninterruptible sleep, e.g. on a dead
      FUSE connection, may never freeze), SIGKILL every task, thaw, then kill whatever
      is still listed until the cgroup is empty.
    - pids: stop (SIGSTOP) every registered process still alive (pid + start time, so a
      reused pid is never hit), every member of the process groups they lead and all
      their descendants until no new one appears, then SIGKILL them all. Limitation: a
      grandchild orphaned (its parent exited) after setsid() is not found.
* ``freeze()``, ``thaw()`` and ``move(pid, to)`` (cgroup modes): what a scheme that keeps
  a dead kernel's processes does instead of fencing them — stop them all, then move the
  ones it keeps into its own partition's set, where they run on.
* ``remove()`` deletes the set (fencing what is still in it); idempotent.
  ``cleanup_stale(tag)`` fences and removes every set of a lab whose controller died.
* ``fence_partition(tag, part_id)`` fences the partition's set if there is one (a recovery
  scheme's fence of a dead partition's apps); None when none was made.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

CGROUP_DIR = "crashbench"
MODES = ("cgroup2", "freezer", "pids")
MODE_ENV = "CRASHBENCH_PROCSET"  # force a mode (tests, CI): cgroup2 | freezer | pids
_TAG = re.compile(r"[a-z0-9]{1,16}")
_FREEZE_WAIT_MAX_S = 0.5  # bound on waiting for a v1 freezer to report FROZEN


class ProcError(RuntimeError):
    """A process set could not be made, joined or removed; the message says why."""


class FenceError(ProcError):
    """Fencing could not make sure the set is gone; ``report`` holds what was done."""

    def __init__(self, msg: str, report: "FenceReport"):
        super().__init__(msg)
        self.report = report


# ---------------------------------------------------------------- /proc and cgroup plumbing


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _cgroup_mounts() -> dict[str, str]:
    """{"cgroup2": mountpoint, "freezer": mountpoint} for the hierarchies mounted here."""
    found: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        pre, _, post = line.partition(" - ")
        parts, rest = pre.split(), post.split()
        if len(parts) < 5 or len(rest) < 3:
            continue
        mnt, fstype, opts = _unescape(parts[4]), rest[0], rest[2].split(",")
        if fstype == "cgroup2":
            found.setdefault("cgroup2", mnt)
        elif fstype == "cgroup" and "freezer" in opts:
            found.setdefault("freezer", mnt)
    return found


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rfind(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1]), int(rest[2]), int(rest[19])


def _all_stats() -> dict[int, tuple[str, int, int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def _dead(pid: int, start: int | None = None) -> bool:
    st = _stat(pid)
    return st is None or st[0] in ("Z", "X") or (start is not None and st[3] != start)


def _describe(pid: int) -> str:
    st = _stat(pid)
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip() or "-"
    except OSError:
        comm, wchan = "?", "?"
    return f"{pid} ({comm}, state {st[0] if st else 'gone'}, wchan {wchan})"


def _ancestors_of_self() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        st = _stat(pid)
        if st is None:
            break
        pid = st[1]
    return out


def _read_ints(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _pids_dir() -> str:
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return "/run/crashbench-procsets"
    return os.path.join(tempfile.gettempdir(), f"crashbench-procsets-{os.geteuid()}")


def _locations(name: str) -> dict[str, str]:
    """Where a set called `name` lives in each mode available on this machine."""
    mounts = _cgroup_mounts()
    loc = {
        m: os.path.join(mounts[m], CGROUP_DIR, name) for m in ("cgroup2", "freezer") if m in mounts
    }
    loc["pids"] = os.path.join(_pids_dir(), name)
    return loc


def _backoff(i: int) -> float:
    return min(0.0002 * (2 ** min(i, 5)), 0.005)


# ---------------------------------------------------------------- the process set


@dataclass
class FenceReport:
    """One fence: what was killed and how long it took (time.monotonic around the work)."""

    name: str
    mode: str
    seconds: float
    killed: int  # processes of the set that were killed
    pids: list[int] = field(default_factory=list)
    frozen: bool | None = None  # freezer mode: did the freeze complete before the kill


class ProcessSet:
    """Every process of one partition; see the module docstring."""

    def __init__(self, tag: str, part_id: int, mode: str | None = None, *, create: bool = True):
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ValueError(f"tag: {tag!r} must be 1-16 characters of [a-z0-9]")
        if not isinstance(part_id, int) or part_id < 0:
            raise ValueError(f"part_id: {part_id!r} must be a non-negative integer")
        self.tag, self.part_id, self.name = tag, part_id, f"{tag}-p{part_id}"
        self.why_not: dict[str, str] = {}
        mode = mode or os.environ.get(MODE_ENV) or None
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        loc = _locations(self.name)
        if mode is not None and mode not in loc:
            raise ProcError(
                f"process set {self.name}: mode {mode} unavailable "
                f"(no {mode} cgroup hierarchy mounted)"
            )
        existing = [m for m in MODES if m in loc and os.path.exists(loc[m])]
        if mode is None and existing:
            mode = existing[0]  # attach to the set another process made
        if mode is not None:
            self.mode, self.path = mode, loc[mode]
            if not os.path.exists(self.path):
                if not create:
                    raise ProcError(
                        f"process set {self.name} ({mode}) does not exist at {self.path}"
                    )
                err = self._create(mode, self.path)
                if err:
                    raise ProcError(f"process set {self.name}: cannot use {mode}: {err}")
            return
        if not create:
            raise ProcError(f"process set {self.name} does not exist")
        for m in MODES:
            if m not in loc:
                self.why_not[m] = "not mounted"
                continue
            err = self._create(m, loc[m])
            if err is None:
                self.mode, self.path = m, loc[m]
                return
            self.why_not[m] = err
        raise ProcError(f"process set {self.name}: no mode usable: {self.why_not}")

    def __repr__(self) -> str:
        return f"ProcessSet({self.name!r}, mode={self.mode!r}, path={self.path!r})"

    # --- making it ----------------------------------------------------------------------
    @staticmethod
    def _create(mode: str, path: str) -> str | None:
        """Make the set; return None, or why this mode cannot be used here."""
        parent = os.path.dirname(path)
        made = False
        try:
            for _ in range(5):  # another lab may remove an empty parent at the same moment
                try:
                    os.makedirs(parent, mode=0o755 if mode != "pids" else 0o700, exist_ok=True)
                    if mode == "pids":
                        fd = os.open(
                            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                        )
                        os.write(fd, f"# crashbench process set, made by {os.getpid()}\n".encode())
                        os.close(fd)
                    else:
                        os.mkdir(path, 0o755)
                    made = True
                    break
                except FileExistsError:
                    return None
                except FileNotFoundError:
                    continue
            if not made:
                return f"{parent} keeps vanishing"
            if mode == "cgroup2" and not os.path.exists(os.path.join(path, "cgroup.kill")):
                raise OSError(errno.ENOTSUP, "no cgroup.kill (kernel older than 5.14)")
            if mode == "freezer":
                _write(os.path.join(path, "freezer.state"), "THAWED")
            if mode != "pids":
                ProcessSet._probe_join(os.path.join(path, "cgroup.procs"))
            return None
        except OSError as e:
            if made:
                try:
                    os.unlink(path) if mode == "pids" else os.rmdir(path)
                except OSError:
                    pass
            _rmdir_quiet(parent)
            return f"{e.filename or path}: {e.strerror or e}"

    @staticmethod
    def _probe_join(procs: str) -> None:
        """Move a throw-away child into the cgroup: mkdir can succeed where joining fails."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait to be killed
            try:
                os.close(w)
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        try:
            _write(procs, str(pid))
            if pid not in _read_ints(procs):
                raise OSError(errno.EPERM, "a process written to cgroup.procs did not join")
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(w)

    # --- membership ---------------------------------------------------------------------
    def _procs(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def add(self, pid: int) -> None:
        """Put a running process into the set (only the process: add the kernel at boot,
        before it starts anything; apps join by themselves through launch())."""
        if self.mode == "pids":
            st = _stat(pid)
            if st is None:
                raise ProcError(f"{self.name}: add: no process {pid}")
            self._register(pid, st[3], st[2])
            return
        try:
            _write(self._procs(), str(pid))
        except OSError as e:
            raise ProcError(f"{self.name}: add {pid}: {e.strerror or e}") from None

    def _register(self, pid: int, start: int, pgrp: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, f"{pid} {start} {pgrp}\n".encode())
        finally:
            os.close(fd)

    def child_join(self) -> Callable[[], None]:
        """A function that a forked child (still root, not yet exec'd) calls to join the set.
        It allocates nothing it does not have to: everything is prepared here."""
        if self.mode == "pids":
            path = self.path.encode()

            def join() -> None:
                with open("/proc/self/stat", "rb") as f:
                    raw = f.read()
                rest = raw[raw.rfind(b")") + 2 :].split()
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                try:
                    os.write(fd, b"%d %s %s\n" % (os.getpid(), rest[19], rest[2]))
                finally:
                    os.close(fd)

            return join
        procs = self._procs().encode()

        def join() -> None:
            fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

        return join

    def _registry(self) -> list[tuple[int, int, int]]:
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            if line and not line.startswith("#"):
                try:
                    pid, start, pgrp = (int(x) for x in line.split())
                except ValueError:
                    continue  # a line torn by a writer that died mid-append
                out.append((pid, start, pgrp))
        return out

    def _members(
        self, stats: dict[int, tuple[str, int, int, int]], spare_self: bool = True
    ) -> set[int]:
        """pids mode: live registered processes, their groups' members, all descendants
        (never the caller or its ancestors, unless `spare_self` is False)."""
        exclude = _ancestors_of_self() if spare_self else set()
        roots, groups = set(), set()
        for pid, start, pgrp in self._registry():
            st = stats.get(pid)
            if st is not None and st[3] == start:
                roots.add(pid)
            if pgrp != pid:
                continue  # only groups that a registered process led
            leader = stats.get(pgrp)
            if leader is None or leader[3] == start:
                groups.add(pgrp)  # a pgid cannot be reused while any process is in it
        roots |= {p for p, st in stats.items() if st[2] in groups}
        children: dict[int, list[int]] = {}
        for p, st in stats.items():
            children.setdefault(st[1], []).append(p)
        out, todo = set(), list(roots)
        while todo:
            p = todo.pop()
            if p in out or p in exclude:
                continue
            out.add(p)
            todo.extend(children.get(p, ()))
        return {p for p in out if stats[p][0] not in ("Z", "X")}

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # --- keeping: stop the set, move its processes to another partition's set -------------
    def _need_cgroup(self, what: str) -> None:
        if self.mode == "pids":
            raise ProcError(f"{self.name}: {what} needs a cgroup process set, not pids mode")

    def freeze(self) -> None:
        """Stop every process of the set where it is, as a halted CPU stops it (a process
        waiting in a FUSE request stops when the request returns). Cgroup modes only."""
        self._need_cgroup("freeze")
        if self.mode == "cgroup2":
            _write(os.path.join(self.path, "cgroup.freeze"), "1")
        else:
            _write(os.path.join(self.path, "freezer.state"), "FROZEN")

    def thaw(self) -> None:
        self._need_cgroup("thaw")
        if self.mode == "cgroup2":
            _write(os.path.join(self.path, "cgroup.freeze"), "0")
        else:
            _write(os.path.join(self.path, "freezer.state"), "THAWED")

    def move(self, pid: int, to: "ProcessSet") -> None:
        """Move ``pid`` (the whole process) from this set into ``to``; it takes the frozen
        or thawed state of ``to``. Cgroup modes, both sets of the same mode."""
        self._need_cgroup("move")
        if to.mode != self.mode:
            raise ProcError(f"move {pid}: {self.name} is {self.mode}, {to.name} is {to.mode}")
        to.add(pid)

    def pids(self) -> list[int]:
        """The live processes of the set, sorted."""
        if self.mode == "pids":
            return sorted(self._members(_all_stats()))
        return sorted(set(_read_ints(self._procs())))

    # --- fencing ------------------------------------------------------------------------
    def fence(self, timeout: float = 5.0) -> FenceReport:
        """Kill every process of the set and wait until all have exited (see module doc)."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        if not self.exists():
            return FenceReport(self.name, self.mode, time.monotonic() - t0, 0)
        members = (
            self._members(_all_stats(), spare_self=False) if self.mode == "pids" else self.pids()
        )
        if _ancestors_of_self() & set(members):
            raise ProcError(
                f"{self.name}: refusing to fence the set that the caller (pid {os.getpid()}) is in"
            )
        fn = {
            "cgroup2": self._fence_cgroup2,
            "freezer": self._fence_freezer,
            "pids": self._fence_pids,
        }[self.mode]
        return fn(t0, deadline)

    def _fail(self, t0: float, killed: set[int], left: Iterable[int], frozen=None) -> FenceError:
        rep = FenceReport(
            self.name, self.mode, time.monotonic() - t0, len(killed), sorted(killed), frozen
        )
        return FenceError(
            f"{self.name}: fence did not finish: still alive: "
            + "; ".join(_describe(p) for p in sorted(left)),
            rep,
        )

    def _fence_cgroup2(self, t0: float, deadline: float) -> FenceReport:
        kill = os.path.join(self.path, "cgroup.kill")
        killed = set(_read_ints(self._procs()))
        if killed:
            _write(kill, "1")
        events = os.path.join(self.path, "cgroup.events")
        i = 0
        while True:
            with open(events) as f:
                if "populated 0" in f.read():
                    break
            left = _read_ints(self._procs())
            if not set(left) <= killed:  # joined after the kill (a fork cannot: added from outside)
                killed.update(left)
                _write(kill, "1")
            if time.monotonic() > deadline:
                raise self._fail(t0, killed, left)
            time.sleep(_backoff(i))
            i += 1
        return FenceReport(self.name, self.mode, time.monotonic() - t0, len(killed), sorted(killed))

    def _fence_freezer(self, t0: float, deadline: float) -> FenceReport:
        state = os.path.join(self.path, "freezer.state")
        killed: set[int] = set()
        frozen = False
        _write(state, "FROZEN")
        try:
            freeze_until = min(deadline, t0 + min(_FREEZE_WAIT_MAX_S, (deadline - t0) / 4))
            i = 0
            while True:
                with open(state) as f:
                    if f.read().strip() == "FROZEN":
                        frozen = True
                        break
                if time.monotonic() > freeze_until:
                    break  # a task that cannot freeze (D state): kill anyway
                time.sleep(_backoff(i))
                i += 1
            for p in _read_ints(self._procs()):
                _kill(p)
                killed.add(p)
        finally:
            _write(state, "THAWED")
        i = 0
        while True:
            left = _read_ints(self._procs())
            if not left:
                break
            for p in left:  # tasks that forked while the freeze was incomplete
                if p not in killed:
                    _kill(p)
                    killed.add(p)
            if time.monotonic() > deadline:
                raise self._fail(t0, killed, left, frozen)
            time.sleep(_backoff(i))
            i += 1
        return FenceReport(
            self.name, self.mode, time.monotonic() - t0, len(killed), sorted(killed), frozen
        )

    def _fence_pids(self, t0: float, deadline: float) -> FenceReport:
        stopped: dict[int, int] = {}  # pid -> start time, so a reused pid is never hit
        while True:  # stop until the closure no longer grows
            stats = _all_stats()
            new = {p for p in self._members(stats) if p not in stopped}
            if not new:
                break
            for p in new:
                stopped[p] = stats[p][3]
                _kill(p, signal.SIGSTOP)
            if time.monotonic() > deadline:
                break
        for p, start in stopped.items():
            if not _dead(p, start):
                _kill(p)
        i = 0
        while True:
            left = [p for p, start in stopped.items() if not _dead(p, start)]
            if not left:
                break
            if time.monotonic() > deadline:
                raise self._fail(t0, set(stopped), left)
            time.sleep(_backoff(i))
            i += 1
        return FenceReport(
            self.name, self.mode, time.monotonic() - t0, len(stopped), sorted(stopped)
        )

    # --- removing -------------------------------------------------------------------------
    def remove(self, timeout: float = 5.0) -> None:
        """Delete the set, fencing first if anything is still in it. Idempotent."""
        if not self.exists():
            return
        if self.pids():
            self.fence(timeout)
        if self.mode == "pids":
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        else:
            end = time.monotonic() + timeout
            while True:
                try:
                    os.rmdir(self.path)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > end:
                        raise ProcError(
                            f"{self.name}: cannot remove {self.path}: {e.strerror}"
                        ) from None
                    time.sleep(0.001)  # last exits still being accounted
        _rmdir_quiet(os.path.dirname(self.path))


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _rmdir_quiet(path: str) -> None:
    try:
        os.rmdir(path)  # the shared parent goes with its last set; busy otherwise
    except OSError:
        pass


def fence_partition(tag: str | None, part_id: int, timeout: float = 5.0) -> FenceReport | None:
    """Every process of the partition's set gone (the dead kernel's apps, and children that
    left their group); None when the partition has no set (no tag, or nothing was ever
    started in it)."""
    if not tag:
        return None
    try:
        pset = ProcessSet(tag, part_id, create=False)
    except ProcError:
        return None
    return pset.fence(timeout)


def cleanup_stale(tag: str, timeout: float = 5.0) -> list[FenceReport]:
    """Fence and remove every set of the lab `tag` (any partition, any mode): what a lab
    whose controller died left behind. Returns one report per set found."""
    if not _TAG.fullmatch(tag):
        raise ValueError(f"tag: {tag!r} must be 1-16 characters of [a-z0-9]")
    pat = re.compile(rf"{tag}-p(\d+)")
    reports = []
    for mode, path in _locations(f"{tag}-p0").items():
        parent = os.path.dirname(path)
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for n in sorted(names):
            m = pat.fullmatch(n)
            if not m:
                continue
            ps = ProcessSet(tag, int(m.group(1)), mode, create=False)
            reports.append(ps.fence(timeout))
            ps.remove(timeout)
    return reports
