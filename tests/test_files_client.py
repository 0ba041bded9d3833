"""The `files` client's verify mode against a plain HTTP server on loopback: a key the
server answers only with errors is given up after ``--give-up-after`` seconds instead of
being retried until the deadline, a later such key at its first error answer, and the keys
it can read are still read back."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import history


class _Answers(BaseHTTPRequestHandler):
    """GET /good.bin: 200 with a body; /cut.bin: a 200 whose body stops short (the server's
    read of the file failed half way); anything else: 500 (a file whose page reads EIO)."""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        body, code = (b"present", 200) if self.path == "/good.bin" else (b"EIO", 500)
        self.send_response(200 if self.path == "/cut.bin" else code)
        self.send_header("Content-Length", str(100 if self.path == "/cut.bin" else len(body)))
        self.end_headers()
        self.wfile.write(body)  # /cut.bin: 3 of its 100 bytes, then the connection closes
        if self.path == "/cut.bin":
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _verify(url: str, tmp_path, deadline_s: float, *extra: str) -> tuple[int, float, list]:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(["cut.bin", "good.bin", "bad-2.bin", "bad-3.bin"]))
    hist = tmp_path / "verify.jsonl"
    argv = [sys.executable, "-m", "harness.workloads.files_client", "verify", "--url", url]
    argv += ["--until", repr(time.monotonic() + deadline_s), "--history", str(hist)]
    argv += ["--keys", str(keys), *extra]
    t0 = time.monotonic()
    rc = subprocess.run(argv, timeout=deadline_s + 30, stdin=subprocess.DEVNULL).returncode
    return rc, time.monotonic() - t0, history.read(hist)


def test_a_key_the_server_answers_only_with_errors_is_given_up_before_the_deadline(
    server, tmp_path
):
    rc, took, events = _verify(server, tmp_path, 60.0, "--give-up-after", "0.5")
    assert rc == 1, "a key left unread must make verify exit 1"
    # far below the 60 s deadline it used to wait out; loose enough for a loaded machine
    assert took < 30.0, took
    done = [e for e in events if e["type"] != "invoke"]
    tries = {k: [e["type"] for e in done if e["key"] == k] for k in ("cut.bin", "bad-2.bin")}
    assert len(tries["cut.bin"]) > 1 and set(tries["cut.bin"]) == {"fail"}, "retried, never ok"
    # the server was steady by then: one error answer is enough
    assert tries["bad-2.bin"] == ["fail"]
    assert [e["key"] for e in done if e["key"].startswith("bad-3")] == ["bad-3.bin"]
    assert [e["type"] for e in done if e["key"] == "good.bin"] == ["ok"]
