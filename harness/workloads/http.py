"""Workload `http`: nginx serving a tree of static files from the emulated file system, and
locust users fetching them.

Promises to the driver (harness/workloads/__init__.py):

* ``prepare`` (``prepares = True``: on a kernel booted only for it) writes ``<mount>/www``:
  files of a web-like size mix (harness/workloads/tree.py) until ``total_mib`` is reached — by default more than the
  backup partition's own 128 MiB, so a scheme that keeps the cache has more to keep than
  the backup's memory would hold. Content is a pure function of (seed, file number); the
  manifest (path, bytes, sha256 of every file) is kept in the trial's scratch directory.
* ``apps`` is the machine's nginx, unmodified, with a configuration this module renders
  (no daemon, one worker, no access log, no open-file cache; pid file, temp paths and
  error log in the trial's scratch directory, which teardown removes) listening on the
  service address, in its own PID namespace (``unshare --pid --fork``): the master is
  the namespace's init, so its workers die with it however the master dies (a scheme
  that only kills the kernel's process group would otherwise leave a worker serving).
* ``wait_ready`` waits for nginx to serve a file, then (``warm = 1``) reads the whole tree
  once through nginx, so the crash finds the working set in the file cache.
* clients (harness/workloads/http_client.py): one locust process in the client namespace,
  ``users`` FastHttpUsers with explicit connect and network timeouts, in a closed loop
  (``loop = "closed"``, the default: each user sends its next request as soon as the last
  is answered, so together they saturate the server) or at constant pacing (``"paced"``:
  at most ``users / pacing_s`` requests per second), bounded in users, requests
  (``max_requests``) and time; a
  request listener records every request in the history. A read's invoke carries the
  digest of the file it asks for, its ``ok`` the digest of the body served, so
  harness/checkers/bodies.py can tell whether every served body was byte-identical.
* ``verify`` reads every file of the tree back through nginx the same way.
* ``cache_pages`` is the tree's size in pages: the driver's warm-up waits for the cache
  to hold it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from harness.binaries import nginx_bin
from harness.workloads import Service, Workload, WorkloadError, tree
from harness.workloads.clients import ClientGroup, run_to_end, spawn

CLIENT = "harness.workloads.http_client"
LOOPS = ("closed", "paced")


class Http(Workload):
    name = "http"
    description = "nginx serving static files from the emulated FS; locust users fetch them"
    prepares = True
    defaults = {
        "total_mib": 160,
        "users": 4,
        "loop": "closed",
        "pacing_s": 0.02,
        "port": 8080,
        "connect_timeout_s": 0.2,
        "network_timeout_s": 2.0,
        "max_requests": 200_000,
        "warm": 1,
    }

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise WorkloadError(
                f"http: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(self.defaults)}"
            )
        self.p = {**self.defaults, **params}
        for k in ("total_mib", "users", "port", "max_requests"):
            if not isinstance(self.p[k], int) or self.p[k] <= 0:
                raise WorkloadError(f"http: {k} must be a positive integer, got {self.p[k]!r}")
        for k in ("pacing_s", "connect_timeout_s", "network_timeout_s"):
            if not isinstance(self.p[k], (int, float)) or self.p[k] <= 0:
                raise WorkloadError(f"http: {k} must be a positive number, got {self.p[k]!r}")
        if self.p["loop"] not in LOOPS:
            raise WorkloadError(
                f"http: loop must be one of {', '.join(LOOPS)}, got {self.p['loop']!r}"
            )

    def url(self, svc: Service) -> str:
        return f"http://{svc.ip}:{self.p['port']}"

    def manifest(self, svc: Service) -> Path:
        return svc.data_dir / "http-manifest.json"

    def root(self, svc: Service) -> Path:
        return Path(svc.mount) / "www"

    # --- prepare: the tree of files -----------------------------------------------------
    def prepare(self, svc: Service) -> None:
        files = tree.write_tree(self.root(svc), svc.dataset_seed, self.p["total_mib"] << 20)
        self.manifest(svc).write_text(json.dumps(files))

    def prepared(self, svc: Service) -> list[Path]:
        return [self.manifest(svc)]

    def cache_pages(self, svc: Service) -> int:
        return tree.pages(json.loads(self.manifest(svc).read_text()))

    # --- the service ---------------------------------------------------------------------
    def run_dir(self, svc: Service) -> Path:
        return svc.workdir / "nginx"

    def apps(self, svc: Service) -> list[dict]:
        run = self.run_dir(svc)
        run.mkdir(exist_ok=True)
        logs = svc.workdir / "logs"
        logs.mkdir(exist_ok=True)
        conf = run / "nginx.conf"
        conf.write_text(
            render_conf(svc.ip, self.p["port"], self.root(svc), run, logs / "nginx-error.log")
        )
        # its own PID namespace: nginx's master is its init, so its workers die with it
        # (they have no parent-death signal of their own), whatever kills the master
        return [
            {
                "name": "nginx",
                "argv": [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--kill-child=SIGKILL",
                    "--",
                    nginx_bin(),
                    "-c",
                    str(conf),
                    "-p",
                    str(run),
                    "-e",
                    str(logs / "nginx-error.log"),
                ],
                "cwd": "/",
                "log": str(logs / "nginx.log"),
            }
        ]

    def _args(self, svc: Service, mode: str, until: float) -> list[str]:
        p = self.p
        return [
            "-m",
            CLIENT,
            mode,
            "--url",
            self.url(svc),
            "--until",
            repr(until),
            "--manifest",
            str(self.manifest(svc)),
            "--seed",
            str(svc.seed),
            "--users",
            str(p["users"]),
            "--loop",
            p["loop"],
            "--pacing",
            str(p["pacing_s"]),
            "--max-requests",
            str(p["max_requests"]),
            "--connect-timeout",
            str(p["connect_timeout_s"]),
            "--network-timeout",
            str(p["network_timeout_s"]),
        ]

    def _run(self, svc: Service, mode: str, timeout: float, log: str, extra=()) -> int:
        return run_to_end(
            [*self._args(svc, mode, time.monotonic() + timeout), *extra],
            svc.workdir / "logs" / log,
            svc.client_enter,
            timeout + 10,
        )

    def wait_ready(self, svc: Service, timeout: float) -> None:
        if self._run(svc, "ready", timeout, "http-ready.log") != 0:
            raise WorkloadError(
                f"http: nginx at {self.url(svc)} did not serve a file within "
                f"{timeout:.0f} s; see logs/nginx-error.log"
            )
        if self.p["warm"] and self._run(svc, "warm", 120.0, "http-warm.log") != 0:
            raise WorkloadError(
                "http: reading the tree once through nginx failed; see logs/http-warm.log"
            )

    def start_clients(self, svc: Service, until: float) -> ClientGroup:
        h = svc.history_dir() / "locust.jsonl"
        p = spawn(
            [*self._args(svc, "load", until), "--history", str(h)],
            svc.workdir / "logs" / "locust.log",
            svc.client_enter,
        )
        return ClientGroup([p], [h])

    def verify(self, svc: Service, events: list[dict], timeout: float = 120.0) -> Path | None:
        h = svc.history_dir() / "verify.jsonl"
        self._run(svc, "verify", timeout, "verify.log", ["--history", str(h)])
        return h

    def checks(self, svc: Service, events: list[dict]) -> dict:
        from harness.checkers.bodies import bodies

        return {"bodies": bodies(events)}


def render_conf(ip: str, port: int, root: Path, run: Path, error_log: Path) -> str:
    temps = "\n".join(
        f"    {k}_temp_path {run / k};"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# rendered by crashbench (harness/workloads/http.py)
daemon off;
master_process on;
worker_processes 1;
user www-data www-data;
pid {run / "nginx.pid"};
error_log {error_log} warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    open_file_cache off;
    keepalive_requests 1000000;
{temps}
    server {{
        listen {ip}:{port};
        root {root};
    }}
}}
"""
