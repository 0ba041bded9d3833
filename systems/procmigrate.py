"""Bringing a dead kernel's processes back: restart, or migration with their state.

Promises to the recovery schemes: ``restart_processes`` reads the dead kernel's process
table out of raw memory (kernel/core/proc.py ``read_proc_table``: every entry validated, what
fails is rejected), finds each process's application among the deployment's specs by its
argv hash, and launches it again on the recovering kernel. A runtime-aware process gets
its state segment back (kernel/core/rtaware.py ``read_state``: a torn or corrupted segment is
rejected, and the process restarts without it); an unmodified one simply restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel import param
from kernel.core.proc import AppSpec, argv_hash, read_proc_table
from kernel.core.rtaware import read_state
from kernel.hw.physmem import CorruptObject, partition_layout


@dataclass
class Restarted:
    before: int = 0  # processes in the dead kernel's table
    migrated: int = 0  # runtime-aware, restarted with their state
    restarted: int = 0  # restarted from scratch (unmodified, or state rejected)
    rejected: list[str] = field(default_factory=list)


def restart_processes(
    k, dead_part: int, specs: list[dict], *, with_state: bool, netns: str | None = None
) -> Restarted:
    from kernel.hw.net import enter_netns

    p = k.machine.partition(dead_part)
    lay = partition_layout(p.id, p.base, p.size)
    entries, bad = read_proc_table(k.mem, lay)
    out = Restarted(before=len(entries) + len(bad), rejected=[str(e) for e in bad])
    by_hash = {argv_hash(s["argv"]): s for s in specs}
    states = {}
    for e in entries:  # read every state before the first launch can reuse a segment
        if with_state and e["runtime_aware"] and e["state_phys"] is not None:
            try:
                states[e["slot"]] = read_state(k.mem, e["state_phys"], param.PROC_STATE_BYTES)
            except CorruptObject as err:
                out.rejected.append(str(err))
    for e in entries:
        spec = by_hash.get(e["argv_hash"])
        if spec is None:
            out.rejected.append(
                f"process {e['pid']} ({e['name']}): no such application in the deployment"
            )
            continue
        state = states.get(e["slot"])
        k.apps.append(
            k.procs.launch(
                AppSpec(**spec),
                k.pset,
                cpus=k.part.cpus,
                netns_enter=enter_netns(netns),
                state=state,
            )
        )
        if state is not None:
            out.migrated += 1
        else:
            out.restarted += 1
    return out
