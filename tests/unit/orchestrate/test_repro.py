"""Stopping a ``dvc repro`` process group: when is it gone."""

from __future__ import annotations

import subprocess
import sys

import psutil

from lmops.orchestrate.repro import group_alive
from tests.support.workspace import wait_for


class LeaderDiesDuringTheScan(subprocess.Popen):
    """The leader is alive at ``group_alive``'s first poll and dead by its scan of the
    group: the race between a process exiting and the check that reaps it."""

    polls = 0

    def poll(self, *args, **kwargs):
        self.polls += 1
        return None if self.polls == 1 else super().poll(*args, **kwargs)


def test_a_group_that_is_gone_has_its_leader_reaped():
    proc = LeaderDiesDuringTheScan([sys.executable, "-c", "pass"], start_new_session=True)
    leader = psutil.Process(proc.pid)
    wait_for(lambda: leader.status() == psutil.STATUS_ZOMBIE, "the leader exits", 30)
    assert group_alive(proc) is False
    # no zombie left: DVC's rwlock takes a pid that still exists for a live holder
    assert proc.returncode == 0
    assert not psutil.pid_exists(proc.pid)


def test_a_group_with_a_live_member_is_alive():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        assert group_alive(proc) is True
    finally:
        proc.kill()
        proc.wait()
    assert group_alive(proc) is False
