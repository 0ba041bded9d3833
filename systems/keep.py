"""Keeping the dead kernel's processes: the backup continues them, same pid, unmodified.

Promises to a kernel that takes over a dead kernel's processes (the orthros backup,
systems/orthros/backup.py, when orthros keeps processes, its default;
the layer is shared so that other schemes resurrect processes with the same code):

* ``Connection.take(pid, fd, workdir)``, in standby: a copy of the FUSE connection the
  host holds (kernel/hw/fusedev.py ``duplicate``) and the parameters the active kernel
  agreed at INIT (kernel/core/kernel.py ``connection_file``). The connection outlives the
  kernel that served it, so the programs' requests wait for the backup instead of failing.
* ``freeze(tag, part)``: at takeover, every process of the dead partition stops where it
  is (kernel/hw/procset.py ``freeze``), as on halted CPUs, while the backup migrates the
  cache; nothing is killed. ``discard(tag, part)`` kills them all instead, when the
  backup decides not to keep them (its set thawed for the partition's next kernel).
* ``keep_processes(k, dead_part, tag, specs)``, once the backup serves the connection:
  the dead kernel's process table is read from raw memory and validated (kernel/core/proc.py
  ``read_proc_table``, open-file records included). A process whose entry is valid and
  which still runs is adopted into the backup's table with its open files, moved with its
  descendants into the backup's process set and CPUs, and continued with them (same pid:
  a panic stopped every process of the partition, a server's children too). Everything
  else left in the dead partition is killed: a process whose entry was rejected (its pid
  cannot be trusted) is started again from its application's spec, and each fate is
  returned with its reason (systems/base.py ``ProcessFate``); ``into_report`` puts them
  and their counts into the takeover's RecoveryReport.

Promises to a kernel that takes over in the dead kernel's own partition (the Otherworld
crash kernel, systems/otherworld/crashkernel.py, and through its ``take_over`` the
successor of a txipc_sim kernel, systems/txipc_sim/server.py), whose process set it shares:

* ``halt(tag, part)``, by the watchdog once the dead kernel is killed: every process of the
  partition stopped (SIGSTOP, with the set frozen meanwhile so no fork slips past), and the
  set left thawed, because the crash kernel joins that same set and must run.
* ``resurrect(k, entries, bad, specs, netns)``, with the table the crash kernel read before
  it took the partition's table (``read_proc_table``): as ``keep_processes``, but nothing
  moves — the kept processes stay in their set and on their CPUs; what is not kept is
  killed process by process (never the set: the crash kernel is in it); a kept
  runtime-aware process keeps its state segment and, when it registered a crash procedure
  (kernel/core/rtaware.py ``on_crash``), has it called before it continues.
  ``resurrect_into_report`` puts the fates into a RecoveryReport as ``into_report`` does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass

from kernel.core.kernel import connection_file
from kernel.core.proc import AppSpec, ProcessSet, argv_hash, read_proc_table
from kernel.hw import fusedev
from kernel.hw.physmem import partition_layout
from systems.base import ProcessFate

log = logging.getLogger("backup")


@dataclass
class Connection:
    """The FUSE connection a backup resumes: its descriptor and INIT parameters."""

    fd: int
    params: dict

    @classmethod
    def take(cls, hold_pid: int, hold_fd: int, workdir: str) -> "Connection":
        with open(connection_file(workdir)) as f:
            params = json.load(f)
        fd = fusedev.duplicate(hold_pid, hold_fd)
        if not fusedev.is_fuse_device(fd):
            os.close(fd)
            raise RuntimeError(f"descriptor {hold_fd} of process {hold_pid} is not /dev/fuse")
        return cls(fd, params)


def freeze(tag: str, part: int) -> ProcessSet:
    """Stop every process of the dead partition (kept or not, decided later)."""
    ps = ProcessSet(tag, part, create=False)
    ps.freeze()
    return ps


def not_kept_note(refused: str, verb: str = "kept") -> str:
    """Why no process went on (``verb``: what the scheme does to those it keeps): the running
    transaction was refused, so what the processes were told since the last commit is undone
    (systems/orthros/backup.py ``not_kept``)."""
    return (
        f"processes not {verb}: the running transaction was refused ({refused}), so what they "
        "were told since the last commit was undone; started again on a new mount"
    )


def discard(tag: str, part: int) -> None:
    """Keep nothing after all: every process of the frozen partition killed, and its set
    thawed for the partition's next kernel (the re-paired backup joins it)."""
    ps = ProcessSet(tag, part, create=False)
    ps.fence()
    ps.thaw()


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _family(roots: set[int], members: list[int]) -> list[int]:
    """``roots`` and every member of the dead partition descending from one of them."""
    out = []
    for pid in members:
        p, seen = pid, 0
        while p and p not in roots and seen < 64:  # a process tree is never this deep here
            p, seen = _ppid(p), seen + 1
        if p in roots:
            out.append(pid)
    return out


def _move(pid: int, frm: ProcessSet, to: ProcessSet, cpus) -> None:
    """Into the backup's process set and onto its CPUs, every thread of it."""
    frm.move(pid, to)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread exited meanwhile


def keep_processes(
    k, dead_part: int, tag: str, specs: list[dict], netns=None
) -> tuple[int, list[ProcessFate]]:
    """Adopt and continue what can be kept, restart the rest (see the module's promises);
    returns how many processes the dead kernel's table held, and the fate of each."""
    from kernel.hw.net import enter_netns

    p = k.machine.partition(dead_part)
    entries, bad = read_proc_table(k.mem, partition_layout(p.id, p.base, p.size))
    dead = ProcessSet(tag, dead_part, create=False)
    members = dead.pids()
    fates: list[ProcessFate] = []
    kept: set[int] = set()
    for e in entries:
        why = _why_not_kept(e, members)
        if why:
            fates.append(ProcessFate(e["name"], e["pid"], "restarted", why))
            continue
        k.procs.adopt(e)
        kept.add(e["pid"])
        fates.append(ProcessFate(e["name"], e["pid"], "preserved", "entry valid, process running"))
    family = _family(kept, members)
    for pid in family:
        _move(pid, dead, k.pset, k.part.cpus)
    dead.fence()  # what is not kept dies: its kernel state is not trusted
    dead.thaw()  # the partition's next kernel (the re-paired backup) joins this set
    for pid in family:  # a server's workers were stopped with it, not only its root
        _continue(pid)
    fates += _restart(k, specs, entries, bad, fates, enter_netns(netns))
    return len(entries) + len(bad), fates


def _why_not_kept(e: dict, members: list[int]) -> str | None:
    if e["pid"] not in members:
        return "not running at the crash"
    if e["files_overflow"]:
        return "its open-file list was incomplete"
    return None


def _continue(pid: int) -> None:
    # a panicking kernel stops its apps (kernel/core/kernel.py stop_apps) as halted CPUs would
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _restart(k, specs, entries, bad, fates, netns_enter) -> list[ProcessFate]:
    """Launch again every application the kept processes do not account for: those whose
    entry was rejected (reason: the rejection) or whose process was not kept."""
    have = Counter(e["argv_hash"] for e, f in _kept(entries, fates))
    pending = [f for f in fates if f.fate == "restarted"]
    rejected = [f"its process-table entry was rejected: {err}" for err in bad]
    out: list[ProcessFate] = []
    for s in specs:
        h = argv_hash(s["argv"])
        if have[h]:
            have[h] -= 1
            continue
        app = k.procs.launch(AppSpec(**s), k.pset, cpus=k.part.cpus, netns_enter=netns_enter)
        k.apps.append(app)
        same = next((f for f in pending if f.name == s["name"]), None)
        if same is not None:
            pending.remove(same)
            same.new_pid = app.pid
            continue
        why = rejected.pop(0) if rejected else "no process of it in the dead kernel's table"
        out.append(ProcessFate(s["name"], None, "restarted", why, new_pid=app.pid))
    for f in pending:  # a process of no application of the deployment: nothing to restart
        f.fate = "lost"
    out += [ProcessFate("?", None, "lost", why) for why in rejected]
    return out


def _kept(entries, fates):
    by_pid = {f.pid: f for f in fates}
    return [(e, by_pid[e["pid"]]) for e in entries if by_pid[e["pid"]].fate == "preserved"]


def into_report(report, k, dead_part: int, tag: str, specs: list[dict], netns) -> None:
    """Keep the dead kernel's processes (``keep_processes``; an app restarted joins them
    in ``netns``, beside the NIC) and say in ``report`` what became of each."""
    _report_fates(report, *keep_processes(k, dead_part, tag, specs, netns))


def _report_fates(report, before: int, fates: list[ProcessFate]) -> None:
    report.processes = fates
    n = report.process_counts()
    report.processes_before = before
    report.processes_recovered = n["preserved"] + n["restarted"]
    report.notes.append(
        f"{n['preserved']} processes kept running, {n['restarted']} restarted, {n['lost']} lost"
    )


# ---------------------------------------------------------------- in place (Otherworld)

KILL_WAIT_S = 2.0  # for the processes not kept to exit after SIGKILL


def halt(tag: str, part: int) -> list[int]:
    """Stop every process of the partition where it is, as halted CPUs stop them, and
    leave its set thawed (see the module's promises); the processes stopped. A process
    waiting in a request of the held connection stops once the request is answered."""
    ps = ProcessSet(tag, part, create=False)
    ps.freeze()  # no fork goes past this point
    try:
        members = ps.pids()
        for pid in members:
            _signal(pid, signal.SIGSTOP)
    finally:
        ps.thaw()  # each member now takes its pending SIGSTOP before it runs again
    return members


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def resurrect(
    k, entries: list[dict], bad: list, specs: list[dict], netns=None
) -> tuple[int, list[ProcessFate]]:
    """Continue in place what can be kept, restart the rest (see the module's promises);
    returns how many processes the dead kernel's table held, and the fate of each."""
    from kernel.core import rtaware
    from kernel.hw.net import enter_netns

    me = os.getpid()
    members = [p for p in k.pset.pids() if p != me]
    fates: list[ProcessFate] = []
    kept: dict[int, dict] = {}
    for e in entries:
        why = _why_not_kept(e, members)
        if why:
            fates.append(ProcessFate(e["name"], e["pid"], "restarted", why))
            continue
        k.procs.adopt(e, keep_state=True)
        kept[e["pid"]] = e
        fates.append(ProcessFate(e["name"], e["pid"], "preserved", "entry valid, process running"))
    family = _family(set(kept), members)
    _kill_all([p for p in members if p not in family])  # its kernel state is not trusted
    for f in fates:
        e = kept.get(f.pid) if f.fate == "preserved" else None
        if e is not None and e["runtime_aware"] and rtaware.catches_crash_signal(f.pid):
            _signal(f.pid, rtaware.CRASH_SIGNAL)  # pending: the first thing it handles
            f.reason += "; its crash procedure called"
    for pid in family:
        _signal(pid, signal.SIGCONT)
    fates += _restart(k, specs, entries, bad, fates, enter_netns(netns))
    return len(entries) + len(bad), fates


def _kill_all(pids: list[int]) -> None:
    """SIGKILL each (stopped) process and wait, bounded, until none runs on."""
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while not all(_gone(p) for p in pids):
        if time.monotonic() > deadline:
            log.warning("processes still exiting after SIGKILL: %s", pids)
            return
        time.sleep(0.002)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1][:1] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def resurrect_into_report(
    report, k, entries: list[dict], bad: list, specs: list[dict], netns
) -> None:
    """``resurrect``, and in ``report`` what became of each process (as ``into_report``)."""
    _report_fates(report, *resurrect(k, entries, bad, specs, netns))
    called = sum(1 for f in report.processes if f.reason.endswith("crash procedure called"))
    if called:
        report.notes.append(f"{called} crash procedures called before their processes went on")
