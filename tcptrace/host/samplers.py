"""Samplers: readings of the kernel's own tables and counters, taken on the tick and handed to
the pipeline as wire.Sample records (so they are recorded, and replayed as they were).

A sampler has a `name`, a `period_ns`, and `sample(now_ns)` returning Samples; it reads only
what its detector needs, per network namespace (tcptrace/host/netns.py), with the filtering
done in the kernel where the kernel can (sock_diag state masks and port bytecode).
"""
import threading
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


class Background:
    """Runs samplers on a thread of their own, so that a dump of tens of thousands of sockets
    (0.1 s on the development machine, far more in an emulated guest) never holds up the poll
    loop: the kernel's buffers are still drained, and findings written, on time. With them in
    the poll loop, a stuck finding in the 6.1 guest of CI came too late for its test to see the
    socket still stuck. A reading is stamped when its dump is done (under the lock that hands
    it over), and handed over by the first poll that read the clock after that: in time order
    with the events, never behind what the pipeline has already released."""

    def __init__(self, samplers):
        self.samplers = list(samplers)
        self.error = None             # what stopped the thread, if anything did
        self._ready = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def start(self):
        if self.samplers and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tcptrace-sampler",
                                            daemon=True)
            self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                now = time.monotonic_ns()
                for s in self.samplers:
                    if now >= s.next_ns:
                        got = s.sample(now)
                        s.next_ns = now + s.period_ns
                        with self._lock:
                            done = time.monotonic_ns()
                            self._ready.extend(r._replace(ts_ns=done) for r in got)
                wait_ns = min(s.next_ns for s in self.samplers) - time.monotonic_ns()
                self._stop.wait(max(wait_ns, 1_000_000) / 1e9)
        except Exception as e:        # said at exit; tracing goes on without samples
            self.error = f"{type(e).__name__}: {e}"

    def take(self, now_ns):
        """The readings finished by now_ns (the clock read before this poll's drain): a later
        one waits for the next poll, so none is older than what the pipeline released."""
        with self._lock:
            ready = self._ready
            if not ready or ready[-1].ts_ns <= now_ns:
                self._ready = []
                return ready
            self._ready = [r for r in ready if r.ts_ns > now_ns]
            return [r for r in ready if r.ts_ns <= now_ns]

    def close(self):
        """Stop the thread, let go of what the samplers hold; what is worth saying about them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        notes = []
        for s in self.samplers:
            s.close()
            if s.describe():
                notes.append(s.describe())
        if self.error:
            notes.append(f"sampling stopped: {self.error}")
        return notes
