"""The txipc_sim kernel: the emulated kernel whose file-system requests are transactions.

Promises to the scheme (systems/txipc_sim/__init__.py), which boots it with ``python -m
systems.txipc_sim.server`` (the arguments of kernel/core/kernel.py): a kernel as
kernel/core/kernel.py boots it, with an undo log carved from its partition's frame area
(kernel/core/txlog.py) and every FUSE request a transaction (systems/txipc_sim/requests.py).
An exception inside a request aborts that request only; one outside any request (write-back,
a journal commit of the flusher), or inside a request that can no longer be rolled back,
is a panic whose reason begins "not recovered by the transaction". The control socket
answers ``txstatus`` with the transactions' counts. Only this kernel pays for the log:
a kernel of any other scheme has no watcher on its memory and no handler wrapped.
"""

from __future__ import annotations

import logging
import os
import sys

from kernel import param
from kernel.core.kernel import Kernel, kernel_arguments, serve_and_start_apps
from kernel.core.txlog import OPEN, UndoLog
from kernel.hw import machine as machine_mod
from systems.txipc_sim.requests import NOT_RECOVERED, RequestAborted, Transactions

log = logging.getLogger("kernel")


class TxKernel(Kernel):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lay, self.log_phys = UndoLog.carve(self.lay)
        self.tx: Transactions | None = None

    def boot(self, *a, **kw):
        vfs = super().boot(*a, **kw)
        span = (self.lay.ksuper, self.log_phys)  # the storage stack, not the mailbox
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


def main(argv: list[str] | None = None) -> int:
    ap = kernel_arguments("python -m systems.txipc_sim.server", __doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault injector's choices")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kernel[%(process)d] %(message)s")
    from kernel.core import fuse  # noqa: F401  (loaded with the kernel: part of boot)

    mach = machine_mod.load(a.machine, shape_checked=True)
    k = TxKernel(mach, a.partition, a.physmem, a.workdir, delay=not a.no_delay, seed=a.seed)
    k.keep_apps = a.keep_apps
    if k.part.cpus:
        os.sched_setaffinity(0, k.part.cpus)
    k.join_partition(a.tag)
    k.boot()
    log.info("booted partition %d (txipc_sim) in %.3f s", k.part.id, k.boot_s)
    return serve_and_start_apps(k, a)


if __name__ == "__main__":
    sys.exit(main())
