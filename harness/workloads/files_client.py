"""The `files` workload's client: a WebDAV user that creates, overwrites, appends to and
reads its own files, recording every operation (harness/history.py). Given a corpus
(``--manifest``: the read-mostly mode) it writes its own files with probability
``--write-share`` and otherwise reads a corpus file drawn by popularity: Zipf with
exponent ``--zipf-s`` over the manifest's order (the data set's ranking, most popular
first), so every client of every trial of a run favours the same files; such a read's
invoke carries the file's ``bytes`` and ``sha256`` from the manifest (what was asked for).

Promises to the checkers: a write's value is what was sent (version, kind, byte count,
sha256 of the body); a read's value is what came back. Content is a pure function of
(seed, client, file, version), so every byte can be checked. Like a hard-mounted NFS
client the client retries an operation that did not succeed, with a bounded exponential
backoff, until it succeeds or the trial's deadline passes; each attempt is its own
recorded operation. Outcomes: ``fail`` when nothing reached the server (connection refused,
connect timeout), ``info`` when a write may have reached it (timeout or connection lost
after sending, a 5xx), ``ok`` on a 2xx (and on a 404 for reads: the file is absent).
The verify mode stops retrying a key once the server has answered it with an error (a
status, a body cut short, no answer in time) for ``--give-up-after`` seconds, and a later
key at its first error answer once one key was given up: the server is up and says the
file cannot be read (a page its kernel rejected reads EIO), so waiting out the deadline
would learn nothing more; the key stays unread, which the outcome rule counts as not
verified.
Bounded in time (``--until``) and count (``--max-ops``); SIGTERM stops it after the
operation in flight is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time

import httpx
import numpy as np

from harness.history import Recorder
from harness.workloads import client_cli
from harness.workloads.client_cli import Stop

MAX_FILE = 1 << 20  # appends stop growing a file here; the next write overwrites it


def content(seed: int, client: int, file: int, version: int, n: int) -> bytes:
    """The bytes written as `version` of a file: reproducible from the four numbers."""
    return np.random.default_rng([seed, client, file, version]).bytes(n)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


UNREACHED = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def classify(exc: Exception | None, status: int | None, is_write: bool) -> tuple[str, str | None]:
    """(history type, error) of one attempt."""
    if exc is not None:
        if isinstance(exc, UNREACHED):
            return "fail", type(exc).__name__
        return ("info" if is_write else "fail"), f"{type(exc).__name__}: {exc}"[:200]
    if 200 <= status < 300 or (status == 404 and not is_write):
        return "ok", None
    if status >= 500 and is_write:
        return "info", f"HTTP {status}"
    return "fail", f"HTTP {status}"


class FilesClient:
    def __init__(self, a, rec: Recorder, stop: Stop):
        self.a, self.rec, self.stop = a, rec, stop
        self.rng = np.random.default_rng([a.seed, a.id, 7])
        self.http = httpx.Client(
            base_url=a.url,
            timeout=httpx.Timeout(
                a.read_timeout, connect=a.connect_timeout, pool=a.connect_timeout
            ),
        )
        self.files: dict[int, tuple[int, bytes]] = {}  # file -> (acked version, its body)
        self.ops = 0
        self.answered_error = False  # the server took the last read and failed it
        self.corpus = json.loads(open(a.manifest).read()) if a.manifest else []
        if self.corpus:
            self.popular = Popularity(len(self.corpus), a.zipf_s)

    def key(self, f: int) -> str:
        return f"c{self.a.id}-f{f}.bin"

    def run(self) -> None:
        try:
            self._load()
        finally:
            self.http.close()  # a pooled process runs the next client after this one

    def _load(self) -> None:
        while not self._done():
            if self.corpus and self.rng.random() >= self.a.write_share:
                c = self.corpus[self.popular.draw(self.rng)]
                self.retry(lambda: self.read(c["path"], "read", want=c))
                continue
            f = int(self.rng.integers(self.a.files))
            if not self.corpus and f in self.files and self.rng.random() < self.a.read_ratio:
                self.retry(lambda: self.read(self.key(f), "read"))
            else:
                self.write_next(f)

    def write_next(self, f: int) -> None:
        body, version, kind = self.next_version(f)
        if self.retry(lambda: self.write(f, body, version, kind)):
            self.files[f] = (version, body)

    def _done(self) -> bool:
        return self.stop.requested or self.ops >= self.a.max_ops or time.monotonic() >= self.a.until

    def next_version(self, f: int) -> tuple[bytes, int, str]:
        version, old = self.files.get(f, (0, b""))
        v = version + 1
        if old and len(old) < MAX_FILE and self.rng.random() < 0.3:
            n = int(self.rng.integers(1024, 16 * 1024))
            return old + content(self.a.seed, self.a.id, f, v, n), v, "append"
        n = int(math.exp(self.rng.uniform(math.log(1024), math.log(self.a.max_kib * 1024))))
        return content(self.a.seed, self.a.id, f, v, n), v, ("overwrite" if old else "create")

    def retry(self, attempt, give_up=lambda: False) -> bool:
        """Attempt until ok, like a hard mount; False if the trial ended first or
        ``give_up()`` says so after a failed attempt."""
        backoff = self.a.backoff_min
        while not self._done():
            if attempt():
                return True
            if give_up():
                return False
            time.sleep(backoff)
            backoff = min(backoff * 2, self.a.backoff_max)
        return False

    def write(self, f: int, body: bytes, version: int, kind: str) -> bool:
        key = self.key(f)
        op = self.rec.invoke(
            "write",
            key,
            {"version": version, "kind": kind, "bytes": len(body), "sha256": digest(body)},
        )
        exc = status = None
        try:
            status = self.http.put("/" + key, content=body).status_code
        except httpx.HTTPError as e:
            exc = e
        return self._complete(op, *classify(exc, status, True))

    def read(self, key: str, f: str, want: dict | None = None) -> bool:
        """GET ``key`` (a path relative to the server's root, or a name at its root);
        ``want``: the corpus file asked for, whose bytes and sha256 the invoke carries."""
        op = self.rec.invoke(
            f, key, None if want is None else {"bytes": want["bytes"], "sha256": want["sha256"]}
        )
        exc = status = None
        try:
            r = self.http.get(key if key.startswith("/") else "/" + key)
            status = r.status_code
        except httpx.HTTPError as e:
            exc = e
        type_, err = classify(exc, status, False)
        # the server took the request and failed it: an error status, or a body cut short
        # (a 200 whose file read EIO half way) or never sent
        self.answered_error = type_ == "fail" and not isinstance(exc, UNREACHED)
        value = None
        if type_ == "ok":
            value = (
                {"absent": True}
                if status == 404
                else {"bytes": len(r.content), "sha256": digest(r.content)}
            )
        return self._complete(op, type_, err, value)

    def _complete(self, op: dict, type_: str, err: str | None, value=None) -> bool:
        self.ops += 1
        self.rec.complete(type_, op, value=value, error=err)
        return type_ == "ok"


class Popularity:
    """Zipf over n files: the file of rank r (1 = most popular, the manifest's r-th entry:
    files.py lists the corpus most popular first) is drawn with probability proportional
    to 1 / r**s (s = 0: uniform)."""

    def __init__(self, n: int, s: float):
        w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
        self.cdf = np.cumsum(w) / w.sum()

    def draw(self, rng: np.random.Generator) -> int:
        r = int(np.searchsorted(self.cdf, rng.random(), side="right"))
        return min(r, len(self.cdf) - 1)


def verify(a, rec: Recorder, stop: Stop) -> int:
    """Read back every key named in the keys file, retrying each until answered."""
    a.files = 0
    c = FilesClient(a, rec, stop)
    keys = json.loads(open(a.keys).read())
    missing = []
    try:
        for k in keys:
            # once the server has answered one key with errors for the whole wait, it is
            # steady: a later key it answers with an error is not waited for again
            if not read_back(c, k, 0.0 if missing else a.give_up_after):
                missing.append(k)
    finally:
        c.http.close()
    return 1 if missing else 0


def read_back(c: FilesClient, key: str, give_up_after: float) -> bool:
    """Read ``key`` until answered; False once the server has answered it only with
    errors for ``give_up_after`` seconds (or at the deadline)."""
    first_error = None

    def answered_long_enough() -> bool:
        nonlocal first_error
        if not c.answered_error:
            return False
        now = time.monotonic()
        first_error = now if first_error is None else first_error
        return now - first_error >= give_up_after

    return c.retry(lambda: c.read(key, "verify"), give_up=answered_long_enough)


def ready(a) -> int:
    """Exit 0 once the server answers (any HTTP status), 1 at the deadline."""
    while time.monotonic() < a.until:
        try:
            httpx.request("OPTIONS", a.url + "/", timeout=httpx.Timeout(1.0, connect=0.2))
            return 0
        except httpx.HTTPError:
            time.sleep(0.02)
    return 1


def arguments() -> argparse.ArgumentParser:
    ap = client_cli.arguments("python -m harness.workloads.files_client", connect_timeout=0.2)
    ap.add_argument("--url", required=True)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--max-kib", type=int, default=256)
    ap.add_argument("--read-timeout", type=float, default=2.0)
    ap.add_argument(
        "--manifest", help="the corpus (JSON list of {path, bytes, sha256}): the read-mostly mode"
    )
    ap.add_argument("--write-share", type=float, default=0.1)
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument(
        "--give-up-after",
        type=float,
        default=1.0,
        help="verify: seconds of error answers from the server after which a key is left unread",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    return client_cli.run(
        arguments().parse_args(argv),
        ready,
        verify,
        lambda a, rec, stop: FilesClient(a, rec, stop).run(),
    )


if __name__ == "__main__":
    sys.exit(main())
