"""What a run was asked to do: the command line's options as one record (tcptrace/cli.py builds
it; the session, the kernel source and the sinks read it)."""
from dataclasses import dataclass, field

from tcptrace.filters import Filter


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
