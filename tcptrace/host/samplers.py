"""Samplers: readings of the kernel's own tables and counters, taken on the tick and handed to
the pipeline as wire.Sample records (so they are recorded, and replayed as they were).

A sampler has a `name`, a `period_ns`, and `sample(now_ns)` returning Samples; it reads only
what its detector needs, per network namespace (tcptrace/host/netns.py), with the filtering
done in the kernel where the kernel can (sock_diag state masks and port bytecode).
"""
import time

from tcptrace.host import netns


class Namespaces:
    """The host's network namespaces, looked up at most every `refresh_ns` (a walk of
    /proc/*/ns/net costs a stat per process)."""

    def __init__(self, refresh_ns=5_000_000_000, root="/proc"):
        self.refresh_ns = refresh_ns
        self.root = root
        self._at = None
        self._known = {}

    def get(self, now_ns=None):
        """{netns inode: /proc/<pid> of a task in it}."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        if self._at is None or now - self._at >= self.refresh_ns:
            self._known = netns.namespaces(self.root)
            self._at = now
        return self._known


class Sampler:
    """Base of every sampler. A detector names the samplers it needs in its SAMPLERS; the live
    source runs each one the detectors ask for, every period_ns. Made with the kernel-side
    filters' scope (`ports`, `families`: empty = all), which what it dumps keeps to."""
    name = None
    period_ns = 1_000_000_000
    next_ns = 0

    def sample(self, now_ns):
        """[wire.Sample] of what the kernel says now."""
        raise NotImplementedError

    def close(self):
        """Let go of what it keeps open (sockets, files in other namespaces)."""

    def describe(self):
        """What it cost, for the run's closing diagnostics (None: nothing to say)."""
        return None
