"""The kernel's control socket: how the host talks to a running kernel.

Promises to the lab commands and the harness: a Unix stream socket per partition
(``ctl-p<N>.sock`` in the lab's work directory) answering one JSON request per line with
one JSON reply per line: ``{"cmd": "inject", "fault": ..., "target": ..., "site": ...}``,
``{"cmd": "status"}``, ``{"cmd": "sync"}``. A request that cannot be carried out gets
``{"ok": false, "error": "..."}``; the connection stays usable. A handler may return
``(reply, after)``: ``after()`` runs once the reply is sent (a fault that kills the kernel
must not kill the answer saying it was injected).

Only root and the machine's owner (the user the kernel runs as) may talk to it: the socket
is created owner-only (``mailbox.owner_only_socket``: param.OWNER_ONLY_MODE, set on the
socket before ``bind``, so no umask and no window leave it open), and each connection's
peer is checked with SO_PEERCRED as well, so a socket whose mode was widened still refuses
another user. A refused connection is logged once with the peer's uid and pid, closed
unread and counted (``refused``; the kernel's status reports it as ``refused_peers``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

from kernel.hw.mailbox import owner_only_socket

log = logging.getLogger("kernel")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def ctl_path(workdir: str, part_id: int) -> str:
    return os.path.join(workdir, f"ctl-p{part_id}.sock")


class ControlServer:
    def __init__(self, path: str, handle: Callable[[dict], dict]):
        self.path, self.handle = path, handle
        self.refused = 0
        Path(path).unlink(missing_ok=True)
        self.sock = owner_only_socket(socket.SOCK_STREAM, path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._allowed(conn):
                conn.close()
                continue
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _allowed(self, conn: socket.socket) -> bool:
        pid, uid, _ = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        if uid in (0, os.geteuid()):
            return True
        self.refused += 1
        log.warning(
            "control: refused a connection from uid %d pid %d "
            "(only root or the machine's owner, uid %d)",
            uid,
            pid,
            os.geteuid(),
        )
        return False

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                after = None
                try:
                    reply = self.handle(json.loads(line))
                    if isinstance(reply, tuple):  # (reply, what to do once it is sent)
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
