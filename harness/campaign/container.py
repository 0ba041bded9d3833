"""Docker as the isolation of a worker machine: each batch's trial process in a container.

Promises to task.py and the campaign command: ``argv(params, work)`` prefixes the trial
process's command with a ``docker run`` of ``params["image"]`` — privileged (or, where this
host's own capability bounding set lacks some, every capability it has, seccomp off and
/dev/fuse: what the emulated machine needs for FUSE, network namespaces and process sets),
no network of Docker's (the machine builds its own namespaces inside), its own /dev/shm
big enough for the machine's memory file, this Python and crashbench mounted read-only at
the same paths, the batch's work directory read-write. Containers carry the label
``crashbench.campaign=<id>``; ``stop_all(id)`` stops those still running (SIGTERM: the
trial's teardown), for a worker that died and left one. The image is the worker machine's
root file system imported with ``docker import`` (docs/HARNESS.md says how): nothing is
pulled.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SHM_SIZE = "4g"  # the machine's memory file lives in the container's /dev/shm
STOP_GRACE_S = 60  # a stopped container's trial gets this long for its teardown
# capability numbers (linux/capability.h), to name what this host cannot hand on
CAPS = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE"
).split()


def missing_caps() -> list[str]:
    """Capabilities docker's --privileged would grant that this process cannot."""
    with open("/proc/self/status") as f:
        bnd = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapBnd:"))
    return [c for i, c in enumerate(CAPS) if not bnd >> i & 1]


def privilege() -> list[str]:
    missing = missing_caps()
    if not missing:
        return ["--privileged"]
    return [
        "--cap-add",
        "ALL",
        *(x for c in missing for x in ("--cap-drop", c)),
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--device",
        "/dev/fuse",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    ]


def mounts(work: Path) -> list[str]:
    import harness

    src = Path(harness.__file__).resolve().parent.parent
    paths = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), src}
    out = []
    for p in sorted(paths):
        out += ["-v", f"{p}:{p}:ro"]
    return out + ["-v", f"{work}:{work}:rw"]


def argv(params: dict, work: Path) -> list[str]:
    return [
        "docker",
        "run",
        "--rm",
        "-i",
        "--network",
        "none",
        "--shm-size",
        SHM_SIZE,
        "--label",
        f"crashbench.campaign={params['campaign_id']}",
        "-w",
        str(work),
        "-e",
        f"TMPDIR={work}",
        *privilege(),
        *mounts(work),
        params["image"],
    ]


def check(image: str) -> str | None:
    """Why ``image`` cannot be used here (no docker, no daemon, no such image), or None."""
    try:
        p = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        return "no docker command on this machine"
    except subprocess.TimeoutExpired:
        return "the docker daemon did not answer within 60 s"
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or ["docker image inspect failed"])[-1]
    return None


def stop_all(campaign_id: str) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=crashbench.campaign={campaign_id}"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    if ids:
        subprocess.run(
            ["docker", "stop", "-t", str(STOP_GRACE_S), *ids],
            capture_output=True,
            timeout=STOP_GRACE_S + 60,
        )
