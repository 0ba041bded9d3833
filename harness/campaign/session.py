"""Fast faults: consecutive faults of one scheme on one machine, redeployed only when needed.

Promises to task.py: ``Session.serve(faults, emit)`` runs the faults in order, each as the
driver's phases from warm-up to verify (harness/driver.py ``Trial``; deploy and teardown
only when the machine changes): the next fault goes into the machine the scheme recovered
(orthros's re-paired backup, reboot's new kernel), and the machine is redeployed only after
a fault it did not come back from intact or with loss (not recovered, corrupted, a harness
error) or after ``every`` faults. The scheme re-arms after a crash in the background
(``defer_protection``): the next fault's steady state waits for it (harness/driver.py).
A machine whose recovery emptied its cache is given the working set again before the next
fault, as its deploy gave it (``refill cache``). Between two faults on one machine the
clients are stopped, the workload forgets what its clients wrote (``Workload.forget``),
so each fault is judged on its own writes, the kernel's dirty data is written back
(``sync``: a crash in the next fault cannot bring the forgotten files back), and the disk
is checked by fsck while nothing writes to it. Each result is handed to ``emit`` as it
completes. The machine is torn down on every exit path.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from harness import driver
from harness.campaign.plan import FaultSpec
from harness.campaign.task import CampaignTrial, data_of, result_of
from harness.trial import failed, record


def spec_of(fault: FaultSpec, params: dict) -> driver.TrialSpec:
    return driver.TrialSpec(
        fault.scheme,
        params["workload"],
        fault.kind,
        fault.index,
        fault.seed,
        dict(params["timing"]),
        dict(params["workload_params"]),
        params.get("machine_file"),
        fault_args=fault.fault_args(),
    )


class Session(CampaignTrial):
    """One machine, several faults; the Trial's state is the current fault's."""

    def __init__(self, first: FaultSpec, params: dict, out: Path):
        super().__init__(spec_of(first, params), out)
        self.params = params
        self.data_store, self.data_seed = data_of(params, first)
        self.pool = None
        self.base_svc = None

    def make_scheme(self, name: str):
        """The scheme re-arms (orthros: boots its next backup) while the recovered machine
        serves the fault's last load, its verify and the next warm-up; the driver awaits
        that before the next steady state."""
        s = super().make_scheme(name)
        s.defer_protection = True
        return s

    def serve(self, faults: list[FaultSpec], every: int, emit) -> None:
        on_machine = 0
        try:
            for f in faults:
                t0 = time.monotonic()
                self.spec, self.phases, self.report, self.crash_at = (
                    spec_of(f, self.params),
                    [],
                    None,
                    None,
                )
                self.events, self.cache_fill, self.evidence = [], None, {}
                self.fsck = None
                rec = self._one(f)
                res = result_of(f, rec, self.fsck, time.monotonic() - t0)
                on_machine += 1
                if res["outcome"] not in ("intact", "loss") or on_machine >= every:
                    self._retire()
                    on_machine = 0
                emit(res)
        finally:
            self._retire()

    def _one(self, f: FaultSpec) -> dict:
        try:
            if self.host is None:
                with self.phase("deploy"):
                    self.deploy()
                    self.pool = self._pool()
                self.base_svc = self.svc
            else:
                self._refill_cache()
            self.svc = self._svc_for(f)
            self.measure()
            if self.report is not None and self.report.recovered:
                with self.phase("check disk"):
                    self._check_live()
            return record(self, self.events)
        except Exception as e:  # noqa: BLE001 - recorded as the fault's harness error
            why = f"{type(e).__name__}: {e}"
            if isinstance(e, ConnectionError) and self.host is not None:
                why += f" (the active kernel stopped answering; {self.kernel_said()})"
            self._retire()
            return failed(self.spec, self.phases, self.crash_at, why)
        finally:
            if self.clients is not None:
                self.clients.stop()
                self.clients = None

    def _refill_cache(self) -> None:
        """A recovered machine whose cache lost the working set (reboot's new kernel
        starts empty) gets it back as its deploy did (``Workload.wait_ready`` reads the
        corpus once): the warm-up's skewed load alone would take its whole bound to fill
        it, and each fault on such a machine would then cost ``cache_timeout_s``."""
        want = self.cache_target()
        if want and self.cached_pages() < want:
            with self.phase("refill cache"):
                self.workload.wait_ready(self.svc, self.spec.timing["ready_timeout_s"])

    def _pool(self):
        """The machine's client processes, kept across its faults (harness/workloads/
        pool.py); None for a workload whose clients are not pooled."""
        from harness.workloads.pool import ClientPool

        module = self.workload.client_module
        if module is None:
            return None
        return ClientPool(module, self.host.workdir / "logs", self.svc.client_enter)

    def _svc_for(self, f: FaultSpec):
        """The fault's own history and logs, its own client seed, the machine's clients."""
        wd = self.host.workdir / f"fault-{f.index}"
        (wd / "logs").mkdir(parents=True, exist_ok=True)
        return dataclasses.replace(
            self.base_svc, workdir=wd, seed=f.seed, datadir=self.base_svc.data_dir, pool=self.pool
        )

    def _check_live(self) -> None:
        """The clients' files forgotten, everything written back (so a crash in the next
        fault cannot bring them back), then fsck while nothing writes."""
        from harness import history

        hd = self.svc.history_dir()
        self.workload.forget(
            self.svc, history.merge(sorted(hd.glob("*.jsonl")), self.svc.workdir / "merged.jsonl")
        )
        self.host.control(self.scheme.active, {"cmd": "sync"}, timeout=60.0)
        CampaignTrial.examine(self)

    def _retire(self) -> None:
        """Tear the machine down (fsck of a machine that failed is left to its record)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.host is None and self.net is None:
            return
        try:
            self.teardown()
        finally:
            self.bed = self.host = self.net = self.svc = self.base_svc = None
            self.scheme = self.make_scheme(self.spec.scheme)

    def examine(self) -> None:
        """At teardown: nothing (a machine that served is checked after each fault, one
        that failed is not judged by its disk)."""
