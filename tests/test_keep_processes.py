"""Orthros keeping processes: unmodified applications run on across a failover, same pid."""

import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.testbed import Testbed
from systems.base import check_report
from systems.orthros import Orthros

pytestmark = [pytest.mark.root]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wsgidav(mount: str, port: int, log: str) -> dict:
    dav = str(Path(sys.executable).with_name("wsgidav"))
    argv = [dav, "--host", "127.0.0.1", "--port", str(port), "--root", mount]
    argv += ["--auth", "anonymous", "--no-config", "-q"]
    return {"name": "wsgidav", "argv": argv, "cwd": "/", "log": log}


def holder(path: str) -> dict:
    """An app that holds a file of the mount open and sleeps."""
    code = "import sys, time; f = open(sys.argv[1], 'rb'); time.sleep(600)"
    return {"name": "holder", "argv": [sys.executable, "-c", code, path], "cwd": "/"}


def http(method: str, url: str, data: bytes | None = None, timeout: float = 20.0) -> bytes:
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            http("GET", url, timeout=2)
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def pid_of(host, s, name: str) -> int:
    """The pid of the active kernel's process ``name``, from its control socket."""
    reply = host.control(s.active, {"cmd": "status"})
    return next(p["pid"] for p in reply["processes"] if p["name"] == name)


def crash(host, s, fault, **kw):
    reply = host.control(s.active, {"cmd": "inject", "fault": fault, **kw})
    assert reply["ok"], reply
    return check_report(s.on_crash(reply, timeout=30))


@pytest.fixture
def kept():
    with Testbed(kind="test", delay=False) as bed:
        port = free_port()
        s = Orthros(keep_processes=True)
        mnt = str(bed.host.mountpoint(0))
        bed.deploy(s, [wsgidav(mnt, port, os.path.join(bed.workdir, "wsgidav.log"))])
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/")
        yield bed, s, url


def dav_pid(s, port_url: str) -> int:
    port = port_url.rsplit(":", 1)[1]
    out = os.popen(f"ss -Htlnp 'sport = :{port}'").read()
    return int(out.split("pid=")[1].split(",")[0])


@pytest.mark.parametrize("fault", ["panic", "kill", "hang"])
def test_webdav_server_keeps_its_pid_across_a_crash(kept, fault):
    bed, s, url = kept
    http("PUT", url + "/before.txt", b"written before")
    pid = dav_pid(s, url)
    r = crash(bed.host, s, fault)
    assert r.recovered
    assert [(p.name, p.pid, p.fate) for p in r.processes] == [("wsgidav", pid, "preserved")]
    assert r.process_counts() == {"preserved": 1, "restarted": 0, "lost": 0}
    assert http("GET", url + "/before.txt") == b"written before"
    http("PUT", url + "/after.txt", b"written after")
    assert dav_pid(s, url) == pid
    assert (Path(s.mount) / "after.txt").read_bytes() == b"written after"
