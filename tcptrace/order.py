"""Put kernel events back in time order before anything interprets them.

Per-CPU perf buffers are drained one CPU at a time, and even the shared ring buffer orders records
by reservation, not by the timestamp taken just before it. A transition seen before its
predecessor would corrupt the state machine, so every record waits here until it is older than
`window_ns` relative to the newest time we know has passed, then leaves in timestamp order.
A record that arrives later than the window allows is still delivered (in arrival order) and
counted in `late`, so a too-small window shows up as a number rather than as silent misordering.
"""
import heapq
import itertools


class Reorderer:
    def __init__(self, window_ns=20_000_000):
        self.window_ns = window_ns
        self._heap = []
        self._seq = itertools.count()    # tie-break: equal timestamps keep arrival order
        self._released_ns = 0            # every record at or before this has left
        self.late = 0

    def push(self, rec):
        if rec.ts_ns < self._released_ns:
            self.late += 1
        heapq.heappush(self._heap, (rec.ts_ns, next(self._seq), rec))

    def release(self, now_ns):
        """Records older than now_ns - window, in time order. now_ns: the current CLOCK_MONOTONIC
        (live) or the newest timestamp seen (replay)."""
        horizon = now_ns - self.window_ns
        out = []
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            out.append(heapq.heappop(heap)[2])
        if horizon > self._released_ns:
            self._released_ns = horizon
        return out

    def drain(self):
        """Everything still held, in time order (end of input)."""
        out = [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]
        if out:
            self._released_ns = max(self._released_ns, out[-1].ts_ns)
        return out

    def __len__(self):
        return len(self._heap)
