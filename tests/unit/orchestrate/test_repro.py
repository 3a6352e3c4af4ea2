"""Stopping a ``dvc repro`` process group: when is it gone."""

from __future__ import annotations

import subprocess
import sys

import psutil

from lmops.orchestrate.repro import group_alive
from tests.support.workspace import wait_for


class DyingLeader(subprocess.Popen):
    """A leader that cannot be reaped yet: its main thread has died (it shows as a zombie)
    while its other threads still end, so ``waitpid`` finds it still running."""

    polls = 0

    def poll(self, *args, **kwargs):
        self.polls += 1
        return None if self.polls <= 2 else super().poll(*args, **kwargs)


def test_the_leader_counts_until_it_is_reaped():
    proc = DyingLeader([sys.executable, "-c", "pass"], start_new_session=True)
    leader = psutil.Process(proc.pid)
    wait_for(lambda: leader.status() == psutil.STATUS_ZOMBIE, "the leader exits", 30)
    # a zombie leader is not gone: its pid still holds DVC's rwlock entries
    assert group_alive(proc) is True
    assert group_alive(proc) is True
    assert group_alive(proc) is False
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
