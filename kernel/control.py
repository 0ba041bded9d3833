"""The kernel's control socket: how the host talks to a running kernel.

Promises to the lab commands and the harness: a Unix stream socket per partition
(``ctl-p<N>.sock`` in the lab's work directory) answering one JSON request per line with
one JSON reply per line: ``{"cmd": "inject", "fault": ..., "target": ..., "site": ...}``,
``{"cmd": "status"}``, ``{"cmd": "sync"}``. A request that cannot be carried out gets
``{"ok": false, "error": "..."}``; the connection stays usable. A handler may return
``(reply, after)``: ``after()`` runs once the reply is sent (a fault that kills the kernel
must not kill the answer saying it was injected).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
import threading
from typing import Callable


def ctl_path(workdir: str, part_id: int) -> str:
    return os.path.join(workdir, f"ctl-p{part_id}.sock")


class ControlServer:
    def __init__(self, path: str, handle: Callable[[dict], dict]):
        self.path, self.handle = path, handle
        Path(path).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                after = None
                try:
                    reply = self.handle(json.loads(line))
                    if isinstance(reply, tuple):   # (reply, what to do once it is sent)
                        reply, after = reply
                except Exception as e:  # a bad request must not take the kernel down
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
                if after is not None:
                    after()

    def close(self) -> None:
        self.sock.close()
        Path(self.path).unlink(missing_ok=True)


def request(path: str, req: dict, timeout: float = 10.0) -> dict:
    """Send one request to a kernel's control socket and return its reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"{path}: kernel closed the connection (it may have died)")
            buf += chunk
        return json.loads(buf)
    finally:
        s.close()
