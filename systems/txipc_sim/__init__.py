"""Scheme `txipc_sim`: every file-system request is a transaction; a fault aborts only it.

Promises (TxIPC, Li et al., ICDCS 2021, in crashbench's terms: the emulated kernel's file
system plays the server and each FUSE request the IPC): the kernel is the txipc_sim kernel
program (systems/txipc_sim/server.py), whose every request's stores into physical memory
are undo-logged in a log in physical memory (kernel/core/txlog.py). It records its
applications' open files (``--keep-apps``) and the host holds a copy of its FUSE
connection, as for otherworld. An exception inside a request is recovered in place: the
request's stores are rolled back, the kernel's tables are built again from the rolled-back
memory and the request is executed once more (EIO if it fails again); the service never
stops. ``on_crash`` then reports it as recovered, with no outage beyond the roll-back,
phases ``detect`` (fault to abort), ``roll-back`` and ``remount in place`` (split into
``cache walk``, ``journal completion`` and ``tables rebuilt`` when one roll-back recovered
it), and ``figures``: requests rolled back, re-executed, answered with an error, made
irrevocable, refused by the check before commit (``damage_caught``: a frame a wild write
changed, kernel/core/txlog.py), and stores and bytes logged since boot.

A kernel death (panic, kill, hang) is *inside a request* when the undo log's header in
memory says a transaction is open (it is written open when a request begins, before any
of its stores, and idle when it commits). Then the dead kernel is fenced and its
applications halted where they are (systems/otherworld ``halt_in_place``), the log is
checked (phase ``log check``), and a new txipc_sim kernel started on the same partition
(``start_in_place``) rolls the request back from the log, adopts the memory, keeps the
processes with their pids and serves the same connection, where the unanswered request is
executed again (figure ``taken_over`` 1). A death with no transaction open (write-back,
a journal commit, the heartbeat, the control thread), a log that fails its checks (counted:
``logs_refused``), an irrevocable transaction, a roll-back in place that failed, or a
successor that does not come up fall back to a reboot (systems/reboot), reported with the
note "not recovered by the transaction" and its reason (figure ``not_recovered`` 1).
"""

from __future__ import annotations

import time

from kernel import param
from kernel.core import txlog
from kernel.hw.host import BootError
from kernel.hw.physmem import PhysMem, partition_layout
from systems.base import Capabilities, RecoveryReport, Reservation
from systems.otherworld import halt_in_place, start_in_place
from systems.reboot import Reboot
from systems.txipc_sim.requests import NOT_RECOVERED

MODULE = "systems.txipc_sim.server"
POLL_S = 0.005  # how often the kernel's transaction counts are read while waiting


class TxIPCSim(Reboot):
    name = "txipc_sim"
    # a crash outside a request: a reboot; a kernel death inside one: kept in place
    capabilities = Capabilities(recovers=True, keeps_processes_in_request=True)
    kernel_modules = (MODULE,)
    _before: dict | None = None

    def __init__(self, firmware_s: float | None = None):
        super().__init__(firmware_s)
        self.deaths = 0
        self.logs_refused = 0

    @classmethod
    def reservation(cls, machine) -> Reservation:
        return Reservation(
            memory_bytes=param.TXLOG_BYTES,
            what="the undo log, taken from partition 0's page frames (no core)",
        )

    def _boot(self):
        """The txipc_sim kernel, recording its apps' open files; the host holds its connection."""
        self.host.release_connection()  # a rebooted kernel's is a new one
        kp = self.host.boot(0, apps=self.apps, module=MODULE, extra=("--keep-apps",))
        self.host.hold_connection(0)
        return kp

    def _txstatus(self) -> dict | None:
        try:
            st = self.host.control(0, {"cmd": "txstatus"}, timeout=1.0)
        except Exception:  # noqa: BLE001 - a dead or dying kernel: the watcher will tell
            return None
        return st if st.get("ok") else None

    def inject(self, fault: str, **where) -> dict:
        self._before = self._txstatus()  # the counts before the fault
        return super().inject(fault, **where)

    def on_crash(self, fault: dict | None = None, timeout: float = 60.0) -> RecoveryReport:
        before = self._before or self._txstatus() or {"aborts": []}
        self._before = None  # a successor's counts start again from 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                f = self.watcher.wait(POLL_S)
            except TimeoutError:
                st = self._txstatus()
                if st is not None and len(st["aborts"]) > len(before["aborts"]):
                    return self._rolled_back(fault, before, st)
                continue
            return self._after_death(RecoveryReport.after(self.name, f, fault), f, before)
        raise TimeoutError(f"no failure and no aborted request within {timeout} s")

    def _after_death(self, r: RecoveryReport, failure, before: dict) -> RecoveryReport:
        """The kernel died: its successor takes over if it died inside a request."""
        self.deaths += 1
        why = failure.mail.reason if failure.mail and failure.mail.reason else failure.how
        if why.startswith(NOT_RECOVERED):  # the kernel itself could not roll back in place
            return self._fallback(r, why, before)
        t = time.monotonic()
        halt_in_place(self.host)
        r.phase("fence", t)
        t = time.monotonic()
        try:
            inside = self._open_transaction() is not None
        except (txlog.LogDamaged, txlog.Irrevocable) as e:
            r.phase("log check", t)
            return self._log_refused(r, f"{type(e).__name__}: {e}", before)
        r.phase("log check", t)
        if not inside:
            return self._fallback(
                r, f"{why} (no request open: no transaction to roll back)", before
            )
        path = self.host.workdir / f"txipc-recovery-{self.deaths}.json"
        try:
            d = start_in_place(self.host, r, MODULE, path, self.apps, "txkernel", "kernel start")
        except BootError as e:
            return self._fallback(r, f"the new kernel did not come up: {e}".splitlines()[0], before)
        r.recovered = True
        r.figures = {
            **self._figures(before, {}),
            "taken_over": 1,
            "stores_rolled_back": int(d["stores_rolled_back"]),
            "bytes_restored": int(d["bytes_restored"]),
        }
        return r

    def _open_transaction(self):
        """The records of the transaction open at the death, from the memory (or None)."""
        p = self.host.machine.partition(0)
        _, phys, span = txlog.UndoLog.place(partition_layout(0, p.base, p.size))
        mem = PhysMem(self.host.physmem, readonly=True)
        try:
            return txlog.open_transaction(mem, phys, param.TXLOG_BYTES, span)
        finally:
            mem.close()

    def _log_refused(self, r: RecoveryReport, why: str, before: dict) -> RecoveryReport:
        self.logs_refused += 1
        r.rejected.append(f"undo log: {why}")
        r = self._fallback(r, f"undo log refused ({why}; {self.logs_refused} so far)", before)
        r.figures["logs_refused"] = self.logs_refused
        return r

    def _rolled_back(self, fault: dict | None, before: dict, st: dict) -> RecoveryReport:
        new = st["aborts"][len(before["aborts"]) :]
        mail = self.host.mail(0)
        first = new[0]
        failed_at = (mail.activated_ns or first["start_ns"]) / 1e9
        r = RecoveryReport(
            self.name, (fault or {}).get("fault") or "exception-in-request", failed_at
        )
        r.detected_by = "exception in request"
        r.phase("detect", failed_at, first["start_ns"] / 1e9)
        r.phase("roll-back", first["start_ns"] / 1e9, first["rolled_back_ns"] / 1e9)
        last = new[-1]
        self._rebuild_phases(r, first, last)
        r.service_at = last["remounted_ns"] / 1e9
        r.recovered = True
        r.figures = self._figures(st, before)
        sites = ", ".join(sorted({a["site"] for a in new}))
        r.notes.append(
            f"recovered by the transaction: {len(new)} roll-back(s) at {sites}, "
            f"{sum(a['bytes_restored'] for a in new)} bytes restored; the service never stopped"
        )
        return r

    @staticmethod
    def _rebuild_phases(r: RecoveryReport, first: dict, last: dict) -> None:
        """The tables built again after the roll-back, step by step when the kernel says."""
        start, end = first["rolled_back_ns"] / 1e9, last["remounted_ns"] / 1e9
        if "walked_ns" not in first or "completed_ns" not in first or first is not last:
            r.phase("remount in place", start, end)
            return
        r.phase("cache walk", start, first["walked_ns"] / 1e9)
        r.phase("journal completion", first["walked_ns"] / 1e9, first["completed_ns"] / 1e9)
        r.phase("tables rebuilt", first["completed_ns"] / 1e9, end)

    def _fallback(self, r: RecoveryReport, why: str, before: dict) -> RecoveryReport:
        r.notes.append(f"{NOT_RECOVERED}: {why.removeprefix(NOT_RECOVERED + ': ')}")
        r.figures = {**self._figures(before, {}), "not_recovered": 1}
        # the host's copy of the connection goes first: a process waiting in a request of
        # it could not be fenced while the request can still be answered
        self.host.release_connection()
        return self._reboot(r)

    @staticmethod
    def _figures(st: dict, before: dict) -> dict[str, int]:
        keys = ("rolled_back", "re_executed", "answered_error", "irrevocable", "damage_caught")
        out = {k: int(st.get(k, 0)) - int(before.get(k, 0)) for k in keys}
        out.update(
            requests=int(st.get("requests", 0)),
            stores_logged=int(st.get("stores_logged", 0)),
            bytes_logged=int(st.get("bytes_logged", 0)),
        )
        return out
