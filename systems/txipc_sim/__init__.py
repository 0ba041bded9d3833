"""Scheme `txipc_sim`: every file-system request is a transaction; a fault aborts only it.

Promises (TxIPC, Li et al., ICDCS 2021, in crashbench's terms: the emulated kernel's file
system plays the server and each FUSE request the IPC): the kernel is the txipc_sim kernel
program (systems/txipc_sim/server.py), whose every request's stores into physical memory
are undo-logged in a log in physical memory (kernel/core/txlog.py). An exception inside a
request is recovered in place: the request's stores are rolled back, the kernel's tables
are built again from the rolled-back memory and the request is executed once more (EIO if
it fails again); the service never stops. ``on_crash`` then reports it as recovered, with
no outage beyond the roll-back, phases ``detect`` (fault to abort), ``roll-back`` and
``remount in place`` (split into ``cache walk``, ``journal completion`` and ``tables
rebuilt`` when one roll-back recovered it), and ``figures``: requests rolled back, re-executed, answered with an
error, made irrevocable, and stores and bytes logged since boot. A fault outside any
request (write-back, the flusher's journal commit), a request that can no longer be rolled
back, a panic, a kill or a hang fall back to a reboot (systems/reboot), reported with the
note "not recovered by the transaction" and its reason (figure ``not_recovered`` 1).
"""

from __future__ import annotations

import time

from kernel import param
from systems.base import Capabilities, RecoveryReport, Reservation
from systems.reboot import Reboot

MODULE = "systems.txipc_sim.server"
POLL_S = 0.005  # how often the kernel's transaction counts are read while waiting


class TxIPCSim(Reboot):
    name = "txipc_sim"
    capabilities = Capabilities(recovers=True)  # a crash outside a request: a reboot
    kernel_modules = (MODULE,)
    _before: dict | None = None

    @classmethod
    def reservation(cls, machine) -> Reservation:
        return Reservation(
            memory_bytes=param.TXLOG_BYTES,
            what="the undo log, taken from partition 0's page frames (no core)",
        )

    def _boot(self):
        return self.host.boot(0, apps=self.apps, module=MODULE)

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                f = self.watcher.wait(POLL_S)
            except TimeoutError:
                st = self._txstatus()
                if st is not None and len(st["aborts"]) > len(before["aborts"]):
                    return self._rolled_back(fault, before, st)
                continue
            return self._fallback(RecoveryReport.after(self.name, f, fault), f, before)
        raise TimeoutError(f"no failure and no aborted request within {timeout} s")

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

    def _fallback(self, r: RecoveryReport, failure, before: dict) -> RecoveryReport:
        reason = failure.mail.reason if failure.mail and failure.mail.reason else failure.how
        why = reason if reason.startswith("not recovered") else f"{reason} (no request fault)"
        r.notes.append(
            f"not recovered by the transaction: {why.removeprefix('not recovered by the transaction: ')}"
        )
        r.figures = {**self._figures(before, {}), "not_recovered": 1}
        return self._reboot(r)

    @staticmethod
    def _figures(st: dict, before: dict) -> dict[str, int]:
        keys = ("rolled_back", "re_executed", "answered_error", "irrevocable")
        out = {k: int(st.get(k, 0)) - int(before.get(k, 0)) for k in keys}
        out.update(
            requests=int(st.get("requests", 0)),
            stores_logged=int(st.get("stores_logged", 0)),
            bytes_logged=int(st.get("bytes_logged", 0)),
        )
        return out
