"""Shared fixtures: a booted emulated machine whose teardown leaves nothing behind."""

from __future__ import annotations

import os

import pytest

from harness.testbed import Testbed


def pytest_collection_modifyitems(config, items):
    """The one way to mark a root-only test: ``@pytest.mark.root`` (or ``pytestmark``);
    without root it is skipped, saying why."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(
        reason="needs root: FUSE with allow_other, namespaces, cgroups, other users, real servers"
    )
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(skip)


@pytest.fixture
def host():
    """The default machine with partition 0 booted and serving its mount.

    The work directory is world-traversable (not under pytest's root-only tmp dir) because
    servers on the mount run as other users (postgres, nginx's workers)."""
    with Testbed(kind="test", delay=False) as bed:
        bed.host.boot(0)
        yield bed.host
