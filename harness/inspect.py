"""What `crashbench inspect` shows: a partition's kernel objects decoded from raw memory.

Works on a live or a dead kernel alike: it only reads the physical-memory file. Every
object that fails validation is listed as rejected, with why; nothing is trusted.
"""

from __future__ import annotations

import numpy as np

from kernel.core.memreader import PartitionReader
from kernel.hw.machine import Machine
from kernel.hw.physmem import PAGE_DESC, PG_DIRTY, PG_META, CorruptObject, PhysMem


def _rejected(e: CorruptObject) -> dict:
    return {"object": e.kind, "phys": hex(e.phys), "field": e.field, "why": e.why}


def inspect_partition(physmem_path: str, machine: Machine, part_id: int) -> dict:
    part = machine.partition(part_id)
    mem = PhysMem(physmem_path, readonly=True)
    try:
        r = PartitionReader(mem, part.base, part.size, part_id)
        out: dict = {"partition": part_id, "cmdline": part.cmdline(), "rejected": []}
        try:
            h = r.header()
            out["header"] = {"nframes": h["nframes"], "n_icore": h["n_icore"]}
        except CorruptObject as e:
            out["header"] = None
            out["rejected"].append(_rejected(e))
            return out
        walk = r.walk_dirty()
        out["ksuper"] = (
            None
            if walk.ksuper is None
            else {
                k: walk.ksuper[k]
                for k in ("running_tid", "handles_open", "n_dirty_inodes", "nblocks")
            }
        )
        out["dirty_inodes"] = []
        for di in walk.inodes:
            good = bad = 0
            for d in di.pages:
                try:
                    r.page(d)
                    good += 1
                except CorruptObject as e:
                    bad += 1
                    out["rejected"].append(_rejected(e))
            out["dirty_inodes"].append(
                {
                    "ino": di.icore["ino"],
                    "size": di.icore["size"],
                    "dirty_pages": good,
                    "pages_rejected": bad,
                }
            )
            out["rejected"] += [_rejected(e) for e in di.rejected]
        out["rejected"] += [_rejected(e) for e in walk.rejected]
        out["page_cache"] = _cache_summary(r)
        out["mailbox"] = _mailbox(mem, r.lay, out["rejected"])
        out["processes"] = _processes(mem, r.lay, out["rejected"])
        return out
    finally:
        mem.close()


def _mailbox(mem: PhysMem, lay, rejected: list) -> dict | None:
    from kernel.hw.mailbox import read_mail

    try:
        m = read_mail(mem, lay)
    except CorruptObject as e:
        rejected.append(_rejected(e))
        return None
    return {
        "state": m.state_name,
        "pid": m.pid,
        "beats": m.beat,
        "heartbeat_age_s": round(m.age_s(), 4),
        "boot_s": m.boot_ns / 1e9,
        "dying_message": m.reason or None,
        "site": m.site or None,
        "fault": m.fault or None,
        "fault_target": m.fault_target or None,
        "devices": m.devices.split(",") if m.devices else [],
    }


def _processes(mem: PhysMem, lay, rejected: list) -> list[dict]:
    from kernel.core.proc import read_proc_table

    entries, bad = read_proc_table(mem, lay)
    rejected += [_rejected(e) for e in bad]
    return [
        {
            "pid": e["pid"],
            "name": e["name"],
            "runtime_aware": e["runtime_aware"],
            "state_slot": e["state_slot"],
            "open_files": len(e["files"]),
        }
        for e in entries
    ]


def _cache_summary(r: PartitionReader) -> dict:
    idx = r.scan_descriptors()
    arr = r.mem.array(PAGE_DESC.dtype, r.lay.desc, r.lay.nframes)
    flags = arr["flags"][idx]
    return {
        "frames": int(r.lay.nframes),
        "pages": int(idx.size),
        "dirty": int(np.count_nonzero(flags & PG_DIRTY)),
        "metadata": int(np.count_nonzero(flags & PG_META)),
    }
