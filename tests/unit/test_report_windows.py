"""report --interval (issue 17, item 7): each window says when it began and how long it really
was, is cut by the findings' own times (a backlog processed late lands where it happened), an
idle window is still printed, and so is the last, shorter one."""
import io
import json

from tcptrace.options import Options
from tcptrace.output.report import ReportSink
from tcptrace.session import Pipeline
from tcptrace.wire import Batch
from streams import MS, SEC, active_close, active_open

WALL = 1_700_000_000 * SEC


def connection(t, i):
    return active_open(t, 0x1000 + i, 40000 + i, 443) + active_close(t + MS, 0x1000 + i,
                                                                      40000 + i, 443)


def windows(batches, start_ns, interval=1.0):
    out = io.StringIO()
    opts = Options(report=True, json=True, interval=interval)
    pipe = Pipeline(opts, ReportSink(out, WALL, as_json=True, interval=interval,
                                     start_ns=start_ns))
    for b in batches:
        pipe.feed(b)
    pipe.finish()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_windows_are_cut_by_event_time_and_say_their_span():
    start = 10 * SEC
    # 3 connections in the first second, none in the second, 2 in the third; all of the first
    # second's records arrive late, in the batch of 2.5 s (a tracer behind under load)
    first = [r for i in range(3) for r in connection(start + 100 * MS + i * 10 * MS, i)]
    third = [r for i in range(3, 5) for r in connection(start + 2 * SEC + 100 * MS + i * MS, i)]
    batches = [Batch([], start + 500 * MS), Batch(first, start + 2500 * MS),
               Batch(third, start + 2600 * MS)]
    got = windows(batches, start)
    assert [w["counts"].get("connect", 0) for w in got] == [3, 0, 2]
    assert [w["start"] for w in got] == [f"2023-11-14T22:13:{30 + i:02d}.000000Z"
                                         for i in range(3)]
    assert [w["duration_ns"] for w in got[:2]] == [SEC, SEC]
    assert all(w["interval_s"] == 1.0 for w in got)
    last = got[-1]
    assert 0 < last["duration_ns"] < SEC          # the run ended inside its third second
    assert sum(w["transitions"][0]["count"] for w in got if w["transitions"]) > 0


def test_an_idle_run_still_prints_its_only_window():
    """`report --interval 1000 --duration 2` printed nothing at all."""
    start = 5 * SEC
    got = windows([Batch([], start + 1 * SEC), Batch([], start + 2 * SEC)], start,
                  interval=1000.0)
    assert len(got) == 1
    w = got[0]
    assert w["counts"] == {} and w["interval_s"] == 1000.0
    assert w["start"] == "2023-11-14T22:13:25.000000Z"
    assert 1 * SEC <= w["duration_ns"] <= 2 * SEC


def test_text_windows_are_headed_by_their_span():
    out = io.StringIO()
    opts = Options(report=True, interval=1.0)
    start = 10 * SEC
    pipe = Pipeline(opts, ReportSink(out, WALL, interval=1.0, start_ns=start))
    pipe.feed(Batch(connection(start + 100 * MS, 0), start + 1500 * MS))
    pipe.feed(Batch(connection(start + 1200 * MS, 1), start + 2800 * MS))
    pipe.finish()
    heads = [line for line in out.getvalue().splitlines() if line.startswith("REPORT ")]
    assert heads[0] == "REPORT 2023-11-14 22:13:30.000 .. 22:13:31.000 UTC (1.00s)"
    assert heads[1] == "REPORT 2023-11-14 22:13:31.000 .. 22:13:32.000 UTC (1.00s)"
    # the run ended where the clock was last known (the horizon less the ordering window)
    assert heads[2] == "REPORT 2023-11-14 22:13:32.000 .. 22:13:32.780 UTC (780.0ms)"
    assert len(heads) == 3
