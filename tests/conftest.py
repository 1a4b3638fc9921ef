import faulthandler
import os
import signal
import sys

import pytest

# tests/streams.py is shared by the unit and CLI tiers, tests/pairwise.py by the unit and kernel
# tiers, tests/golden.py by the unit tier and its own command line.
sys.path.insert(0, os.path.dirname(__file__))

# One test that waits forever (a record that never comes, a tracer that never exits) must cost
# CI one failure, not the rest of its time limit: each phase of a test (setup, call, teardown)
# gets this long. The slowest tests take about a minute in the CI VM and a few minutes in a
# Vagrant box nested in emulation (the fuzz and 100k-label tests: 3-7 s on the host); the limit
# leaves room for a host several times slower than that.
TIMEOUT_S = float(os.environ.get("TCPTRACE_TEST_TIMEOUT", "900"))


class PhaseTimeout(Exception):
    pass


def _children():
    """Pids of this process's children, from /proc (no psutil in the VM image)."""
    me, kids = os.getpid(), set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                kids.add(int(d))
    return kids


def _limited(item, phase):
    def fire(signum, frame):
        # every thread's stack first: where it waited is the whole diagnosis
        print(f"\n{phase} of {item.nodeid}: over {TIMEOUT_S:g} s; stacks:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        item.stash[_TIMED_OUT] = True
        raise PhaseTimeout(f"{phase} ran over {TIMEOUT_S:g} s (TCPTRACE_TEST_TIMEOUT)")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_TIMED_OUT = pytest.StashKey[bool]()
_BEFORE = pytest.StashKey[set]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item.stash[_BEFORE] = _children()
    yield from _limited(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _limited(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _limited(item, "teardown")
    # A test stopped mid-way cannot clean up after itself: its own processes (a tracer holding
    # BPF programs, a load generator) would load every test after it. Session-wide ones were
    # there before it and are left alone.
    if item.stash.get(_TIMED_OUT, False):
        for pid in _children() - item.stash.get(_BEFORE, set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
