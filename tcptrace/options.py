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
        fills under a quarter of the buffer (kernel/live.py). `report` and `metrics` show
        nothing per connection, so they wake less often: on a host with costly kernel entry an
        idle drain costs 2-5 ms of CPU, cold caches included, which at 10 a second was most of
        `report`'s cost under 5k connections/s (docs/bench.md). Their intervals still get
        several drains each. `watch` keeps tick_ms: its lines are wanted as they happen."""
        if not (self.report or self.metrics):
            return self.tick_ms
        slow = 1000 if not self.interval else min(1000, int(self.interval * 250))
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
