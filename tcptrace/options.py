"""What a run was asked to do: the command line's options as one record (tcptrace/cli.py builds
it; the session, the kernel source and the sinks read it)."""
from dataclasses import dataclass, field

from tcptrace.filters import Filter

# The findings a folded connection would have made, one by one
FOLDED_TYPES = frozenset(("connect", "accept", "close"))


@dataclass
class Options:
    transitions: bool = False
    json: bool = False
    report: bool = False
    interval: float = None
    duration: float = None
    stuck_after: float = 30.0
    port_pressure: float = 0.8     # share of the local port range (--port-pressure / 100)
    pressure_interval: float = 5.0
    ready_file: str = None
    record: str = None
    transport: str = "auto"
    wide: bool = False
    metrics: bool = False     # `tcptrace metrics`: serve /metrics (output/metrics.py)
    listen: tuple = ("127.0.0.1", 9977)
    by: str = "dest"
    filter: Filter = field(default_factory=Filter)
    # How often the buffers are drained. Each drain has a fixed cost (a timer wake-up, the
    # pipeline's bookkeeping, and code and data gone cold in the CPU caches while asleep), so
    # draining less often is cheaper per connection (docs/bench.md). 100 ms of records is about
    # a fifth of the 8 MB ring at 20k connections/s, and output is held about that long for
    # time order anyway.
    tick_ms: int = 100
    scan_ms: int = 100        # how often pending steps are read from the kernel's socks map
    # How long the kernel holds an ESTABLISHED socket's steps for its close to join them in one
    # record (bpf/hold.c: held). Findings are held for order longer than this anyway.
    hold_ms: int = 50
    window_ms: int = 20
    max_conns: int = 262_144
    seed: bool = True
    full_stream: bool = False     # --full-stream: never fold (every connection's records)

    @property
    def quiet_tick_ms(self):
        """How often the buffers are drained while records come slowly enough that this long
        fills under a quarter of the buffer (kernel/live.py: next_tick_ms). A drain costs 2-5 ms
        of CPU even when idle on this project's 2-core test hosts (its code and data gone cold
        in the caches while asleep): at 10 a second that was about half of `report`'s cost
        under 5k connections/s (docs/bench.md). `report` and `metrics` show nothing per
        connection: every second, or four times an --interval. `watch --only` that the kernel
        folds for (what goes wrong, not every connection) is there to be cheap on a busy host:
        every half second; its lines then wait up to about 1.1 s for time order instead of
        0.3 s (session.Pipeline). Any other `watch` keeps tick_ms: its lines are wanted as
        they happen."""
        if self.report or self.metrics:
            slow = 1000 if not self.interval else min(1000, int(self.interval * 250))
        elif self.fold:
            slow = 500
        else:
            return self.tick_ms
        return max(self.tick_ms, slow)

    @property
    def window_ns(self):
        """The ordering window: how long records wait for earlier ones (session.Pipeline);
        scanned steps later than its end are not taken (kernel/live.py)."""
        return self.window_ms * 1_000_000

    @property
    def fold(self):
        """Should the kernel fold healthy short connections into its aggregates
        (bpf/aggregate.c) instead of sending them? When nothing will show them one by one:
        `report` and `metrics`, and `watch --only` without connect, accept or close; never
        with --record or --transitions (they want every record), nor with a filter on what
        only a connection's own findings say (owner, addresses)."""
        if self.full_stream or self.record or self.transitions or self.filter.per_connection():
            return False
        if self.report or self.metrics:
            return True
        return bool(self.filter.types) and not self.filter.types & FOLDED_TYPES
