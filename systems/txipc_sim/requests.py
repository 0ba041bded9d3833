"""Request transactions: each FUSE request a txipc_sim kernel handles is a transaction.

Promises to the txipc_sim kernel program (systems/txipc_sim/server.py) and, through its
``txstatus`` control reply, to the scheme (systems/txipc_sim/__init__.py):

* ``around(handlers)`` wraps every FUSE request handler: the request runs under the big
  kernel lock (``VFS.lock``) from its first store until it commits or aborts, so no other
  request, no write-back and no journal commit sees what it stored before it commits
  (requests are one at a time already: one serving thread); every store it makes into
  physical memory is undo-logged (kernel/core/txlog.py); it commits when its reply is
  ready, also when its answer is an error (ENOENT, ENOSPC: the VFS changes nothing first);
* a request that makes the disk see anything (write-back of a throttled writer, fsync, a
  journal commit of a full transaction: ``BlockDevice.before_write``) becomes irrevocable at
  that point: the disk is never ahead of memory that a roll-back would restore;
* ``RequestAborted`` raised inside a request (the kernel's ``request_exception``), or any
  other exception but an answer (OSError, a protocol error) — a kernel bug's — aborts it:
  its stores are put back (memory byte-identical to before the request), the storage
  stack's tables are built again from that memory, as a kernel adopting it would
  (kernel/core/cachewalk.py; the running journal transaction completed on the disk,
  kernel/tools/txncomplete.py; ``VFS.remount``), and the request is executed once more; if
  it aborts again it is answered EIO. A roll-back that cannot be done (irrevocable, the
  log failed its checks, the journal transaction refused) is a panic whose reason begins
  NOT_RECOVERED: the scheme then reboots;
* a request whose first store into a frame found it corrupted (kernel/core/txlog.py
  ``damaged``: a wild write or a bit flip the page cache's checksum would otherwise be
  computed over) neither commits nor writes to the disk: at its reply or at its first disk
  write it is aborted at site CHECK_SITE as above (figure ``damage_caught``);
* the storage stack's own checks (``VFS.found_corruption``: site ``pagecache`` or
  ``fs.check``) that find corruption inside a request abort it at CHECK_SITE in the same
  way, instead of a panic; outside a request they panic (the scheme reboots);
* ``status()``: requests, rolled back, re-executed, answered with an error, irrevocable, damage caught,
  stores and bytes logged, and each abort with its times (CLOCK_MONOTONIC ns): started,
  rolled back, cache walked, journal transaction completed, tables rebuilt.
"""

from __future__ import annotations

import errno
import logging
import time

from kernel.core.cachewalk import collect
from kernel.core.fuse import FuseError
from kernel.core.txlog import Irrevocable, LogDamaged, UndoLog
from kernel.tools.txncomplete import complete_transaction

NOT_RECOVERED = "not recovered by the transaction"
log = logging.getLogger(__name__)


CHECK_SITE = "commit check"  # the abort of a request that met a corrupted frame


class RequestAborted(Exception):
    """A fault inside a request: its transaction must be aborted."""

    def __init__(self, site: str, detail: str = ""):
        super().__init__(f"exception in request at {site}" + (f": {detail}" if detail else ""))
        self.site, self.detail = site, detail


def _unexpected(e: Exception) -> RequestAborted:
    """Any other exception inside a request is a fault in it too (a kernel bug's)."""
    log.error("exception inside a request, rolled back: %r", e)
    return RequestAborted(f"unexpected {type(e).__name__}")


class Transactions:
    def __init__(self, kernel, log: UndoLog):
        self.k, self.log = kernel, log
        self.tid = 0
        self.open = False
        self.counts = dict(
            requests=0,
            rolled_back=0,
            re_executed=0,
            answered_error=0,
            irrevocable=0,
            damage_caught=0,
        )
        self.aborts: list[dict] = []
        self._orphans: set[int] = set()
        kernel.dev.before_write = self._output_commit
        kernel.vfs.contain = self._contain

    def around(self, handlers: dict) -> dict:
        return {op: self._wrap(op, h) for op, h in handlers.items()}

    def _wrap(self, op: int, h):
        def request(nodeid, body, uid, gid, pid):
            with self.k.vfs.lock:
                for attempt in (0, 1):
                    self._begin()
                    try:
                        out, answer = self._handle(h, nodeid, body, uid, gid, pid)
                    except Exception as e:  # a fault in the request: an oops, or a bug's
                        fault = e if isinstance(e, RequestAborted) else _unexpected(e)
                        self._abort(op, fault, attempt)
                        if attempt:
                            self.counts["answered_error"] += 1
                            raise OSError(errno.EIO, f"request aborted twice: {fault}") from None
                        self.counts["re_executed"] += 1
                        continue
                    except BaseException:
                        self._commit()
                        raise
                    self._commit()
                    if answer is not None:
                        raise answer
                    return out

        return request

    def _handle(self, h, *args) -> tuple:
        """(the reply, None) or (None, the error answer: the VFS changed nothing first),
        once the memory the request built on passed the check before commit."""
        try:
            out, answer = h(*args), None
        except (OSError, FuseError) as e:
            out, answer = None, e
        self._refuse_damage()
        return out, answer

    def _refuse_damage(self) -> None:
        """A frame the request carried forward was corrupted before it (kernel/core/txlog.py
        ``damaged``): the request must not commit, nor reach the disk, on top of it."""
        if self.log.damaged:
            raise RequestAborted(CHECK_SITE, "; ".join(self.log.damaged))

    # --- one transaction ---------------------------------------------------------------------
    def _begin(self) -> None:
        self.tid += 1
        self.open = True
        self._orphans = set(self.k.vfs.orphans)
        self.log.begin(self.tid)

    def _commit(self) -> None:
        self.log.commit()
        self.open = False
        self.counts["requests"] += 1

    def _contain(self, site: str, reason: str) -> None:
        """The storage stack's own check found corruption (a page failing its checksum
        before a partial store or write-back, a bad pointer before a commit): inside a
        request it is refused as the check before commit refuses it — the request aborted,
        nothing of it on the disk; outside one the kernel panics (the caller goes on)."""
        if self.open and self.log.state == 1:
            self.log.damaged.append(f"{site}: {reason}")
            raise RequestAborted(CHECK_SITE, reason)

    def _output_commit(self) -> None:
        if self.open and self.log.state == 1:
            self._refuse_damage()
            self.counts["irrevocable"] += 1
            self.log.irrevocable("the request wrote to the disk (write-back or journal commit)")

    def _abort(self, op: int, e: RequestAborted, attempt: int) -> None:
        t0 = time.monotonic_ns()
        try:
            restored = self.log.abort()
        except (Irrevocable, LogDamaged) as x:
            self.k.panic(f"{NOT_RECOVERED}: {type(x).__name__}: {x}", e.site)
        self.open = False
        t1 = time.monotonic_ns()
        clocks: dict[str, int] = {}
        refused = self._remount(clocks)
        if refused:
            self.k.panic(f"{NOT_RECOVERED}: running journal transaction refused: {refused}", e.site)
        self.counts["rolled_back"] += 1
        self.counts["damage_caught"] += e.site == CHECK_SITE
        self.aborts.append(
            dict(
                site=e.site,
                opcode=op,
                attempt=attempt,
                start_ns=t0,
                rolled_back_ns=t1,
                remounted_ns=time.monotonic_ns(),
                bytes_restored=restored,
                **({"detail": e.detail} if e.detail else {}),
                **clocks,
            )
        )

    def _remount(self, clocks: dict | None = None) -> str:
        """The storage stack's tables again, from the rolled-back memory; why not, or "".
        ``clocks`` gets the end of each step (CLOCK_MONOTONIC ns): ``walked_ns``, the cache
        walk; ``completed_ns``, the running journal transaction completed on the disk."""
        k, vfs = self.k, self.k.vfs
        lay = k.lay
        clocks = {} if clocks is None else clocks
        harvest = collect(k.mem, lay.base, lay.size, lay.part_id)
        clocks["walked_ns"] = time.monotonic_ns()
        if harvest.txn_refused:
            return harvest.txn_refused
        done = complete_transaction(vfs.dev, harvest.meta_blocks)
        clocks["completed_ns"] = time.monotonic_ns()
        if done.rejected_blocks:
            return "; ".join(done.refused) or f"{done.rejected_blocks} blocks rejected"
        vfs.remount(harvest.adopted)
        vfs.orphans = self._orphans
        return ""

    def status(self) -> dict:
        return {
            **self.counts,
            "stores_logged": self.log.stores,
            "bytes_logged": self.log.bytes,
            "aborts": list(self.aborts),
        }
