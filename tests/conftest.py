"""Shared fixtures: a booted emulated machine whose teardown leaves nothing behind."""
from __future__ import annotations

import os

import pytest

from harness.testbed import Testbed

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="FUSE with allow_other and real servers need root")


@pytest.fixture
def host():
    """The default machine with partition 0 booted and serving its mount.

    The work directory is world-traversable (not under pytest's root-only tmp dir) because
    servers on the mount run as other users (postgres, nginx's workers)."""
    with Testbed(kind="test", delay=False) as bed:
        bed.host.boot(0)
        yield bed.host
