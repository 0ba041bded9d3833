"""Who owns each emulated machine, so that what a killed run or lab left can be found.

Promises to the driver (harness/driver.py), the lab (harness/lab.py) and `crashbench
run/up/down`: every machine a trial or a lab makes has a record in ``OWNERS_DIR``, one JSON
file per machine named by its tag, written atomically before the machine has anything.
The record names its owner (pid and start time, so a reused pid is not mistaken for it),
its kind (``run``, ``lab``, ``bench`` or ``test``: every harness/testbed.py machine), its
work directory, tag and memory file; everything the machine holds is found from those: its
kernel-side processes name the work directory on their command line, its FUSE mounts are the work directory's ``mnt-p*``, its process sets
and network namespaces carry the tag. The owner removes the record when it has torn the
machine down; a machine whose owner is gone is an orphan. ``orphans()`` lists them;
``clean(record)`` removes everything of one and returns what it removed; a machine whose
owner is alive is never touched. A damaged record is reported, never trusted: ``clean``
removes the file only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("run", "lab", "bench", "test")
KILL_WAIT_S = 10.0  # how long clean() waits for an orphan's processes to exit


def owners_dir() -> Path:
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        return Path("/run/crashbench/machines")
    return Path(tempfile.gettempdir()) / f"crashbench-machines-{os.geteuid()}"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


@dataclass
class Record:
    path: Path
    data: dict | None  # None: the file is damaged
    problem: str = ""

    @property
    def tag(self) -> str:
        return self.path.stem

    def owner_alive(self) -> bool:
        return alive(self.data["owner"])

    def describe(self) -> str:
        if self.data is None:
            return f"damaged record {self.path} ({self.problem})"
        d = self.data
        return (
            f"{d['kind']} machine {d['tag']} in {d['workdir']} (owner pid {d['owner']['pid']} gone)"
        )


# --- the owner's side ---------------------------------------------------------------------------


def claim(kind: str, workdir: Path, tag: str, physmem: str, *, workdir_made: bool) -> Path:
    """Record that this process owns the machine ``tag``; before it creates anything.
    ``workdir_made``: the project made the work directory, so cleaning removes it."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    rec = {
        "kind": kind,
        "tag": tag,
        "workdir": str(Path(workdir).resolve()),
        "workdir_made": workdir_made,
        "physmem": physmem,
        "created": time.time(),
        "owner": owner(os.getpid()),
    }
    return _write(tag, rec)


def hand_over(tag: str, pid: int) -> None:
    """The machine's owner is now ``pid`` (a lab's supervisor, once it serves); when that
    process is already gone the record keeps its owner, which is about to exit."""
    if _start_time(pid) is None:
        return
    p = owners_dir() / f"{tag}.json"
    rec = json.loads(p.read_text())
    rec["owner"] = owner(pid)
    _write(tag, rec)


def release(tag: str) -> None:
    """The machine is torn down: forget it."""
    (owners_dir() / f"{tag}.json").unlink(missing_ok=True)


def alive(owner: dict) -> bool:
    """Whether the process an owner names (pid and start time) still runs."""
    return _start_time(owner["pid"]) == owner["start"]


def owner(pid: int) -> dict:
    """A process as an owner: its pid and start time (a reused pid is not mistaken for it)."""
    start = _start_time(pid)
    if start is None:
        raise ValueError(f"owner pid {pid}: no such process")
    return {"pid": pid, "start": start}


def _write(tag: str, rec: dict) -> Path:
    d = owners_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{tag}.json"
    tmp = d / f".{tag}.json.{os.getpid()}"
    tmp.write_text(json.dumps(rec, indent=2))
    os.replace(tmp, path)
    return path


# --- finding and removing orphans --------------------------------------------------------------


def records() -> list[Record]:
    try:
        paths = sorted(owners_dir().glob("*.json"))
    except OSError:
        return []
    return [_read(p) for p in paths]


def _read(p: Path) -> Record:
    try:
        data = json.loads(p.read_text())
        if not (
            isinstance(data, dict)
            and data.get("kind") in KINDS
            and data.get("tag") == p.stem
            and isinstance(data.get("workdir"), str)
            and os.path.isabs(data["workdir"])
            and isinstance(data.get("physmem"), str)
            and isinstance(data.get("owner", {}).get("pid"), int)
            and isinstance(data["owner"].get("start"), int)
        ):
            return Record(p, None, "fields missing or of the wrong type")
        return Record(p, data)
    except (OSError, ValueError) as e:
        return Record(p, None, str(e))


def orphans() -> list[Record]:
    """Machines whose owner is gone (pid dead, or reused by another process), and damaged
    records."""
    return [r for r in records() if r.data is None or not r.owner_alive()]


def warning(command: str) -> str | None:
    """The one line `run` and `up` print when orphans exist; None when there are none."""
    found = orphans()
    if not found:
        return None
    return (
        f"crashbench {command}: {len(found)} machine(s) left by killed runs or labs: "
        + "; ".join(r.describe() for r in found)
        + " — `crashbench down --all` removes them"
    )


def clean(r: Record) -> list[str]:
    """Remove every process, mount, process set, namespace, memory file (and work
    directory, when the project made it) of an orphan; then its record."""
    if r.data is not None and r.owner_alive():
        raise ValueError(f"{r.describe()}: its owner is alive; not touched")
    if r.data is None:
        r.path.unlink(missing_ok=True)
        return [f"removed {r.describe()}"]
    d = r.data
    wd = Path(d["workdir"])
    done = [f"killed {x}" for x in _kill_processes_of(wd)]
    done += _unmount_under(wd)
    from kernel.hw.procset import cleanup_stale as procsets_cleanup

    done += [f"removed process set {x.name} ({x.mode})" for x in procsets_cleanup(d["tag"])]
    from kernel.hw.net import cleanup_stale as net_cleanup

    done += [f"removed {x}" for x in net_cleanup(d["tag"])]
    from kernel.hw.vmm import region_path

    for f in (d["physmem"], region_path(d["physmem"])):
        if os.path.exists(f):
            os.unlink(f)
            done.append(f"removed {f}")
    if d["workdir_made"] and wd.is_dir() and wd != Path("/"):
        shutil.rmtree(wd, ignore_errors=True)
        done.append(f"removed {wd}")
    elif d["kind"] == "lab":
        from harness.lab import forget

        forget(wd)
    release(d["tag"])
    return done


def _names(argv: list[bytes], wd: bytes) -> bool:
    return any(a == wd or a.startswith(wd + b"/") or a.endswith(b"=" + wd) for a in argv)


def _kill_processes_of(wd: Path) -> list[str]:
    """SIGKILL every process whose command line names the work directory (kernels, backups,
    a lab's supervisor), with the process group it leads; wait until they are gone."""
    key = str(wd).encode()
    mine = {os.getpid(), os.getppid()}
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if _names(argv, key):
            found[int(entry)] = b" ".join(argv[:3]).decode(errors="replace")
    for pid in found:
        try:
            os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(
                pid, signal.SIGKILL
            )
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_WAIT_S
    while any(_start_time(p) is not None for p in found) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [f"process {pid} ({cmd})" for pid, cmd in sorted(found.items())]


def _unmount_under(wd: Path) -> list[str]:
    from kernel.hw import fusedev

    out = []
    for m in sorted(wd.glob("mnt-p*")):
        if fusedev.abort_and_unmount(str(m)):
            out.append(f"unmounted {m}")
    return out
