"""The txipc_sim kernel: the emulated kernel whose file-system requests are transactions.

Promises to the scheme (systems/txipc_sim/__init__.py), which boots it with ``python -m
systems.txipc_sim.server`` (the arguments of kernel/core/kernel.py): a kernel as
kernel/core/kernel.py boots it, with an undo log carved from its partition's frame area
(kernel/core/txlog.py) and every FUSE request a transaction (systems/txipc_sim/requests.py).
An exception inside a request aborts that request only; one outside any request (write-back,
a journal commit of the flusher), or inside a request that can no longer be rolled back,
is a panic whose reason begins "not recovered by the transaction". The control socket
answers ``txstatus`` with the transactions' counts.

Started with ``--hold-pid``/``--hold-fd``/``--report`` after the kernel of its partition
died (panic, kill, hang) inside a request, it is that kernel's successor (``take_over``):
it rolls the open transaction back from the undo log in memory (kernel/core/txlog.py
``roll_back``: nothing is restored unless the header and every record pass their checks),
then does what the Otherworld crash kernel does (systems/otherworld/crashkernel.py
``take_over``: the cache adopted, the processes kept with their pids, the same FUSE
connection served, the request the dead kernel never answered executed again) and is the
partition's txipc_sim kernel from then on. A log that fails its checks, an irrevocable
transaction or none open: it exits with REFUSED_EXIT before it touches memory. Only this kernel pays for the log:
a kernel of any other scheme has no watcher on its memory and no handler wrapped.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from kernel import param
from kernel.core.kernel import Kernel, kernel_arguments, serve_and_start_apps
from kernel.core.txlog import OPEN, Irrevocable, LogDamaged, UndoLog, roll_back
from kernel.hw import machine as machine_mod
from systems.base import RecoveryReport
from systems.txipc_sim.requests import NOT_RECOVERED, RequestAborted, Transactions

log = logging.getLogger("kernel")
REFUSED_EXIT = 2  # a successor that found nothing it may roll back: it does not run


class TxKernel(Kernel):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lay, self.log_phys, self.log_span = UndoLog.place(self.lay)
        self.tx: Transactions | None = None

    def boot(self, *a, **kw):
        vfs = super().boot(*a, **kw)
        span = self.log_span
        log = UndoLog(self.mem, self.log_phys, param.TXLOG_BYTES, span, frames=self.lay)
        self.tx = Transactions(self, log)
        self.around = self.tx.around
        return vfs

    def request_exception(self, site: str) -> None:
        tx = self.tx
        if tx is not None and tx.open and tx.log.state == OPEN:
            raise RequestAborted(site)
        why = "outside any request" if tx is None or not tx.open else tx.log.reason
        self.panic(f"{NOT_RECOVERED}: exception at {site}, {why}", site)

    def _control(self, req: dict):
        if req.get("cmd") == "txstatus":
            with self.vfs.lock:
                return {"ok": True, **self.tx.status()}
        return super()._control(req)


def take_over(k: TxKernel, a, started: float) -> int:
    """Take a dead txipc_sim kernel's place: roll its open request back from the undo log
    in memory, then adopt that memory, keep its processes and serve its connection as the
    Otherworld crash kernel does (its ``take_over``, the same code). A log that fails its
    checks, an irrevocable or no open transaction: nothing is restored, exit REFUSED_EXIT."""
    from systems.otherworld.crashkernel import take_over as take_over_in_place

    r = RecoveryReport("txipc_sim", None, started)
    t = time.monotonic()
    try:
        done = roll_back(k.mem, k.log_phys, param.TXLOG_BYTES, k.log_span)
    except (LogDamaged, Irrevocable) as e:
        log.error("refusing to take over: %s: %s", type(e).__name__, e)
        return REFUSED_EXIT
    if done is None:
        log.error("refusing to take over: no transaction was open at the death")
        return REFUSED_EXIT
    r.phase("roll-back", t)
    r.notes.append(f"the open request rolled back: {done[0]} stores, {done[1]} bytes restored")
    take_over_in_place(
        k, a, r, {"started": started, "stores_rolled_back": done[0], "bytes_restored": done[1]}
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from systems.otherworld.crashkernel import take_over_arguments

    ap = kernel_arguments("python -m systems.txipc_sim.server", __doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault injector's choices")
    take_over_arguments(ap)
    a = ap.parse_args(argv)
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kernel[%(process)d] %(message)s")
    from kernel.core import fuse  # noqa: F401  (loaded with the kernel: part of boot)

    mach = machine_mod.load(a.machine, shape_checked=True)
    k = TxKernel(mach, a.partition, a.physmem, a.workdir, delay=not a.no_delay, seed=a.seed)
    k.keep_apps = a.keep_apps
    if k.part.cpus:
        os.sched_setaffinity(0, k.part.cpus)
    if a.hold_pid is not None:  # a dead kernel's successor on its partition
        return take_over(k, a, started)
    k.join_partition(a.tag)
    k.boot()
    log.info("booted partition %d (txipc_sim) in %.3f s", k.part.id, k.boot_s)
    return serve_and_start_apps(k, a)


if __name__ == "__main__":
    sys.exit(main())
