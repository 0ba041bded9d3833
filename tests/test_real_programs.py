"""Real, unmodified programs keep their files on the emulated kernel's mount."""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from harness.binaries import nginx_bin, pg_bin

pytestmark = [pytest.mark.root]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(argv, **kw):
    return subprocess.run(
        ["runuser", "-u", "postgres", "--"] + argv,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_postgresql_runs_pgbench_on_the_mount(host):
    mnt = Path(host.kernels[0].mount)
    pgdata = mnt / "pgdata"
    pgdata.mkdir(mode=0o700)
    pw = pwd.getpwnam("postgres")
    os.chown(pgdata, pw.pw_uid, pw.pw_gid)
    sockdir = tempfile.mkdtemp(prefix="cb-pgsock-")
    os.chown(sockdir, pw.pw_uid, pw.pw_gid)
    port = str(free_port())
    server = None
    try:
        as_postgres(
            [pg_bin("initdb"), "-D", str(pgdata), "--no-sync", "-A", "trust", "-U", "postgres"]
        )
        server = subprocess.Popen(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                pg_bin("postgres"),
                "-D",
                str(pgdata),
                "-k",
                sockdir,
                "-p",
                port,
                "-c",
                "listen_addresses=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [pg_bin("pg_isready"), "-h", sockdir, "-p", port], capture_output=True
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, "PostgreSQL did not start on the mount"
            assert server.poll() is None, "PostgreSQL exited during start-up"
            time.sleep(0.2)
        as_postgres([pg_bin("pgbench"), "-h", sockdir, "-p", port, "-i", "-s", "1", "postgres"])
        out = as_postgres(
            [pg_bin("pgbench"), "-h", sockdir, "-p", port, "-c", "2", "-t", "100", "postgres"]
        )
        assert "number of transactions actually processed: 200/200" in out.stdout
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
                server.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert server.returncode is not None


def test_nginx_serves_a_file_from_the_mount(host, tmp_path):
    mnt = Path(host.kernels[0].mount)
    www = mnt / "www"
    www.mkdir(mode=0o755)
    body = os.urandom(200_000)
    (www / "blob.bin").write_bytes(body)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{ listen 127.0.0.1:{port}; root {www}; }}
}}
""")
    proc = subprocess.Popen(
        [nginx_bin(), "-c", str(conf), "-p", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/blob.bin", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "nginx did not come up"
                time.sleep(0.1)
        assert r.status_code == 200 and r.content == body
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
