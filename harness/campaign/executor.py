"""Where a campaign's faults run: in this process's children, or as Dask tasks.

Promises to the campaign loop (run.py): ``results(executor, faults, params)`` yields one
result per fault as each completes (in completion order), whatever happens to a worker:
``local`` runs the faults one after another here; ``dask`` submits each fault as a task
(``task.run_task``) to a Dask distributed cluster — a ``LocalCluster`` of ``workers``
single-threaded worker processes on this machine, or the scheduler at ``scheduler``
(tcp://HOST:PORT), whose workers have crashbench installed. A task whose worker dies is
rerun by Dask elsewhere (up to its allowed failures); one that fails anyway yields a
``harness-error`` result. On any exit — the end, an error, Ctrl-C — the tasks are
cancelled and a cluster made here is closed.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

from harness.campaign.plan import FaultSpec
from harness.campaign.task import error_result, run_task

EXECUTORS = ("dask", "local")


def results(executor: str, faults: list[FaultSpec], params: dict, workers: int = 1,
            scheduler: str | None = None) -> Iterator[dict]:
    if executor == "local":
        for f in faults:
            yield run_task(f.to_dict(), params)
    elif executor == "dask":
        yield from _dask(faults, params, workers, scheduler)
    else:
        raise ValueError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")


def _dask(faults: list[FaultSpec], params: dict, workers: int,
          scheduler: str | None) -> Iterator[dict]:
    from distributed import Client, LocalCluster, as_completed
    cluster = client = futures = None
    try:
        if scheduler is None:
            # one thread a worker: a fault's machine takes what a worker machine has
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster if cluster is not None else scheduler, timeout="30s")
        cid = params["campaign_id"]
        futures = client.map(run_task, [f.to_dict() for f in faults], params=params,
                             key=[f"crashbench-{cid}-fault-{f.index}" for f in faults],
                             pure=False)
        by_key = {fut.key: f for fut, f in zip(futures, faults)}
        for fut in as_completed(futures):
            try:
                yield fut.result()
            except Exception as e:        # noqa: BLE001 - a lost task is the harness's error
                yield error_result(by_key[fut.key], f"the Dask task failed: {type(e).__name__}: {e}")
    finally:
        if client is not None:
            if futures:
                client.cancel(futures)
            client.close()
        if cluster is not None:
            cluster.close()
