"""Where the real servers' programs are on this machine."""

from __future__ import annotations

import glob
import os
import shutil


class MissingProgram(RuntimeError):
    pass


def pg_bin(program: str = "initdb") -> str:
    """Path of a PostgreSQL server program (initdb, pg_ctl, postgres, pgbench)."""
    found = shutil.which(program)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        p = os.path.join(d, program)
        if os.access(p, os.X_OK):
            return p
    raise MissingProgram(
        f"PostgreSQL program {program!r} not found (run `make` as root to install it)"
    )


def pg_tool(program: str) -> str:
    """Path of a PostgreSQL client tool of the same installation as the server (e.g.
    pg_amcheck, PostgreSQL 14 or later): in the directory of the `postgres` program (its
    symbolic links followed), not the first one on PATH, which on Debian is a wrapper that
    may pick another version."""
    p = os.path.join(os.path.dirname(os.path.realpath(pg_bin("postgres"))), program)
    if os.access(p, os.X_OK):
        return p
    raise MissingProgram(
        f"PostgreSQL program {program!r} not found beside {pg_bin('postgres')} "
        f"(it needs PostgreSQL 14 or later; run `make` as root to install it)"
    )


def nginx_bin() -> str:
    for p in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if p and os.access(p, os.X_OK):
            return p
    raise MissingProgram("nginx not found (run `make` as root to install it)")
