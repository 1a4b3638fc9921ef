"""Put kernel events back in time order before anything interprets them.

Per-CPU perf buffers are drained one CPU at a time, and even the shared ring buffer orders records
by reservation, not by the timestamp taken just before it. A transition seen before its
predecessor would corrupt the state machine, so every record waits here until it is older than
`window_ns` relative to the newest time we know has passed, then leaves in timestamp order.
A record that arrives later than the window allows is still delivered (in arrival order) and
counted in `late`, so a too-small window shows up as a number rather than as silent misordering.

Batches arrive nearly sorted, and the held list can be long (findings wait a scan interval), so
nothing here is proportional to what is held: a batch is sorted on its own and appended, or merged
into the tail it overlaps; releasing advances a start index (the list is compacted now and then).
"""
import bisect
import operator

by_ts = operator.attrgetter("ts_ns")      # sort key of every record and finding


class Reorderer:
    def __init__(self, window_ns=20_000_000):
        self.window_ns = window_ns
        self._held = []
        self._start = 0                  # held[:_start] has been released
        self._released_ns = 0            # every record at or before this has left
        self.late = 0

    def push(self, rec):
        self.push_many((rec,))

    def push_many(self, recs):
        if not recs:
            return
        recs = sorted(recs, key=by_ts)     # stable: equal timestamps keep arrival order
        if recs[0].ts_ns < self._released_ns:
            self.late += bisect.bisect_left(recs, self._released_ns, key=by_ts)
        held = self._held
        if len(held) == self._start or recs[0].ts_ns >= held[-1].ts_ns:
            held.extend(recs)
            return
        pos = bisect.bisect_right(held, recs[0].ts_ns, lo=self._start, key=by_ts)
        tail = held[pos:]
        del held[pos:]
        tail.extend(recs)
        tail.sort(key=by_ts)
        held.extend(tail)

    def release(self, now_ns):
        """Records older than now_ns - window, in time order. now_ns: the current CLOCK_MONOTONIC
        (live) or the newest timestamp seen (replay)."""
        horizon = now_ns - self.window_ns
        held, start = self._held, self._start
        if horizon > self._released_ns:
            self._released_ns = horizon
        if len(held) == start or held[start].ts_ns > horizon:
            return []
        n = bisect.bisect_right(held, horizon, lo=start, key=by_ts)
        out = held[start:n]
        if n == len(held):
            held.clear()
            n = 0
        elif n > 4096 and n > len(held) // 2:
            del held[:n]
            n = 0
        self._start = n
        return out

    def drain(self):
        """Everything still held, in time order (end of input)."""
        out = self._held[self._start:]
        self._held = []
        self._start = 0
        if out:
            self._released_ns = max(self._released_ns, out[-1].ts_ns)
        return out

    @property
    def released_ns(self):
        """Every record at or before this time has left."""
        return self._released_ns

    def __len__(self):
        return len(self._held) - self._start
