"""Shared fixtures: a booted emulated machine whose teardown leaves nothing behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from kernel import machine
from kernel.host import Host

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="FUSE with allow_other and real servers need root")


@pytest.fixture
def host():
    """The default machine with partition 0 booted and serving its mount.

    The work directory is world-traversable (not under pytest's root-only tmp dir) because
    servers on the mount run as other users (postgres, nginx's workers)."""
    wd = tempfile.mkdtemp(prefix="crashbench-test-")
    os.chmod(wd, 0o755)
    h = Host(Path(wd), machine.load(), delay=False)
    try:
        h.create_memory()
        h.format_disks()
        h.boot(0)
        yield h
    finally:
        h.close()
        shutil.rmtree(wd, ignore_errors=True)
