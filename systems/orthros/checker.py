"""A second page checker: the dead partition's CPU checks pages beside the backup kernel.

Promises to the Orthros backup kernel (systems/orthros/backup.py): ``Checker.start(physmem)``
launches, while the backup is in standby, a helper process that maps the machine's memory
(page tables filled in advance), and returns once it waits for work. ``check(lay, frames, cpus)`` moves the helper
onto ``cpus`` — the dead kernel's CPUs, idle once it is fenced — and shares with it the
work of kernel/memreader.check_pages: the frames are cut into jobs that both take from one
pipe, so whoever is faster does more. It returns exactly what check_pages would; a job the
helper does not answer (it died) is checked here. The backup uses it for the adopted pages
it checks after first service, and for the few it must check during the takeover. ``close()`` ends the helper; so does the backup's death
(the job pipe reaches end of file).

Run as ``python -m systems.orthros.checker --physmem PATH --jobs FD --results FD`` with
the job pipe's read end and the result pipe's write end.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import struct
import subprocess
import sys

import numpy as np

from kernel.core.memreader import check_pages
from kernel.hw.physmem import PartLayout, PhysMem

JOB_PAGES = 256  # frames per job: a job is one atomic pipe write
_JOB = struct.Struct("<IIQQQ")  # job id, frame count, descriptor area, frame area, nframes
_RES = struct.Struct("<II")  # job id, frame count; then desc_ok and ok, a byte each
_PIPE_BYTES = 1 << 20  # room for every job and result at once (F_SETPIPE_SZ)
MADV_POPULATE_READ = 22
_READY = b"R"
READY_TIMEOUT_S = 30.0


class _Area:
    """The two fields of a PartLayout that check_pages reads."""

    def __init__(self, desc: int, frames: int, nframes: int):
        self.desc, self.frames, self.nframes = desc, frames, nframes


class Checker:
    def __init__(self, proc: subprocess.Popen, jobs_r: int, jobs_w: int, res_r: int, room: int):
        self.proc, self.jobs_r, self.jobs_w, self.res_r = proc, jobs_r, jobs_w, res_r
        self.room = room  # bytes either pipe takes without a reader

    @classmethod
    def start(cls, physmem: str) -> "Checker":
        jobs_r, jobs_w = os.pipe()
        res_r, res_w = os.pipe()
        room = []
        for fd in (jobs_w, res_w):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass
            room.append(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
        os.set_blocking(jobs_r, False)  # both ends read it; neither may block on an empty pipe
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "systems.orthros.checker",
                "--physmem",
                physmem,
                "--jobs",
                str(jobs_r),
                "--results",
                str(res_w),
            ],
            pass_fds=(jobs_r, res_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(res_w)
        c = cls(proc, jobs_r, jobs_w, res_r, min(room))
        c._wait_ready()
        return c

    def _wait_ready(self) -> None:
        """Standby is only ready once the helper is: its start (imports, filling its page
        tables) takes the host's memory locks, which must not stall the active kernel later."""
        if (
            not select.select([self.res_r], [], [], READY_TIMEOUT_S)[0]
            or os.read(self.res_r, 1) != _READY
        ):
            self.close()
            raise RuntimeError("the second page checker did not start")

    def check(
        self, mem: PhysMem, lay: PartLayout, frames: np.ndarray, cpus: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        frames = np.asarray(frames, np.int64)
        njobs = -(-len(frames) // JOB_PAGES)
        if (
            len(frames) < 2 * JOB_PAGES
            or self.proc.poll() is not None
            or njobs * (_JOB.size + JOB_PAGES * 8) > self.room
        ):  # queued at once, never waited for
            return check_pages(mem, lay, frames)
        try:
            os.sched_setaffinity(self.proc.pid, cpus)
        except OSError:
            pass  # it still helps from where it is
        jobs = {
            i: frames[lo : lo + JOB_PAGES] for i, lo in enumerate(range(0, len(frames), JOB_PAGES))
        }
        for i, fr in jobs.items():
            os.write(
                self.jobs_w, _JOB.pack(i, len(fr), lay.desc, lay.frames, lay.nframes) + fr.tobytes()
            )
        desc_ok = np.zeros(len(frames), bool)
        ok = np.zeros(len(frames), bool)

        def put(i: int, d: np.ndarray, o: np.ndarray) -> None:
            lo = i * JOB_PAGES
            desc_ok[lo : lo + len(d)], ok[lo : lo + len(o)] = d, o
            del jobs[i]

        while (job := _take(self.jobs_r)) not in (None, _EOF):  # our share
            i, fr, area = job
            put(i, *check_pages(mem, area, fr))
        while jobs:  # the helper's
            res = _result(self.res_r)
            if res is None:  # it died: do its jobs here
                for i, fr in list(jobs.items()):
                    put(i, *check_pages(mem, lay, fr))
                break
            put(*res)
        return desc_ok, ok

    def close(self) -> None:
        """End the helper (it sees end of file on its job pipe) and reap it."""
        for fd in (self.jobs_w, self.jobs_r, self.res_r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_EOF = "end of file"


def _take(fd: int):
    """One job from the shared pipe; None when it is empty (never blocks), _EOF when the
    backup is gone."""
    try:
        msg = os.read(fd, _JOB.size + JOB_PAGES * 8)
    except BlockingIOError:
        return None
    if not msg:
        return _EOF
    i, n, desc, frames, nframes = _JOB.unpack_from(msg)
    return i, np.frombuffer(msg, np.int64, n, _JOB.size), _Area(desc, frames, nframes)


def _result(fd: int):
    head = _read_exactly(fd, _RES.size)
    if head is None:
        return None
    i, n = _RES.unpack(head)
    body = _read_exactly(fd, 2 * n)
    if body is None:
        return None
    flags = np.frombuffer(body, np.bool_)
    return i, flags[:n], flags[n:]


def _read_exactly(fd: int, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def serve(physmem: str, jobs: int, results: int) -> None:
    """The helper: wait for jobs, check them, answer; exit at end of file."""
    mem = PhysMem(physmem, readonly=True)
    try:
        mem.mm.madvise(MADV_POPULATE_READ)
    except OSError:
        pass
    os.write(results, _READY)
    while True:
        select.select([jobs], [], [])
        job = _take(jobs)
        if job is None:
            continue  # the backup took it first
        if job is _EOF:
            return
        i, fr, area = job
        d, o = check_pages(mem, area, fr)
        os.write(results, _RES.pack(i, len(fr)) + d.tobytes() + o.tobytes())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m systems.orthros.checker", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--physmem", required=True)
    ap.add_argument("--jobs", type=int, required=True, help="fd: the job pipe's read end")
    ap.add_argument("--results", type=int, required=True, help="fd: the result pipe's write end")
    a = ap.parse_args(argv)
    serve(a.physmem, a.jobs, a.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
