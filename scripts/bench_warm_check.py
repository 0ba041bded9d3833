"""Times the warm-cache VMM's cache check (kernel/hw/vmm.py ``preserve``) on a synthetic dead guest.

Promises to whoever measures the check (docs/PERFORMANCE.md): a guest shaped like the default
machine's partition 0 (896 MiB) whose VMM tracked ``--frames`` frames, allocated lowest first
with 3 % of the frames held by others, 2 % of them stored into (DIRTIED), 0.1 % with corrupted
content and 0.1 % with a torn entry; each round refills the table and times what
``WarmCache._before_boot`` times — ``preserve`` and ``file_pages`` over the dead guest's
memory — as wall time and as CPU time of the checking thread. "after" is this tree's check,
its memory mapped ahead during an idle stand-in for the fence (``--fence`` seconds) as
``WarmCache._fence`` does; "after, no map-ahead" opens the memory fresh instead. With
``--before DIR`` (a checkout of an older commit) that tree's ``preserve`` runs too, in the same
process, alternated round by round; every variant must give the same counts and frames, or
the script fails. Its files live in /dev/shm and are removed on exit.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel.hw import vmm  # noqa: E402
from kernel.hw.physmem import PAGE_DESC, PG_VALID, PhysMem, partition_layout  # noqa: E402

MEM = 896 << 20
NBLOCKS = (2 << 30) // vmm.PAGE


class Guest:
    """A dead guest's memory and the VMM region that tracked it."""

    def __init__(self, where: str, frames: int):
        self.mem = PhysMem(f"{where}/physmem", MEM, create=True)
        self.lay = lay = partition_layout(0, 0, MEM)
        rng = np.random.default_rng(1)
        self.frames = np.flatnonzero(rng.random(lay.nframes) < 0.97)[100 : 100 + frames]
        if len(self.frames) < frames:
            raise SystemExit(f"--frames: at most {len(self.frames)} fit this guest")
        pages = self.mem.array(np.uint8, lay.frames, lay.nframes * vmm.PAGE).reshape(-1, vmm.PAGE)
        raw = np.frombuffer(self.mem.mm, np.uint8, lay.nframes * vmm.PAGE, lay.frames)
        raw.reshape(-1, vmm.PAGE)[self.frames] = rng.integers(0, 256, (frames, vmm.PAGE), np.uint8)
        desc = np.frombuffer(self.mem.mm, PAGE_DESC.dtype, lay.nframes, lay.desc)
        desc["magic"][self.frames], desc["flags"][self.frames] = PAGE_DESC.magic, PG_VALID
        desc["ino"][self.frames] = 5
        self.region = vmm.Region.create(f"{where}/vmm", lay, NBLOCKS, 16384)
        e = np.zeros(frames, vmm.ENTRY)
        e["block"] = rng.choice(NBLOCKS, frames, replace=False)
        e["gen"] = rng.integers(0, 5, frames)
        self.region.gens[e["block"]] = e["gen"]
        e["csum"] = [xxhash.xxh3_64_intdigest(pages[f]) for f in self.frames.tolist()]
        e["state"] = vmm.CLEAN
        e["state"][::50] = vmm.DIRTIED
        e["csum"][7::997] ^= np.uint64(1)  # content no longer matches
        e["seal"] = vmm.seal_np(e)
        e["gen"][3::1009] += 1  # torn: the seal fails
        self.entries = e
        del pages, raw, desc

    def refill(self) -> None:
        self.region.ft[:] = 0
        self.region.ft[self.frames] = self.entries

    def close(self) -> None:
        self.region.close()
        self.mem.close()


def check(guest: Guest, mod, ahead: bool, fence: float) -> tuple[float, float, tuple]:
    """One check as WarmCache._before_boot times it: (wall s, thread CPU s, what it found)."""
    mem = PhysMem(guest.mem.path, readonly=True)
    thread = mod.map_ahead(guest.region, mem, guest.lay) if ahead else None
    if thread is not None:
        time.sleep(fence)
    t, c = time.perf_counter(), time.thread_time()
    if thread is not None:
        thread.join()
    got = mod.preserve(guest.region, mem, guest.lay)
    files = mod.file_pages(mem, guest.lay)
    kept = int(np.count_nonzero(files[got["kept_frames"]]))
    wall, cpu = time.perf_counter() - t, time.thread_time() - c
    mem.close()
    counts = tuple(got[k] for k in ("preserved", "inconsistent", "corrupted", "duplicates", "kept"))
    return wall, cpu, (counts, kept, got["kept_frames"].tolist(), got["corrupted_frames"].tolist())


def older_vmm(tree: str):
    """kernel/hw/vmm.py of another checkout, loaded beside this tree's (its imports: ours)."""
    path = Path(tree) / "kernel" / "hw" / "vmm.py"
    if not path.is_file():
        raise SystemExit(f"--before: {path} does not exist")
    spec = importlib.util.spec_from_file_location("before_vmm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000, help="frames the VMM tracked")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per variant")
    ap.add_argument("--fence", type=float, default=0.3, help="idle stand-in for the fence, s")
    ap.add_argument("--before", help="a checkout of an older commit, timed alternately")
    a = ap.parse_args()
    if a.frames < 1 or a.rounds < 1 or a.fence < 0:
        raise SystemExit("--frames and --rounds must be positive, --fence not negative")
    variants = {
        "after": lambda g: check(g, vmm, True, a.fence),
        "after, no map-ahead": lambda g: check(g, vmm, False, 0),
    }
    if a.before:
        old = older_vmm(a.before)
        variants = {"before": lambda g: check(g, old, False, 0), **variants}
    where = tempfile.mkdtemp(prefix="bench-warm-check-", dir="/dev/shm")
    try:
        guest = Guest(where, a.frames)
        try:
            times = run(guest, variants, a.rounds)
        finally:
            guest.close()
    finally:
        shutil.rmtree(where)
    report(times, a)
    return 0


def run(guest: Guest, variants: dict, rounds: int) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in variants}
    found = None
    for r in range(rounds):
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:  # alternate the order
            guest.refill()
            wall, cpu, got = variants[name](guest)
            if found is not None and got != found:
                raise SystemExit(f"{name}: found other pages than the first variant did")
            found = got
            times[name].append((wall, cpu))
    c = found[0]
    print(
        f"{c[0]} preserved, {c[1]} inconsistent, {c[2]} corrupted, {c[4]} kept ({found[1]} file pages)"
    )
    return times


def report(times: dict, a) -> None:
    print(f"{a.frames} tracked frames, {a.rounds} rounds a variant, load {os.getloadavg()[0]:.1f}")
    med = {}
    for name, t in times.items():
        wall, cpu = [x[0] * 1e3 for x in t], [x[1] * 1e3 for x in t]
        med[name] = (statistics.median(wall), statistics.median(cpu))
        print(
            f"{name:20s} wall median {med[name][0]:6.1f} ms (min {min(wall):6.1f}); "
            f"CPU median {med[name][1]:6.1f} ms (min {min(cpu):6.1f})"
        )
    if "before" in med:
        for name in ("after", "after, no map-ahead"):
            w, c = (med["before"][i] / med[name][i] for i in (0, 1))
            print(f"before / {name}: wall {w:.2f}x, CPU {c:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
