"""Failure detection, as a watcher of a partition runs it.

Promises to the schemes: ``Watcher.wait()`` returns when the watched kernel is known to
have failed — at once when its doorbell rings with a dying message, otherwise when its
heartbeat has not moved for MISSED beat intervals of the watcher's own observation (hang,
kill, or a death with no message; kernel/hw/mailbox.py BeatMonitor) — with the time
of the verdict and the failure time the dying kernel recorded in its mailbox.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kernel import param
from kernel.hw import mailbox
from kernel.hw.physmem import CorruptObject, PhysMem, partition_layout


@dataclass
class Failure:
    how: str  # "dying message" or "heartbeat"
    detected_at: float  # CLOCK_MONOTONIC seconds
    failed_at: float  # fault activation recorded by the kernel (or last beat, if none)
    mail: mailbox.Mail


class Watcher:
    def __init__(
        self,
        host,
        part_id: int,
        listen_as: int | str = mailbox.WATCHDOG,
        missed: int = param.HEARTBEAT_MISSED_BEATS,
    ):
        p = host.machine.partition(part_id)
        self.lay = partition_layout(part_id, p.base, p.size)
        self.mem = PhysMem(host.physmem, readonly=True)
        self.bell = mailbox.Doorbell(str(host.workdir), listen_as)
        self.beats = mailbox.BeatMonitor(missed)

    def wait(self, timeout: float = 60.0) -> Failure:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            mail = self._mail()
            poll = mail.interval_ns / 4e9 if mail else param.HEARTBEAT_INTERVAL_S / 4
            if self.bell.wait(poll) is not None:
                return self._failure("dying message")
            mail = self._mail()
            if mail and self.beats.stopped(mail):
                return self._failure("heartbeat")
        raise TimeoutError(f"no failure of the watched kernel within {timeout} s")

    def _mail(self) -> mailbox.Mail | None:
        try:
            return mailbox.read_mail(self.mem, self.lay)
        except CorruptObject:
            return None

    def _failure(self, how: str) -> Failure:
        now = time.monotonic()
        mail = self._mail()
        t = (mail.activated_ns or mail.panic_ns or mail.beat_ns) / 1e9 if mail else now
        return Failure(how, now, t, mail)

    def close(self) -> None:
        self.bell.close()
        self.mem.close()
