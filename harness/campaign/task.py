"""One fault of a campaign: a driver trial in a process of its own, and its result.

Promises to the executors (executor.py): ``run_task(fault, params)`` runs the fault's
trial through the driver's ``run_one`` (harness/driver.py) in a fresh Python process
(``python -m harness.campaign.task``), so that what one trial leaves in an interpreter
never reaches the next, and returns its result — a dict of ``store.FAULT_SCHEMA`` — or one
of outcome ``harness-error`` when the process failed. Every trial's work directory is made
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
from pathlib import Path

from harness import driver
from harness.campaign import outcome
from harness.campaign.plan import FaultSpec

PARENT_POLL_S = 0.2        # how often a trial process looks whether its starter still lives
KILL_GRACE_S = 60.0        # a trial process asked to stop gets this long for its teardown


class CampaignTrial(driver.Trial):
    """A driver trial that refuses a fault the kernel would not arm (instead of waiting
    out the recovery timeout) and runs fsck on the disk the machine leaves."""
    fsck: dict | None = None

    def inject(self) -> dict:
        reply = super().inject()
        if not reply.get("ok"):
            raise driver.DriverError(f"{self.spec.id}: the kernel refused the fault: "
                                     f"{reply.get('error', reply)}")
        return reply

    def examine(self) -> None:
        from kernel.fsck import fsck
        img = self.host.disk_image()
        if img.exists():
            r = fsck(str(img))
            self.fsck = {"exit_code": r.exit_code, "problems": r.problems[:10],
                         "problems_not_kept": max(0, len(r.problems) - 10)}


def scratch_dir(campaign_id: str) -> Path:
    """Where this machine's trials of a campaign make their work directories."""
    return Path(tempfile.gettempdir()) / f"crashbench-campaign-{campaign_id}"


def run_fault(fault: FaultSpec, params: dict, out: Path) -> dict:
    """Run one fault in this process; its result."""
    spec = driver.TrialSpec(fault.scheme, params["workload"], fault.kind, fault.index,
                            fault.seed, dict(params["timing"]), dict(params["workload_params"]),
                            params.get("machine_file"), fault_args=fault.fault_args())
    holder: dict = {}

    class _Trial(CampaignTrial):
        def examine(self) -> None:
            super().examine()
            holder["fsck"] = self.fsck

    t0 = time.monotonic()
    rec = driver.run_one(spec, out, trial_cls=_Trial)
    return result_of(fault, rec, holder.get("fsck"), time.monotonic() - t0)


def result_of(fault: FaultSpec, rec: dict, fsck: dict | None, wall_s: float) -> dict:
    cls, why = outcome.classify(rec, fsck)
    return {**fault.to_dict(), "outcome": cls, "why": why,
            "rejected": outcome.rejected_of(rec),
            "downtime_s": rec.get("downtime_s"), "outage_s": rec.get("outage_s"),
            "detected_by": rec.get("detected_by"), "acked_writes": rec.get("acked_writes"),
            "lost_writes": rec.get("lost_writes"), "lost_bytes": rec.get("lost_bytes"),
            "corrupted_writes": rec.get("corrupted_writes"),
            "cache": rec.get("cache") or {}, "fsck": fsck,
            "phases": {p["name"]: p["seconds"] for p in rec.get("driver_phases", [])},
            "wall_s": wall_s, "finished": time.time(),
            "worker": f"{socket.gethostname()}:{os.getppid()}", "error": rec.get("error")}


def error_result(fault: FaultSpec, why: str, wall_s: float = 0.0) -> dict:
    return {**fault.to_dict(), "outcome": "harness-error", "why": why,
            "rejected": {"pages": 0, "metadata_blocks": 0, "reasons": [], "reasons_not_kept": 0},
            "downtime_s": None, "outage_s": None, "detected_by": None, "acked_writes": None,
            "lost_writes": None, "lost_bytes": None, "corrupted_writes": None, "cache": {},
            "fsck": None, "phases": {}, "wall_s": wall_s, "finished": time.time(),
            "worker": f"{socket.gethostname()}:{os.getpid()}", "error": why}


def run_task(fault: dict, params: dict) -> dict:
    """A fault's result from a trial process of its own (what a Dask task runs)."""
    f = FaultSpec(**fault)
    scratch = scratch_dir(params["campaign_id"])
    scratch.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch, 0o755)         # servers on a trial's mount run as other users
    work = Path(tempfile.mkdtemp(prefix=f"fault-{f.index}-", dir=scratch))
    os.chmod(work, 0o755)
    result = work / "result.json"
    limit = trial_limit_s(params["timing"])
    t0 = time.monotonic()
    try:
        with open(work / "task.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "harness.campaign.task", str(result)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=log, cwd=work, env={**os.environ, "TMPDIR": str(work)})
        proc.stdin.write(json.dumps({"fault": fault, "params": params}).encode())
        proc.stdin.close()
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            rc = _stop(proc)
            return error_result(f, f"the trial took longer than {limit:.0f} s and was stopped",
                                time.monotonic() - t0)
        if rc != 0 or not result.exists():
            tail = (work / "task.log").read_text(errors="replace")[-400:].strip()
            return error_result(f, f"the trial process exited {rc}: {tail.splitlines()[-1] if tail else ''}",
                                time.monotonic() - t0)
        return json.loads(result.read_text())
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def trial_limit_s(timing: dict) -> float:
    """Beyond this a trial process is stuck: every phase's own bound, and slack."""
    return (2 * timing["ready_timeout_s"] + timing["warmup_s"] + timing["steady_s"]
            + 2 * timing["recovery_timeout_s"] + timing["post_s"] + 180)


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
    f, params = FaultSpec(**req["fault"]), req["params"]
    out = Path(sys.argv[1]).parent / "out"
    out.mkdir(exist_ok=True)
    res = run_fault(f, params, out)
    from harness.results import write_atomic
    write_atomic(Path(sys.argv[1]), json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
