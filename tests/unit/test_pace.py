"""How often the live loop drains the kernel's buffer (kernel/live.py: next_tick_ms): `watch`
every tick; `report` and `metrics` every quiet tick while little comes, every tick in a burst;
`watch --only` of what goes wrong at a pace between."""
from tcptrace.filters import Filter
from tcptrace.kernel.live import next_tick_ms
from tcptrace.options import Options

CAPACITY = 40_000       # records the buffer holds


def only(*types):
    return Options(json=True, filter=Filter(types=frozenset(types)))


def test_watch_drains_every_tick_whatever_comes():
    for opts in (Options(), Options(json=True), Options(transitions=True),
                 only("refused", "connect")):
        assert opts.quiet_tick_ms == opts.tick_ms == 100, opts
        assert next_tick_ms(opts, 0, 100, CAPACITY) == 100


def test_watch_only_what_goes_wrong_drains_every_half_second_while_quiet():
    opts = only("refused", "failed", "reset", "stuck")
    assert opts.fold and opts.quiet_tick_ms == 500
    assert next_tick_ms(opts, 0, 500, CAPACITY) == 500
    assert next_tick_ms(opts, 10_000, 500, CAPACITY) == 500      # a quarter in half a second
    assert next_tick_ms(opts, 10_001, 500, CAPACITY) == 100


def test_report_and_metrics_drain_every_second_while_a_second_fills_under_a_quarter():
    for opts in (Options(report=True), Options(metrics=True)):
        assert opts.quiet_tick_ms == 1000
        assert next_tick_ms(opts, 0, 0, CAPACITY) == 1000             # the first drain
        assert next_tick_ms(opts, 0, 1000, CAPACITY) == 1000          # idle
        assert next_tick_ms(opts, 10_000, 1000, CAPACITY) == 1000     # a quarter a second
        assert next_tick_ms(opts, 10_001, 1000, CAPACITY) == 100      # more: every tick
        # the rate counts, not the count: 1,001 in a 100 ms drain is 10,010 a second
        assert next_tick_ms(opts, 1_001, 100, CAPACITY) == 100
        assert next_tick_ms(opts, 1_000, 100, CAPACITY) == 1000
        # a drain sooner than a tick (a slow batch before it) is rated over a tick
        assert next_tick_ms(opts, 1_000, 10, CAPACITY) == 1000


def test_report_intervals_get_four_drains_each_at_least():
    assert Options(report=True, interval=2.0).quiet_tick_ms == 500
    assert Options(report=True, interval=10.0).quiet_tick_ms == 1000
    assert Options(report=True, interval=0.2).quiet_tick_ms == 100     # never under a tick
