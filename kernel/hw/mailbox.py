"""The heartbeat mailbox and the doorbell: how one partition learns another one died.

Promises to a backup kernel watching an active one (and to `crashbench status/inspect`):

* each kernel keeps a mailbox object (physmem.MAILBOX) at its partition's mailbox page:
  state, pid, role, boot time, and a heartbeat (beat counter + CLOCK_MONOTONIC time of the
  last beat, which every process of the machine reads on the same clock);
* a kernel that panics writes a **dying message** (reason, site, time) into its mailbox
  before it dies, then rings the doorbell of every partition whose mailbox says it listens;
* a doorbell is a Unix datagram socket per partition (the stand-in for an IPI): ringing it
  wakes the listener at once instead of at its next poll. Only root and the machine's owner
  can ring one: the socket file is owner-only (param.OWNER_ONLY_MODE, set before ``bind``),
  so another user's ``sendto`` fails with EACCES. The mode, not a per-datagram credential
  check (SO_PASSCRED), is the guard on purpose: a check at the listener would still let
  another user fill the socket's queue, so a dying kernel's ring could be lost, and it
  would add a credential message to every wake-up on the failover path; the mode costs
  nothing once the socket exists.

A kernel that hangs or is killed writes nothing: a watcher notices the beat stop.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kernel import param
from kernel.hw import schedstat
from kernel.hw.physmem import CorruptObject, Layout, PartLayout, PhysMem

MAILBOX = Layout(
    "heartbeat mailbox",
    "MBOX",
    1,
    [
        ("state", "I"),
        ("pid", "I"),
        ("role", "I"),
        ("listening", "I"),
        ("beat", "Q"),
        ("beat_ns", "Q"),
        ("interval_ns", "Q"),
        ("boot_start_ns", "Q"),
        ("boot_ns", "Q"),
        ("panic_ns", "Q"),
        ("reason", "96s"),
        ("site", "32s"),
        ("fault", "24s"),
        ("fault_target", "24s"),
        ("fault_site", "32s"),
        ("injected_ns", "Q"),
        ("activated_ns", "Q"),
        ("mount_start_ns", "Q"),
        ("mount_ns", "Q"),
        ("devices", "48s"),
        ("zone", "I"),
        ("watching", "I"),
    ],
    512,
)

EMPTY, BOOTING, RUNNING, PANICKED, SHUTDOWN, STANDBY = range(6)
STATE_NAMES = ["empty", "booting", "running", "panicked", "shut down", "standby"]
ROLE_ACTIVE, ROLE_BACKUP = 0, 1
_F = MAILBOX.index


@dataclass
class Mail:
    state: int
    pid: int
    role: int
    listening: bool
    beat: int
    beat_ns: int
    interval_ns: int
    boot_start_ns: int
    boot_ns: int
    panic_ns: int
    reason: str
    site: str
    fault: str = ""
    fault_target: str = ""
    fault_site: str = ""
    injected_ns: int = 0
    activated_ns: int = 0
    mount_start_ns: int = 0
    mount_ns: int = 0
    devices: str = ""
    zone: int = 0  # the partition whose memory holds this kernel's page cache

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state] if self.state < len(STATE_NAMES) else f"?{self.state}"

    def age_s(self, now_ns: int | None = None) -> float:
        return ((now_ns or time.monotonic_ns()) - self.beat_ns) / 1e9


class Mailbox:
    """The writer side, owned by the kernel of the partition."""

    def __init__(self, mem: PhysMem, lay: PartLayout, role: int, interval_s: float):
        self.mem, self.phys = mem, lay.mailbox
        self.v = [0] * len(MAILBOX.names)
        self.v[0], self.v[1] = MAILBOX.magic, MAILBOX.version
        for k in ("reason", "site", "fault", "fault_target", "fault_site", "devices"):
            self.v[_F[k]] = b""
        self.set(
            state=BOOTING,
            pid=os.getpid(),
            role=role,
            interval_ns=int(interval_s * 1e9),
            boot_start_ns=time.monotonic_ns(),
        )

    def set(self, **fields) -> None:
        for k, val in fields.items():
            self.v[_F[k]] = val
        self.mem.write(self.phys, MAILBOX.encode_tuple(tuple(self.v)))

    def beat(self) -> None:
        self.v[_F["beat"]] += 1
        self.v[_F["beat_ns"]] = time.monotonic_ns()
        self.mem.write(self.phys, MAILBOX.encode_tuple(tuple(self.v)))

    def dying_message(self, reason: str, site: str) -> None:
        self.set(
            state=PANICKED,
            panic_ns=time.monotonic_ns(),
            reason=reason.encode()[:96],
            site=site.encode()[:32],
        )


def read_mail(mem: PhysMem, lay: PartLayout, retries: int = 5) -> Mail:
    """Decode a partition's mailbox; a torn read (writer mid-store) is retried, then rejected."""
    err: CorruptObject | None = None
    for _ in range(retries):
        try:
            d = MAILBOX.decode(mem.mm, lay.mailbox)
            break
        except CorruptObject as e:
            err = e
            if e.field == "magic":
                raise
    else:
        raise err
    text = {
        k: d[k].rstrip(b"\0").decode(errors="replace")
        for k in ("reason", "site", "fault", "fault_target", "fault_site", "devices")
    }
    return Mail(
        d["state"],
        d["pid"],
        d["role"],
        bool(d["listening"]),
        d["beat"],
        d["beat_ns"],
        d["interval_ns"],
        d["boot_start_ns"],
        d["boot_ns"],
        d["panic_ns"],
        injected_ns=d["injected_ns"],
        activated_ns=d["activated_ns"],
        mount_start_ns=d["mount_start_ns"],
        mount_ns=d["mount_ns"],
        zone=d["zone"],
        **text,
    )


# --- doorbells ---------------------------------------------------------------------------

WATCHDOG = "watchdog"  # the machine's own doorbell (a BMC's watchdog), for single-OS schemes


def doorbell_path(workdir: str, part_id: int | str) -> str:
    name = part_id if isinstance(part_id, str) else f"p{part_id}"
    return os.path.join(workdir, f"doorbell-{name}.sock")


def owner_only_socket(kind: int, path: str) -> socket.socket:
    """A Unix socket bound at ``path`` with OWNER_ONLY_MODE: Linux gives the new file the
    mode of the socket's inode (less the umask), so it is never open, not even briefly."""
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        os.fchmod(s.fileno(), param.OWNER_ONLY_MODE)
        s.bind(path)
    except BaseException:
        s.close()
        raise
    return s


class Doorbell:
    """The listening end: a datagram socket a dying kernel rings."""

    def __init__(self, workdir: str, part_id: int | str):
        self.path = doorbell_path(workdir, part_id)
        Path(self.path).unlink(missing_ok=True)
        self.sock = owner_only_socket(socket.SOCK_DGRAM, self.path)

    def wait(self, timeout: float) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(256)
        except (TimeoutError, socket.timeout):
            return None

    def close(self) -> None:
        self.sock.close()
        Path(self.path).unlink(missing_ok=True)


def ring(workdir: str, part_id: int | str, message: bytes) -> bool:
    """Ring a partition's doorbell; False when nobody listens there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(message, doorbell_path(workdir, part_id))
        return True
    except OSError:
        return False
    finally:
        s.close()


def run_queue_wait_ns(pid: int) -> int:
    """Nanoseconds the threads of process ``pid`` have waited in all for a host CPU while
    runnable; 0 once it is gone."""
    return sum(t.wait_ns for t in schedstat.threads(pid))


class BeatMonitor:
    """Judges a heartbeat by the progress its watcher observes, not by comparing the
    kernel's timestamp with the watcher's clock: a watcher that was itself descheduled
    sees the counter moved when it runs again, instead of a stale beat that was not.

    A silence is counted in the time the kernel could have run: what its threads spent
    waiting for a host CPU since its beat was first late (``waits``, from the host's
    scheduler) is not silence, up to HEARTBEAT_HOST_WAIT_MAX_BEATS intervals. A partition
    owns its CPUs on the machine this emulates; here they are shared with every process
    of the host, and a loaded host otherwise fences a living kernel. A hung kernel's
    threads sleep and a killed one has none, so neither is given more time."""

    def __init__(self, missed: int, waits=run_queue_wait_ns):
        self.missed = missed
        self.waits = waits
        self.last: tuple[int, int] | None = None  # (beat counter, when we saw it change)
        self.late_waits: int | None = None  # the kernel's run-queue waits when it was late

    def stopped(self, mail: "Mail") -> bool:
        now = time.monotonic_ns()
        if self.last is None or mail.beat != self.last[0]:
            self.last, self.late_waits = (mail.beat, now), None
            return False
        silence = now - self.last[1]
        if silence <= mail.interval_ns:
            return False
        if self.late_waits is None:
            self.late_waits = self.waits(mail.pid)
        limit = self.missed * mail.interval_ns
        if silence <= limit:
            return False
        waited = max(0, self.waits(mail.pid) - self.late_waits)
        return silence - min(waited, param.HEARTBEAT_HOST_WAIT_MAX_BEATS * mail.interval_ns) > limit
