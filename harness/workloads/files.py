"""Workload `files`: a WebDAV file server on the emulated file system, and its users.

Promises to the driver: the server is WsgiDAV, unmodified, run as an application of the
active partition with its root at the mount and listening on the service address; the
clients (harness/workloads/files_client.py) are separate processes in the client
namespace. Nothing of the server fsyncs, so what an acknowledged PUT leaves behind sits in
the page cache as dirty pages: exactly what a crash puts at risk. The verify phase reads
back every file any client wrote.

Read-mostly (``corpus_mib`` > 0, the default): ``prepare`` (on a kernel booted only for
it) writes a corpus of ``corpus_mib`` MiB under ``<mount>/corpus`` (harness/workloads/
tree.py; by default more than the default disk model re-reads in a second) and
``wait_ready`` reads it once through the mount (``warm``), so the crash finds it cached;
``cache_pages`` is its size in pages. Each client operation is then a write of the
client's own files with probability ``write_share``, else a read of a corpus file drawn
by popularity (Zipf with exponent ``zipf_s`` over a ranking of the files made with the data
set, the same for every client and every trial of a run: the manifest lists the corpus
most popular first); a corpus read's invoke names the digest it expects, and
``checks.corpus`` counts the bodies served that differ from it. With ``corpus_mib`` = 0
the clients only use their own files, a share ``read_ratio`` of operations reading one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from harness.workloads import Service, Workload, WorkloadError, tree
from harness.workloads.clients import ClientGroup, launch, launch_to_end

CLIENT = "harness.workloads.files_client"
WARM_TIMEOUT_S = 600.0
WARM_PAUSE_S = 0.002


class Files(Workload):
    name = "files"
    description = (
        "WsgiDAV file server; clients read a corpus with a skew and create, "
        "overwrite, append to their own files"
    )
    prepares = True
    client_module = CLIENT
    defaults = {
        "clients": 4,
        "files_per_client": 16,
        "max_kib": 256,
        "read_ratio": 0.5,
        "corpus_mib": 384,
        "write_share": 0.1,
        "zipf_s": 1.0,
        "warm": 1,
        "port": 8080,
        "connect_timeout_s": 0.2,
        "read_timeout_s": 2.0,
        "max_ops_per_client": 100_000,
    }
    POSITIVE_INTS = ("clients", "files_per_client", "max_kib", "port", "max_ops_per_client")
    SHARES = ("read_ratio", "write_share")

    def __init__(self, **params):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise WorkloadError(
                f"files: unknown parameter(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(self.defaults)}"
            )
        self.p = p = {**self.defaults, **params}
        for k in self.POSITIVE_INTS:
            if not _is_int(p[k]) or p[k] <= 0:
                raise WorkloadError(f"files: {k} must be a positive integer, got {p[k]!r}")
        for k in ("corpus_mib", "warm"):
            if not _is_int(p[k]) or p[k] < 0:
                raise WorkloadError(f"files: {k} must be an integer, 0 or more, got {p[k]!r}")
        for k in self.SHARES:
            if not _is_number(p[k]) or not 0 <= p[k] <= 1:
                raise WorkloadError(f"files: {k} must be a share between 0 and 1, got {p[k]!r}")
        for k in ("zipf_s", "connect_timeout_s", "read_timeout_s"):
            positive = k != "zipf_s"
            if not _is_number(p[k]) or p[k] < 0 or (positive and p[k] == 0):
                raise WorkloadError(
                    f"files: {k} must be a {'positive' if positive else 'non-negative'} "
                    f"number, got {p[k]!r}"
                )

    def url(self, svc: Service) -> str:
        return f"http://{svc.ip}:{self.p['port']}"

    # --- the corpus (read-mostly) --------------------------------------------------------
    def manifest(self, svc: Service) -> Path:
        return svc.data_dir / "files-corpus.json"

    def prepare(self, svc: Service) -> None:
        if self.p["corpus_mib"]:
            files = tree.write_tree(
                Path(svc.mount) / "corpus", svc.dataset_seed, self.p["corpus_mib"] << 20
            )
            ranked = [files[i] for i in ranking(svc.dataset_seed, len(files))]
            self.manifest(svc).write_text(
                json.dumps([{**f, "path": "/corpus" + f["path"]} for f in ranked])
            )

    def prepared(self, svc: Service) -> list[Path]:
        return [self.manifest(svc)] if self.p["corpus_mib"] else []

    def cache_pages(self, svc: Service) -> int | None:
        if not self.p["corpus_mib"]:
            return None
        return tree.pages(json.loads(self.manifest(svc).read_text()))

    def checks(self, svc: Service, events: list[dict]) -> dict | None:
        """The corpus bodies served by the load, each against the digest it asked for."""
        if not self.p["corpus_mib"]:
            return None
        from harness.checkers.bodies import bodies

        b = bodies(events)
        return {
            "corpus": {k: b[k] for k in ("served", "identical", "mismatched", "mismatched_keys")}
        }

    def apps(self, svc: Service) -> list[dict]:
        dav = str(Path(sys.executable).with_name("wsgidav"))
        return [
            {
                "name": "wsgidav",
                "argv": [
                    dav,
                    "--host",
                    svc.ip,
                    "--port",
                    str(self.p["port"]),
                    "--root",
                    svc.mount,
                    "--auth",
                    "anonymous",
                    "--no-config",
                    "-q",
                ],
                "cwd": "/",
                "log": str(svc.workdir / "logs" / "wsgidav.log"),
            }
        ]

    def wait_ready(self, svc: Service, timeout: float) -> None:
        args = ["ready", "--url", self.url(svc), "--until", str(time.monotonic() + timeout)]
        rc = launch_to_end(svc, CLIENT, args, svc.workdir / "logs" / "files-ready.log", timeout + 5)
        if rc != 0:
            raise WorkloadError(
                f"files: the WebDAV server at {self.url(svc)} did not answer "
                f"within {timeout:.0f} s; see logs/wsgidav.log"
            )
        if self.p["corpus_mib"] and self.p["warm"]:
            self.warm(svc, time.monotonic() + WARM_TIMEOUT_S)

    def warm(self, svc: Service, deadline: float) -> None:
        """Read every corpus file once through the mount, so the crash finds the corpus
        in the active kernel's page cache (the kernel serves these reads as it serves
        the server's; nothing is recorded: this is deployment, not load)."""
        for f in json.loads(self.manifest(svc).read_text()):
            with open(Path(svc.mount) / f["path"].lstrip("/"), "rb") as fh:
                while fh.read(1 << 20):
                    pass
            # a breath between files: back to back, these reads kept a kernel on a busy
            # CPU from beating for > 100 ms, and orthros's backup took it for dead
            time.sleep(WARM_PAUSE_S)
            if time.monotonic() > deadline:
                raise WorkloadError(
                    f"files: reading the corpus once took more than {WARM_TIMEOUT_S:.0f} s"
                )

    def _client_argv(
        self, svc: Service, mode: str, cid: int, until: float, history: Path
    ) -> list[str]:
        p = self.p
        return [
            mode,
            "--url",
            self.url(svc),
            "--until",
            repr(until),
            "--history",
            str(history),
            "--id",
            str(cid),
            "--seed",
            str(svc.seed),
            "--files",
            str(p["files_per_client"]),
            "--max-kib",
            str(p["max_kib"]),
            "--read-ratio",
            str(p["read_ratio"]),
            "--max-ops",
            str(p["max_ops_per_client"]),
            "--write-share",
            str(p["write_share"]),
            "--zipf-s",
            str(p["zipf_s"]),
            *(["--manifest", str(self.manifest(svc))] if p["corpus_mib"] else []),
            "--connect-timeout",
            str(p["connect_timeout_s"]),
            "--read-timeout",
            str(p["read_timeout_s"]),
        ]

    def start_clients(self, svc: Service, until: float) -> ClientGroup:
        hd = svc.history_dir()
        procs, paths = [], []
        for cid in range(self.p["clients"]):
            h = hd / f"client-{cid}.jsonl"
            procs.append(
                launch(
                    svc,
                    CLIENT,
                    self._client_argv(svc, "client", cid, until, h),
                    svc.workdir / "logs" / f"client-{cid}.log",
                )
            )
            paths.append(h)
        return ClientGroup(procs, paths)

    def explain(self, svc: Service, keys: list[str], events: list[dict]) -> dict[str, dict]:
        """Each corrupted file as the mount serves it, page by page against the versions
        its client wrote (files_provenance.py)."""
        from harness.workloads import files_provenance

        root = Path(svc.mount)
        corpus = {}
        if self.p["corpus_mib"]:  # a corpus file's content is foreign to every client file
            corpus = {f["sha256"]: f["path"] for f in json.loads(self.manifest(svc).read_text())}
        out = {}
        for k in keys:
            e = files_provenance.explain(root / k, k, events, svc.seed)
            if e.get("sha256") in corpus:
                e["corpus_file"] = corpus[e["sha256"]]
            out[k] = e
        return out

    shares_machine = True

    def forget(self, svc: Service, events: list[dict]) -> None:
        """Remove every file the clients wrote (its key is its path under the mount): the
        next clients create their files afresh, so a lost write reads as absent or older."""
        root = Path(svc.mount)
        for key in sorted(
            {e["key"] for e in events if e["f"] == "write" and e["type"] == "invoke"}
        ):
            (root / key).unlink(missing_ok=True)

    def verify(self, svc: Service, events: list[dict], timeout: float = 30.0) -> Path | None:
        keys = sorted({e["key"] for e in events if e["f"] == "write" and e["type"] == "invoke"})
        if not keys:
            return None
        kf = svc.workdir / "verify-keys.json"
        kf.write_text(json.dumps(keys))
        h = svc.history_dir() / "verify.jsonl"
        args = self._client_argv(svc, "verify", self.p["clients"], time.monotonic() + timeout, h)
        launch_to_end(
            svc,
            CLIENT,
            [*args, "--keys", str(kf)],
            svc.workdir / "logs" / "verify.log",
            timeout + 10,
        )
        return h


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def ranking(seed: int, n: int) -> list[int]:
    """The corpus files by popularity, most popular first: a permutation seeded by the data
    set's seed, so which files are hot (and how big they are) is the data set's, not the
    trial's."""
    return [int(i) for i in np.random.default_rng([seed, 83]).permutation(n)]
