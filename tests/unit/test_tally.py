"""kernel/tally.py: Tally's naming of its tracefs instances, without tracefs."""
import os
import subprocess

from tcptrace.kernel.tally import Tally


def test_tally_instances_of_dead_or_reused_pids_are_stale():
    """An instance is named after its process's pid and start time; one left by a process that
    died is stale, and stays stale when its pid is reused by a later process."""
    me = os.getpid()
    mine = Tally.name(me)
    assert mine.startswith(f"tcptrace-{me}-")
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert Tally.name(dead.pid) is None
    start = int(mine.rsplit("-", 1)[1])
    reused = f"tcptrace-{me}-{start + 1}"       # our pid, but another process's start time
    names = [mine, reused, f"tcptrace-{dead.pid}-{start}", f"tcptrace-{dead.pid}",
             f"tcptrace-{me}", "tcptrace-x", "tcptrace-1-2-3", "other", "tcptrace-"]
    assert Tally.stale(names) == [reused, f"tcptrace-{dead.pid}-{start}", f"tcptrace-{dead.pid}"]
