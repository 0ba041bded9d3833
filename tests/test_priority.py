"""kernel/hw/priority.py: a process started idle yields across sessions, and is raised back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kernel.hw import priority

AUTOGROUPS = priority.group_nice() is not None

# what the child sees of itself: its policy and its session's autogroup nice
REPORT = (
    "import json, os; from kernel.hw import priority; "
    "before = (os.sched_getscheduler(0), priority.group_nice()); {raise_it}"
    "print(json.dumps([before, priority.group_nice()]))"
)


def _child(new_session: bool, raise_it: bool = False) -> list:
    code = REPORT.format(raise_it="priority.raise_group(); " if raise_it else "")
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=priority.start_idle,
        start_new_session=new_session,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not AUTOGROUPS, reason="this host's scheduler has no autogroups")
def test_a_session_started_idle_is_at_sched_idle_in_the_weakest_group():
    (policy, nice), _ = _child(new_session=True)
    assert policy == os.SCHED_IDLE
    assert nice == priority.IDLE_NICE


@pytest.mark.skipif(not AUTOGROUPS, reason="this host's scheduler has no autogroups")
def test_raising_the_group_gives_the_session_its_normal_share_back():
    (_, idle_nice), raised = _child(new_session=True, raise_it=True)
    assert idle_nice == priority.IDLE_NICE
    assert raised == 0


@pytest.mark.skipif(not AUTOGROUPS, reason="this host's scheduler has no autogroups")
def test_a_child_in_its_parent_s_session_leaves_that_group_alone():
    """The autogroup is the whole session's: an idle child that does not lead one must not
    push its parent (the harness) behind everything else."""
    mine = priority.group_nice()
    (policy, nice), _ = _child(new_session=False)
    assert policy == os.SCHED_IDLE
    assert nice == mine == priority.group_nice()
