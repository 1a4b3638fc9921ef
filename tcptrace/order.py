"""Put kernel events back in time order before anything interprets them.

Per-CPU perf buffers are drained one CPU at a time, and even the shared ring buffer orders records
by reservation, not by the timestamp taken just before it. A transition seen before its
predecessor would corrupt the state machine, so every record waits here until it is older than
`window_ns` relative to the newest time we know has passed, then leaves in timestamp order.
A record that arrives later than the window allows is still delivered (in arrival order) and
counted in `late`, so a too-small window shows up as a number rather than as silent misordering.

Batches arrive nearly sorted, so the held records are kept as one list sorted per batch (Timsort
is linear on such input) and released by bisection: cheaper per record than a heap.
"""
import bisect
import operator

_ts = operator.attrgetter("ts_ns")


class Reorderer:
    def __init__(self, window_ns=20_000_000):
        self.window_ns = window_ns
        self._held = []
        self._released_ns = 0            # every record at or before this has left
        self.late = 0

    def push(self, rec):
        self.push_many((rec,))

    def push_many(self, recs):
        if not recs:
            return
        released = self._released_ns
        for r in recs:
            if r.ts_ns < released:
                self.late += 1
        self._held.extend(recs)
        self._held.sort(key=_ts)         # stable: equal timestamps keep arrival order

    def release(self, now_ns):
        """Records older than now_ns - window, in time order. now_ns: the current CLOCK_MONOTONIC
        (live) or the newest timestamp seen (replay)."""
        horizon = now_ns - self.window_ns
        held = self._held
        if horizon > self._released_ns:
            self._released_ns = horizon
        if not held or held[0].ts_ns > horizon:
            return []
        n = bisect.bisect_right(held, horizon, key=_ts)
        out, self._held = held[:n], held[n:]
        return out

    def drain(self):
        """Everything still held, in time order (end of input)."""
        out, self._held = self._held, []
        if out:
            self._released_ns = max(self._released_ns, out[-1].ts_ns)
        return out

    def __len__(self):
        return len(self._held)
