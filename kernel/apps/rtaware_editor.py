"""A runtime-aware "editor": its unsaved buffer lives in its state segment (kernel/core/rtaware.py).

Promises to the tests and to the ``editor`` workload: ``python -m kernel.apps.rtaware_editor
--fifo PATH`` makes the FIFO (if absent) and reads lines from it. Every line is appended
to the buffer, which is then saved to the state segment; only then the editor prints
``saved seq=<n> lines=<count> digest=<xxh3-64 hex of the buffer>`` (flushed), so a line is
acknowledged exactly when it survives a crash of the editor. SIGUSR1 appends the line
``signal <k>`` the same way. At start it loads its state and prints ``loaded seq=<n>
lines=<count> digest=<hex>`` (``seq=0 lines=0`` when there was none), so a resurrected
editor visibly continues with the buffer it had. Commands: a line ``:w PATH`` writes the
buffer to a file (fsync'd), ``:q`` quits. SIGTERM quits. Without a state segment (not
launched as runtime-aware) it still runs, and says so; nothing then survives.
``--crash-save PATH`` registers a crash procedure (kernel/core/rtaware.py ``on_crash``):
when a kernel that resurrected the editor calls it, the editor first writes its buffer to
PATH (fsync'd) and prints ``crash procedure: wrote PATH lines=<count>
digest=<hex>``, then goes on with the same buffer.

The buffer is the lines joined by "\\n" (each line ends with "\\n"), UTF-8.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import stat
import sys

import xxhash

from kernel.core import rtaware


def digest(buf: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(buf)


def encode(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def decode(buf: bytes) -> list[str]:
    return buf.decode(errors="replace").splitlines()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kernel.apps.rtaware_editor", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--fifo", required=True, help="read lines from this FIFO (made if absent)")
    ap.add_argument("--crash-save", help="crash procedure: write the buffer to this file")
    a = ap.parse_args(argv)
    out = sys.stdout

    def say(msg: str) -> None:
        out.write(msg + "\n")
        out.flush()

    seg = rtaware.StateSegment.from_env()
    if seg is None:
        say("warning: no state segment (not launched as runtime-aware): nothing survives a crash")
    lines: list[str] = []
    seq = 0
    if seg is not None:
        buf = seg.load()
        for e in seg.last_scan.rejected:
            say(f"rejected: {e}")
        if buf is not None:
            lines, seq = decode(buf), seg.last_scan.seq
    # The FIFO exists before the "loaded" line: a writer that waits for it may open it at once.
    if not os.path.exists(a.fifo):
        os.mkfifo(a.fifo, 0o622)
    elif not stat.S_ISFIFO(os.stat(a.fifo).st_mode):
        say(f"error: {a.fifo} exists and is not a FIFO")
        return 2
    say(f"loaded seq={seq} lines={len(lines)} digest={digest(encode(lines))}")

    def commit(line: str) -> None:
        nonlocal seq
        new = lines + [line]
        buf = encode(new)
        if seg is not None:
            if len(buf) > seg.capacity:
                say(f"error: buffer full ({len(buf)} > {seg.capacity} bytes): line refused")
                return
            seq = seg.save(buf)
        else:
            seq += 1
        lines.append(line)
        say(f"saved seq={seq} lines={len(lines)} digest={digest(buf)}")

    fd = os.open(a.fifo, os.O_RDWR | os.O_NONBLOCK)  # RDWR: no EOF when writers go
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    pending = {"usr1": 0, "term": False, "crash": False}
    signal.signal(signal.SIGUSR1, lambda *_: pending.__setitem__("usr1", pending["usr1"] + 1))
    if a.crash_save:
        rtaware.on_crash(lambda: pending.__setitem__("crash", True))

    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(encode(lines))
            f.flush()
            os.fsync(f.fileno())

    signal.signal(signal.SIGTERM, lambda *_: pending.__setitem__("term", True))
    nsig = 0
    partial = b""
    while True:
        try:
            ready, _, _ = select.select([fd, wake_r], [], [])
        except InterruptedError:
            ready = []
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
        if pending["crash"]:  # before anything else it was asked to do
            pending["crash"] = False
            write(a.crash_save)
            say(
                f"crash procedure: wrote {a.crash_save} lines={len(lines)} "
                f"digest={digest(encode(lines))}"
            )
        while pending["usr1"]:
            pending["usr1"] -= 1
            nsig += 1
            commit(f"signal {nsig}")
        if pending["term"]:
            return 0
        if fd in ready:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = b""
            partial += chunk
            *complete, partial = partial.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                if line == ":q":
                    return 0
                if line.startswith(":w "):
                    path = line[3:].strip()
                    write(path)
                    say(f"wrote {path} lines={len(lines)}")
                    continue
                commit(line)


if __name__ == "__main__":
    sys.exit(main())
