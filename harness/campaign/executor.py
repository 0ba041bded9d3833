"""Where a campaign's faults run: in this process's children, or as Dask tasks.

Promises to the campaign loop (run.py): ``results(executor, batches, params)`` yields one
result per fault as each completes, whatever happens to a worker (a result may come twice:
the loop counts it once). A batch is a list of faults of one scheme that may share
machines (task.py). ``local`` runs the batches one after another here, ``docker`` the same with each batch's
trial process in a container of ``params["image"]`` (container.py); ``dask`` submits
each batch as a task (``task.run_batch``) to a Dask distributed cluster — a
``LocalCluster`` of ``workers`` single-threaded worker processes on this machine, or the
scheduler at ``scheduler`` (tcp://HOST:PORT), whose workers have crashbench installed —
and takes each result from the campaign's Dask queue as the task puts it there. A task
whose worker dies is rerun by Dask elsewhere (up to its allowed failures); one that fails
anyway yields a ``harness-error`` result for each fault of it. On any exit — the end, an
error, Ctrl-C — the tasks are cancelled and a cluster made here is closed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

from harness.campaign.plan import FaultSpec
from harness.campaign.task import error_result, iter_batch, run_batch

EXECUTORS = ("dask", "local", "docker")
QUEUE_POLL_S = 0.2


def results(
    executor: str,
    batches: list[list[FaultSpec]],
    params: dict,
    workers: int = 1,
    scheduler: str | None = None,
) -> Iterator[dict]:
    if executor in ("local", "docker"):  # docker: params["image"] (task.py, container.py)
        for b in batches:
            yield from iter_batch([f.to_dict() for f in b], params)
    elif executor == "dask":
        yield from _dask(batches, params, workers, scheduler)
    else:
        raise ValueError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")


def _dask(
    batches: list[list[FaultSpec]], params: dict, workers: int, scheduler: str | None
) -> Iterator[dict]:
    from distributed import Client, LocalCluster, Queue

    cluster = client = futures = None
    try:
        if scheduler is None:
            # one thread a worker: a fault's machine takes what a worker machine has
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        client = Client(cluster if cluster is not None else scheduler, timeout="30s")
        cid = params["campaign_id"]
        params = {**params, "queue": f"crashbench-{cid}-{time.time_ns()}"}
        q = Queue(params["queue"], client=client)
        futures = client.map(
            run_batch,
            [[f.to_dict() for f in b] for b in batches],
            params=params,
            pure=False,
            key=[f"crashbench-{cid}-fault-{b[0].index}" for b in batches],
        )
        pending = dict(zip(futures, batches))
        while pending:
            yield from _drain(q)
            finished = [fut for fut in pending if fut.done()]
            for fut in finished:
                batch = pending.pop(fut)
                yield from _drain(q)  # what it put there before its result
                try:
                    yield from (json.loads(json.dumps(r)) for r in fut.result())
                except Exception as e:  # noqa: BLE001 - a lost task is the harness's error
                    for f in batch:
                        yield error_result(f, f"the Dask task failed: {type(e).__name__}: {e}")
            if not finished:
                time.sleep(QUEUE_POLL_S)
        yield from _drain(q)
    finally:
        if client is not None:
            if futures:
                client.cancel(futures)
            client.close()
        if cluster is not None:
            cluster.close()


def _drain(q) -> list[dict]:
    n = q.qsize()
    # Dask's messages turn lists into tuples: back to what JSON (and the schema) knows
    return [json.loads(json.dumps(r)) for r in q.get(batch=n)] if n else []
