"""Workload `files`: a WebDAV file server on the emulated file system, and its users.

Promises to the driver: the server is WsgiDAV, unmodified, run as an application of the
active partition with its root at the mount and listening on the service address; the
clients (harness/workloads/files_client.py) are separate processes in the client
namespace. Nothing of the server fsyncs, so what an acknowledged PUT leaves behind sits in
the page cache as dirty pages: exactly what a crash puts at risk. The verify phase reads
back every file any client wrote.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from harness.workloads import Service, Workload, WorkloadError
from harness.workloads.clients import ClientGroup, run_to_end, spawn

CLIENT = "harness.workloads.files_client"


class Files(Workload):
    name = "files"
    description = "WsgiDAV file server; clients create, overwrite, append to and read files"
    defaults = {"clients": 4, "files_per_client": 16, "max_kib": 256, "read_ratio": 0.5,
                "port": 8080, "connect_timeout_s": 0.2, "read_timeout_s": 2.0,
                "max_ops_per_client": 100_000}

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise WorkloadError(f"files: unknown parameter(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(self.defaults)}")
        self.p = {**self.defaults, **params}

    def url(self, svc: Service) -> str:
        return f"http://{svc.ip}:{self.p['port']}"

    def prepare(self, svc: Service) -> None:
        pass

    def apps(self, svc: Service) -> list[dict]:
        dav = str(Path(sys.executable).with_name("wsgidav"))
        return [{"name": "wsgidav",
                 "argv": [dav, "--host", svc.ip, "--port", str(self.p["port"]),
                          "--root", svc.mount, "--auth", "anonymous", "--no-config", "-q"],
                 "cwd": "/", "log": str(svc.workdir / "logs" / "wsgidav.log")}]

    def wait_ready(self, svc: Service, timeout: float) -> None:
        argv = ["-m", CLIENT, "ready", "--url", self.url(svc),
                "--until", str(time.monotonic() + timeout)]
        rc = run_to_end(argv, svc.workdir / "logs" / "files-ready.log", svc.client_enter,
                        timeout + 5)
        if rc != 0:
            raise WorkloadError(f"files: the WebDAV server at {self.url(svc)} did not answer "
                                f"within {timeout:.0f} s; see logs/wsgidav.log")

    def _client_argv(self, svc: Service, mode: str, cid: int, until: float, history: Path) -> list[str]:
        p = self.p
        return ["-m", CLIENT, mode, "--url", self.url(svc), "--until", repr(until),
                "--history", str(history), "--id", str(cid), "--seed", str(svc.seed),
                "--files", str(p["files_per_client"]), "--max-kib", str(p["max_kib"]),
                "--read-ratio", str(p["read_ratio"]), "--max-ops", str(p["max_ops_per_client"]),
                "--connect-timeout", str(p["connect_timeout_s"]),
                "--read-timeout", str(p["read_timeout_s"])]

    def start_clients(self, svc: Service, until: float) -> ClientGroup:
        hd = svc.history_dir()
        procs, paths = [], []
        for cid in range(self.p["clients"]):
            h = hd / f"client-{cid}.jsonl"
            procs.append(spawn(self._client_argv(svc, "client", cid, until, h),
                               svc.workdir / "logs" / f"client-{cid}.log", svc.client_enter))
            paths.append(h)
        return ClientGroup(procs, paths)

    shares_machine = True

    def forget(self, svc: Service, events: list[dict]) -> None:
        """Remove every file the clients wrote (its key is its path under the mount): the
        next clients create their files afresh, so a lost write reads as absent or older."""
        root = Path(svc.mount)
        for key in sorted({e["key"] for e in events if e["f"] == "write" and e["type"] == "invoke"}):
            (root / key).unlink(missing_ok=True)

    def verify(self, svc: Service, events: list[dict], timeout: float = 30.0) -> Path | None:
        keys = sorted({e["key"] for e in events if e["f"] == "write" and e["type"] == "invoke"})
        if not keys:
            return None
        kf = svc.workdir / "verify-keys.json"
        kf.write_text(json.dumps(keys))
        h = svc.history_dir() / "verify.jsonl"
        argv = self._client_argv(svc, "verify", self.p["clients"], time.monotonic() + timeout, h)
        run_to_end([*argv, "--keys", str(kf)], svc.workdir / "logs" / "verify.log",
                   svc.client_enter, timeout + 10)
        return h
