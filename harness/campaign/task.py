"""One fault of a campaign: a driver trial in a process of its own, and its result.

Promises to the executors (executor.py): ``iter_batch(faults, params)`` runs a batch of
faults of one scheme in a fresh Python process (``python -m harness.campaign.task``), so
that what one trial leaves in an interpreter never reaches the next, and yields each
fault's result — a dict of ``store.FAULT_SCHEMA`` — as it completes, or one of outcome
``harness-error`` for a fault the process did not finish; ``run_batch`` is the same as a
Dask task, which also puts each result on the campaign's Dask queue. In the process each
fault is one trial through the driver's ``run_one`` (harness/driver.py), or, with
``redeploy_every`` > 1, the batch shares machines (session.py). Every trial's work directory is made
under the campaign's scratch directory for this machine (``scratch_dir``), each in a
directory of its own, so two workers of one machine never share a work directory, memory
file, namespace, process set or port (those derive from the work directory). The trial
process tears its machine down on every exit path: an error, SIGINT, SIGTERM, and the
death of the process that started it (a killed worker), which it watches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from harness import driver, prepared
from harness.campaign import container, outcome
from harness.campaign.plan import FaultSpec
from kernel.core.faults import REQUEST_SITES

PARENT_POLL_S = 0.2  # how often a trial process looks whether its starter still lives
KILL_GRACE_S = 60.0  # a trial process asked to stop gets this long for its teardown
RESULT_POLL_S = 0.1  # how often the results a trial process wrote are looked for
ACTIVATION_POLL_S = 0.01  # how often the mailbox is read for the fault's activation
STATUS_TIMEOUT_S = 2.0  # a serving kernel answers its status well within this


def _every_request(d: Path) -> None:
    """Requests that pass every request site of kernel/core/faults.py (REQUEST_SITES): a
    directory made, a file created, written, chmod-ed, truncated, renamed, looked up,
    removed."""
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"p" * 9000)
    f.chmod(0o600)
    os.truncate(f, 10)
    f.rename(d / "g")
    os.stat(d / "g")
    (d / "g").unlink()
    d.rmdir()


class CampaignTrial(driver.Trial):
    """A driver trial that makes the fault's target exist (clean pages: a sync first),
    refuses a fault the kernel would not arm (instead of waiting out the recovery
    timeout), makes the kernel reach the fault's site, calls a fault that its site's probe
    passed without activating a harness error at once (instead of after the recovery
    timeout), and runs fsck on the disk the machine leaves."""

    fsck: dict | None = None
    probe: "Probe | None" = None

    def inject(self) -> dict:
        self.probe = None  # an earlier fault's, on this machine
        if self.spec.fault_args.get("target") == "clean-page":
            # a short trial's file pages are all dirty: write them back, so clean ones exist
            self.host.control(self.scheme.active, {"cmd": "sync"}, timeout=60.0)
        reply = super().inject()
        if not reply.get("ok"):
            raise driver.DriverError(
                f"{self.spec.id}: the kernel refused the fault: {reply.get('error', reply)}"
            )
        self.reach(reply["site"])
        return reply

    def reach(self, site: str) -> None:
        """Make the kernel reach the armed fault's site soon, where the workload alone
        may not: a create (the clients create their files only at first) or a write-back
        (the flusher waits for pages dirty longer than DIRTY_EXPIRE_S; a file's data blocks
        are allocated there, so a block allocation's site too). From a thread that
        may block in the dying kernel until the scheme (or teardown) ends its connection."""
        if site in REQUEST_SITES:
            probe = Path(self.svc.mount) / f".campaign-probe-{self.spec.trial}"

            def work():
                _every_request(probe)

        elif site in ("writeback", "fs.block-alloc"):  # write-back allocates data blocks

            def work():
                self.host.control(
                    self.scheme.active,
                    {"cmd": "sync"},
                    timeout=self.spec.timing["recovery_timeout_s"],
                )
        else:
            return

        self.probe = Probe(work, site)

    def observe(self, reply: dict) -> None:
        self.await_activation(reply)
        super().observe(reply)

    def await_activation(self, reply: dict) -> None:
        """Until the fault activates (the kernel's mailbox says so, or the kernel is gone)
        or the probe that reaches its site has ended. A probe that ended (done, or refused
        by the kernel: a corrupted file system answers EUCLEAN) while the kernel, still
        answering, holds the fault armed: the fault did not activate, and waiting out the
        recovery timeout would only say so later (DriverError)."""
        probe, part = self.probe, self.scheme.active
        if probe is None:
            return
        deadline = time.monotonic() + self.spec.timing["recovery_timeout_s"]
        while not self.activated(part, reply) and probe.is_alive():
            if time.monotonic() > deadline:
                return  # the scheme's own timeout decides
            time.sleep(ACTIVATION_POLL_S)
        if self.activated(part, reply):
            return
        try:
            armed = self.host.control(part, {"cmd": "status"}, timeout=STATUS_TIMEOUT_S)["armed"]
        except Exception:  # noqa: BLE001 - no answer: the kernel failed after all
            return
        if armed and not self.activated(part, reply):
            raise driver.DriverError(
                f"{self.spec.id}: the fault did not activate: a probe reaching site "
                f"{probe.site} ended after {probe.took_s:.2f} s"
                f"{f' ({probe.error})' if probe.error else ''} and the kernel, still "
                "answering, holds the fault armed"
            )

    def post_load_from(self, took_effect: float) -> float:
        """The post-recovery load counts from when the last client was answered again (its
        own record), not from when the scheme's report came: orthros writes its report
        once every adopted page is checked, while the clients are served already. When
        the clients' records do not say, from now."""
        back = self.clients.back_at(took_effect)
        return time.monotonic() if back is None else min(back, time.monotonic())

    def activated(self, part: int, reply: dict) -> bool:
        """The fault took effect: its activation is in the kernel's mailbox, or the kernel
        process is gone."""
        kp = self.host.kernels.get(part)
        if kp is None or not kp.alive():
            return True
        return self.host.mail(part).activated_ns >= reply.get("injected_ns", 0) > 0

    def examine(self) -> None:
        from kernel.tools.fsck import fsck

        img = self.host.disk_image()
        if img.exists():
            r = fsck(str(img))
            self.fsck = {
                "exit_code": r.exit_code,
                "problems": r.problems[:10],
                "problems_not_kept": max(0, len(r.problems) - 10),
            }


class Probe(threading.Thread):
    """Work that makes the kernel reach a fault's site, in a thread of its own (it may block
    in the dying kernel until the scheme, or teardown, ends its connection)."""

    def __init__(self, work, site: str):
        super().__init__(daemon=True, name=f"reach-{site}")
        self.work, self.site = work, site
        self.error, self.took_s = "", 0.0
        self.start()

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            self.work()
        except Exception as e:  # noqa: BLE001 - the kernel may die under it: the fault
            self.error = f"{type(e).__name__}: {e}"
        self.took_s = time.monotonic() - t0


def scratch_dir(campaign_id: str) -> Path:
    """Where this machine's trials of a campaign make their work directories."""
    return Path(tempfile.gettempdir()) / f"{prepared.CAMPAIGN_PREFIX}{campaign_id}"


def run_fault(fault: FaultSpec, params: dict, out: Path) -> dict:
    """Run one fault in this process; its result."""
    spec = driver.TrialSpec(
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
    holder: dict = {}

    class _Trial(CampaignTrial):
        data_store, data_seed = data_of(params, fault)

        def examine(self) -> None:
            super().examine()
            holder["fsck"] = self.fsck

    t0 = time.monotonic()
    rec = driver.run_one(spec, out, kind=_Trial)
    return result_of(fault, rec, holder.get("fsck"), time.monotonic() - t0)


def data_of(params: dict, fault: FaultSpec) -> tuple[Path | None, int]:
    """(where the campaign's prepared data set is kept on this machine, its seed)."""
    store = params.get("data_store")
    return (Path(store) if store else None), params.get("data_seed", fault.seed)


def result_of(fault: FaultSpec, rec: dict, fsck: dict | None, wall_s: float) -> dict:
    cls, why = outcome.classify(rec, fsck)
    return {
        **fault.to_dict(),
        "outcome": cls,
        "why": why,
        "rejected": outcome.rejected_of(rec),
        "downtime_s": rec.get("downtime_s"),
        "outage_s": rec.get("outage_s"),
        "detected_by": rec.get("detected_by"),
        "acked_writes": rec.get("acked_writes"),
        "lost_writes": rec.get("lost_writes"),
        "lost_bytes": rec.get("lost_bytes"),
        "corrupted_writes": rec.get("corrupted_writes"),
        "unverified_keys": rec.get("unverified_keys"),
        "cache": rec.get("cache") or {},
        "fsck": fsck,
        "checks": rec.get("checks"),
        "phases": {p["name"]: p["seconds"] for p in rec.get("driver_phases", [])},
        "wall_s": wall_s,
        "finished": time.time(),
        "worker": f"{socket.gethostname()}:{os.getppid()}",
        "error": rec.get("error"),
        **({"evidence": rec["evidence"]} if rec.get("evidence") else {}),
    }


def error_result(fault: FaultSpec, why: str, wall_s: float = 0.0) -> dict:
    return {
        **fault.to_dict(),
        "outcome": "harness-error",
        "why": why,
        "rejected": {"pages": 0, "metadata_blocks": 0, "reasons": [], "reasons_not_kept": 0},
        "downtime_s": None,
        "outage_s": None,
        "detected_by": None,
        "acked_writes": None,
        "lost_writes": None,
        "lost_bytes": None,
        "corrupted_writes": None,
        "unverified_keys": None,
        "cache": {},
        "fsck": None,
        "checks": None,
        "phases": {},
        "wall_s": wall_s,
        "finished": time.time(),
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "error": why,
    }


def iter_batch(faults: list[dict], params: dict) -> Iterator[dict]:
    """The results of a batch of faults (one scheme, in order) from a trial process of its
    own, each as it completes; a fault the process did not finish gets a harness error."""
    fs = [FaultSpec(**f) for f in faults]
    scratch = scratch_dir(params["campaign_id"])
    scratch.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch, 0o755)  # servers on a trial's mount run as other users
    prepared.stamp(scratch, os.getpid())  # a killed worker's directory is an orphan
    work = Path(tempfile.mkdtemp(prefix=f"fault-{fs[0].index}-", dir=scratch))
    os.chmod(work, 0o755)
    results = work / "results.jsonl"
    limit = trial_limit_s(params["timing"]) * len(fs)
    t0 = time.monotonic()
    proc, seen, done, why = None, 0, set(), None
    try:
        with open(work / "task.log", "wb") as log:
            prefix = container.argv(params, work) if params.get("image") else []
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "harness.campaign.task", str(results)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=work,
                env={**os.environ, "TMPDIR": str(work)},
            )
        prepared.stamp(scratch, proc.pid)  # it may outlive this process a little
        if not params.get("image"):  # a container sees only its work directory
            params = {**params, "data_store": str(scratch)}
        proc.stdin.write(json.dumps({"faults": faults, "params": params}).encode())
        proc.stdin.close()
        while True:
            rc = proc.poll()
            for res in _new_lines(results, seen):
                seen += 1
                done.add(res["id"])
                yield res
            if rc is not None:
                break
            if time.monotonic() - t0 > limit:
                rc = _stop(proc)
                why = f"the trial process took longer than {limit:.0f} s and was stopped"
                break
            time.sleep(RESULT_POLL_S)
        if rc is not None and len(done) < len(fs):
            tail = (work / "task.log").read_text(errors="replace").strip().splitlines()
            why = why or f"the trial process exited {rc}: {tail[-1] if tail else ''}"
            for f in fs:
                if f.id not in done:
                    yield error_result(f, why, time.monotonic() - t0)
    finally:
        if proc is not None and proc.poll() is None:
            _stop(proc)  # stopped from outside (Ctrl-C): its teardown first
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _new_lines(path: Path, seen: int) -> list[dict]:
    """Complete lines past the first ``seen`` (the trial process writes one per fault)."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]  # the last, unfinished, is not yet a result
    return [json.loads(x) for x in lines[seen:]]


def run_batch(faults: list[dict], params: dict) -> list[dict]:
    """What a Dask task runs: the batch's results, each also put on the campaign's queue
    as it completes, so a result outlives a worker that dies later in the batch."""
    from distributed import Queue

    q = Queue(params["queue"]) if params.get("queue") else None
    out = []
    for res in iter_batch(faults, params):
        if q is not None:
            q.put(res)
        out.append(res)
    return out


def trial_limit_s(timing: dict) -> float:
    """Beyond this a trial process is stuck: every phase's own bound, and slack."""
    return (
        2 * timing["ready_timeout_s"]
        + timing["warmup_s"]
        + timing["steady_s"]
        + 2 * timing["recovery_timeout_s"]
        + timing["post_s"]
        + 180
    )


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _watch_parent() -> None:
    """A trial whose starter died (a killed worker) stops through its teardown."""
    ppid = os.getppid()

    def watch():
        while os.getppid() == ppid:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _stopped(signum, frame):
    from harness.commands.run import Stopped

    raise Stopped(signal.Signals(signum).name)


def main() -> int:
    signal.signal(signal.SIGTERM, _stopped)
    _watch_parent()
    req = json.loads(sys.stdin.read())
    faults, params = [FaultSpec(**f) for f in req["faults"]], req["params"]
    path = Path(sys.argv[1])
    out = path.parent / "out"
    out.mkdir(exist_ok=True)

    def emit(res: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(res) + "\n")

    every = params.get("redeploy_every", 1)
    if every <= 1:
        for f in faults:
            emit(run_fault(f, params, out))
    else:
        from harness.campaign.session import Session

        Session(faults[0], params, out).serve(faults, every, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
