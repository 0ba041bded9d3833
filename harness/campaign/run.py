"""The campaign loop: start or continue a campaign directory, run what is left, finish.

Promises to `crashbench campaign`: the same parameters in the same directory are the same
campaign — faults already in its log are not run again, so a stopped campaign continues
where it stopped and every fault is counted once; other parameters there are refused
naming the first that differs. Each result is appended to the log before it is counted;
campaign.json is rewritten (validated, atomically) when the campaign ends, completes or
is stopped (Ctrl-C, SIGTERM), with the summary of every fault in the log — whatever
instant the stop came at. On every exit
the trials' scratch directory of this machine is left empty: the loop waits for each trial
process (found by its working directory) to finish its teardown, then removes it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from harness.campaign import executor as executors
from harness.campaign import store, summary
from harness.campaign.plan import FaultSpec, kinds_of, sites_of, targets_of
from harness.campaign.plan import plan as make_plan
from harness.campaign.task import scratch_dir

TEARDOWN_WAIT_S = 120.0  # how long the trials of a stopped campaign get to tear down


def plan_of(parameters: dict) -> list[FaultSpec]:
    return make_plan(
        parameters["schemes"],
        kinds_of(parameters["faults"]),
        parameters["per_scheme"],
        parameters["seed"],
        sites_of(parameters["sites"]),
        targets_of(parameters.get("targets", "all")),  # absent: every target
    )


def open_campaign(d: Path, parameters: dict, environment: dict) -> tuple[dict, list[dict]]:
    """(campaign.json as it stands, results already logged): a new campaign written, or
    the one in ``d`` checked to be this one."""
    faults = plan_of(parameters)
    cid = store.campaign_id(parameters)
    if (d / store.CAMPAIGN_FILE).exists():
        doc = store.load(d)
        old, new = store.identity(doc["parameters"]), store.identity(parameters)
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                raise store.CampaignError(
                    f"{d}: holds campaign {doc['campaign_id']} with {k} = {old.get(k)!r}, not "
                    f"{new.get(k)!r}; use another --out to run a different campaign"
                )
        doc["parameters"] = parameters
    else:
        from harness.results import _created

        d.mkdir(parents=True, exist_ok=True)
        doc = {
            "schema_version": store.SCHEMA_VERSION,
            "kind": store.KIND,
            "campaign_id": cid,
            "created": _created(d),
            "parameters": parameters,
            "environment": environment,
            "plan": [f.to_dict() for f in faults],
            "faults": [],
            "log": {"rejected_lines": 0, "duplicates": 0},
            "summary": summary.summarize([], parameters["schemes"]),
            "status": "running",
            "time": {"wall_s": 0.0, "faults_run": 0, "per_fault_s": None},
        }
        store.write(d, doc)
    done, info = store.load_log(d, {f.id for f in faults}, repair=True)
    doc["log"] = info
    return doc, done


def run(d: Path, parameters: dict, environment: dict, say=lambda res, done, total: None) -> dict:
    """Run what is left of the campaign in ``d``; campaign.json as finally written."""
    doc, done = open_campaign(d, parameters, environment)
    faults = plan_of(parameters)
    ids = {r["id"] for r in done}
    todo = [f for f in faults if f.id not in ids]
    params = {
        "campaign_id": doc["campaign_id"],
        **{
            k: parameters[k]
            for k in ("workload", "timing", "workload_params", "machine_file", "redeploy_every")
        },
        "data_seed": parameters["seed"],  # every machine's data set (prepared.py)
        **({"image": parameters["image"]} if parameters["executor"] == "docker" else {}),
    }
    wall0, t0, ran = doc["time"]["wall_s"], time.monotonic(), 0
    status, stopped = "stopped", None
    try:
        for res in executors.results(
            parameters["executor"],
            batches(todo, parameters["redeploy_every"]),
            params,
            parameters["workers"],
            parameters["scheduler"],
        ):
            if res["id"] in ids:  # a task Dask ran twice: counted once
                continue
            store.append(d, res)
            ids.add(res["id"])
            done.append(res)
            ran += 1
            say(res, len(done), len(faults))
        status = "complete"
    except KeyboardInterrupt as e:
        stopped = {
            "signal": getattr(e, "signal_name", "SIGINT"),
            "faults_done": len(done),
            "faults_planned": len(faults),
        }
        raise
    finally:
        if parameters["executor"] == "docker":
            from harness.campaign.container import stop_all

            stop_all(doc["campaign_id"])
        leftovers = clean_scratch(doc["campaign_id"])
        # The log is the record: a stop between a result's write and its bookkeeping
        # (during the fsync) must still count it, as the next run will.
        done, doc["log"] = store.load_log(d, {f.id for f in faults})
        doc.update(
            faults=sorted(done, key=lambda r: r["index"]),
            status=status,
            summary=summary.summarize(done, parameters["schemes"]),
        )
        if stopped:
            doc["stopped"] = {**stopped, "faults_done": len(done)}
        else:
            doc.pop("stopped", None)
        if leftovers:
            doc.setdefault("notes", []).append(leftovers)
        wall = wall0 + time.monotonic() - t0
        doc["time"] = {
            "wall_s": wall,
            "faults_run": len(done),
            "per_fault_s": wall / len(done) if done else None,
            "this_session": {"wall_s": time.monotonic() - t0, "faults_run": ran},
        }
        store.write(d, doc)
    return doc


def batches(todo: list[FaultSpec], every: int) -> list[list[FaultSpec]]:
    """Consecutive faults of a scheme, ``every`` to a batch (a machine's faults at most),
    the batches interleaved across schemes as the plan is."""
    per: dict[str, list[list[FaultSpec]]] = {}
    for f in todo:
        bs = per.setdefault(f.scheme, [[]])
        if len(bs[-1]) >= max(1, every):
            bs.append([])
        bs[-1].append(f)
    out = []
    for i in range(max((len(b) for b in per.values()), default=0)):
        out += [bs[i] for bs in per.values() if i < len(bs) and bs[i]]
    return out


def clean_scratch(campaign_id: str, wait_s: float = TEARDOWN_WAIT_S) -> str | None:
    """Wait for every trial process of this campaign on this machine to have torn down
    (a stopped worker's trials notice its death), then remove the scratch directory.
    A message when something is still there (left for `crashbench down --all`)."""
    root = scratch_dir(campaign_id)
    if not root.exists():
        return None
    deadline = time.monotonic() + wait_s
    while (busy := _processes_in(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    mounts = _mounts_under(root)
    if busy or mounts:
        return (
            f"{root}: {len(busy)} trial processes and {len(mounts)} mounts still there after "
            f"{wait_s:.0f} s; `crashbench down --all` removes what their owners left"
        )
    shutil.rmtree(root, ignore_errors=True)
    return None


def _processes_in(root: Path) -> list[int]:
    r = str(root) + "/"
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if (os.readlink(f"/proc/{p}/cwd") + "/").startswith(r):
                    out.append(int(p))
            except OSError:
                pass
    return out


def _mounts_under(root: Path) -> list[str]:
    r = str(root) + "/"
    with open("/proc/self/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(r)]
