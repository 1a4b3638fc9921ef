"""Samples (readings of the kernel's tables and counters, host/samplers.py) travel as records:
in time order with the events, into the detectors' sample hook, and through a recording."""
import io
import time

from tcptrace.detect.base import Detector
from tcptrace.lifecycle import Tracker
from tcptrace.options import Options
from tcptrace.output.jsonl import JsonSink
from tcptrace.recording import Recorder, RecordingSource
from tcptrace.session import Pipeline, run, samplers_for
from tcptrace.wire import Batch, Sample
from streams import MS, SEC, active_open


class Seen(Detector):
    SAMPLERS = ("a sampler factory",)

    def __init__(self, tr):
        super().__init__(tr)
        self.got = []

    def sample(self, rec):
        self.got.append((rec.ts_ns, rec.what, rec.netns, rec.data, len(self.tr.table)))


def test_samples_reach_the_sample_hook_in_time_order_with_the_events():
    tr = Tracker(detectors=[Seen])
    seen = tr.detector(Seen)
    recs = active_open(SEC, 0xA, 40000, 80) + [Sample(SEC - MS, "x", 7, {"n": 1}),
                                               Sample(SEC + SEC, "x", 7, {"n": 2})]
    for r in sorted(recs, key=lambda r: r.ts_ns):
        tr.process(r)
    assert seen.got == [(SEC - MS, "x", 7, {"n": 1}, 0), (2 * SEC, "x", 7, {"n": 2}, 1)]


def test_samples_are_recorded_and_replayed_as_they_were(tmp_path):
    path = str(tmp_path / "r.jsonl")
    rec = Recorder(path, 1_700_000_000 * SEC, "plan")
    s = Sample(SEC, "listeners", 4026531833, {"listeners": [{"lport": 80, "rqueue": 5}]})
    rec.write(Batch(active_open(SEC, 0xA, 40000, 80) + [s], 2 * SEC))
    rec.close()
    src = RecordingSource(path)
    got = [r for b in src.batches() for r in b.records if type(r) is Sample]
    assert got == [s]


def test_the_live_source_runs_the_samplers_the_detectors_ask_for():
    class A:
        def __init__(self, **scope):
            self.scope = scope
    got = samplers_for([type("D", (), {"SAMPLERS": (A,)})(), type("E", (), {"SAMPLERS": (A,)})(),
                        object()], ports=[80], families=[2])
    assert [(type(x), x.scope) for x in got] == [(A, {"ports": [80], "families": [2]})]


def test_a_pipeline_with_samples_writes_no_finding_for_them():
    out = io.StringIO()
    pipe = Pipeline(Options(json=True), JsonSink(out, 0))
    pipe.feed(Batch([Sample(SEC, "x", 1, {})], 2 * SEC))
    pipe.finish()
    assert out.getvalue() == ""


def test_samplers_run_on_their_own_thread_and_readings_wait_for_a_poll_after_them():
    """A slow dump must not hold up the poll loop: samplers run on a thread; a reading is
    stamped when its dump is done and handed over by a poll whose clock is past that (so it
    is in order with that poll's events, and never late)."""
    import threading
    import time
    from tcptrace.host.samplers import Background, Sampler

    class Slow(Sampler):
        name = "slow"
        period_ns = 10 * MS

        def __init__(self):
            self.threads = set()

        def sample(self, now_ns):
            self.threads.add(threading.current_thread().name)
            time.sleep(0.02)
            return [Sample(now_ns, self.name, 1, {"at": now_ns})]

        def describe(self):
            return "slow: described"
    slow = Slow()
    bg = Background([slow])
    bg.start()
    t0 = time.monotonic()
    got = []
    assert bg.take(0) == []                   # nothing finished before the clock's start
    while len(got) < 2 and time.monotonic() - t0 < 5:
        now = time.monotonic_ns()
        took = bg.take(now)
        assert all(r.data["at"] < r.ts_ns <= now for r in took)
        got += took
        time.sleep(0.005)
    notes = bg.close()
    assert notes[0] == "slow: described"
    n = int(notes[1].split()[2])             # "sampler slow: N readings, X ms CPU"
    assert notes[1] == f"sampler slow: {n} readings, {notes[1].split()[4]} ms CPU" and n >= 2
    assert len(notes) == 2
    assert len(got) >= 2 and got[1].ts_ns - got[0].ts_ns >= 20 * MS     # its dump's time
    assert slow.threads == {"tcptrace-sampler-slow"}

    class Broken(Slow):
        name = "broken"

        def sample(self, now_ns):
            raise ValueError("boom")
    # one sampler failing stops only its own thread: the others keep reading
    still = Slow()
    bg = Background([Broken(), still])
    bg.start()
    got, t0 = [], time.monotonic()
    while len(got) < 3 and time.monotonic() - t0 < 5:
        got += bg.take(time.monotonic_ns())
        time.sleep(0.005)
    notes = bg.close()
    assert len(got) >= 3 and {r.what for r in got} == {"slow"}
    assert notes[-1] == "sampler broken stopped: ValueError: boom"


def test_a_slow_sampler_does_not_hold_up_another():
    """A TIME_WAIT reading that takes seconds (a storm's table in the emulated guest) must not
    stop the listeners from being read every period: each sampler has its own thread."""
    import threading
    import time
    from tcptrace.host.samplers import Background, Sampler

    release = threading.Event()

    class Stuck(Sampler):
        name = "stuck"
        period_ns = 10 * MS

        def sample(self, now_ns):
            release.wait(10)
            return []

    class Quick(Sampler):
        name = "quick"
        period_ns = 10 * MS

        def sample(self, now_ns):
            return [Sample(now_ns, self.name, 1, {})]
    bg = Background([Stuck(), Quick()])
    bg.start()
    got, t0 = [], time.monotonic()
    while len(got) < 5 and time.monotonic() - t0 < 5:
        got += bg.take(time.monotonic_ns())
        time.sleep(0.005)
    release.set()
    bg.close()
    assert len(got) >= 5 and {r.what for r in got} == {"quick"}


def test_finish_waits_for_the_reading_in_progress_and_hands_it_over():
    """A run shorter than a reading still gets it: the last batch takes what finish() returns
    (a short run's listen sampler has a single reading, made while it ran)."""
    import threading
    from tcptrace.host.samplers import Background, Sampler

    started = threading.Event()

    class Slow(Sampler):
        name = "slow"
        period_ns = 10 * SEC

        def sample(self, now_ns):
            started.set()
            import time
            time.sleep(0.2)
            return [Sample(now_ns, self.name, 1, {})]
    bg = Background([Slow()])
    bg.start()
    started.wait(5)
    got = bg.finish()
    assert [r.what for r in got] == ["slow"]
    assert bg.finish() == []


def test_samplers_run_only_for_findings_the_output_shows():
    from tcptrace.detect.listen import Listeners
    from tcptrace.detect.timewait import TimeWaits
    from tcptrace.host.samplers import Listeners as ListenSampler
    from tcptrace.host.timewait import TimeWaitSampler
    from tcptrace.filters import Filter
    from tcptrace.session import shown_types
    ds = [Listeners, TimeWaits]
    kinds = lambda opts: {type(s) for s in samplers_for(ds, shown_types(opts))}
    assert kinds(Options()) == {ListenSampler, TimeWaitSampler}                 # watch
    assert kinds(Options(report=True)) == {ListenSampler, TimeWaitSampler}
    assert kinds(Options(metrics=True)) == {ListenSampler}     # listeners a connect waited on
    only = Filter(types=frozenset({"reset", "stuck"}))
    assert kinds(Options(filter=only)) == set()
    assert kinds(Options(filter=only, record="r")) == {ListenSampler, TimeWaitSampler}
    assert kinds(Options(filter=Filter(types=frozenset({"time_wait"})))) == {TimeWaitSampler}


def test_time_wait_is_sampled_every_5_s_watch_every_second_near_port_pressure():
    from tcptrace.host.timewait import TimeWaitSampler
    from tcptrace.session import shown_types

    def periods(**kw):
        """The period after a cheap sample that found no namespace near port pressure, and
        after one that did."""
        opts = Options(**kw)
        pipe = Pipeline(opts, JsonSink(io.StringIO(), 0))
        [tw] = [s for s in samplers_for(pipe.tracker.detectors, shown_types(opts))
                if type(s) is TimeWaitSampler]
        out = []
        for near in (False, True):
            tw.near = near
            out.append(tw.next_period_ns(0) / SEC)
        # Only --transitions shows exits when a dump no longer has the sock: report's matrix
        # counts them by the 60 s rule (test_timewait), and nothing else reads them
        assert tw.follow is bool(kw.get("transitions"))
        return tuple(out)
    assert periods(json=True) == (5, 1)       # 1: near port pressure (next tests)
    assert periods(json=True, transitions=True) == (5, 1)
    assert periods(report=True) == (5, 5)
    assert periods(report=True, transitions=True) == (5, 5)
    assert periods(report=True, interval=2.5) == (2.5, 2.5)
    assert periods(report=True, interval=60) == (5, 5)
    assert periods(report=True, interval=0.2) == (1, 1)


def test_a_destination_is_near_port_pressure_at_half_of_it_or_growing_to_it_in_5_s():
    from tcptrace.host.timewait import near
    d, e = ("10.0.0.1", "10.0.0.2", 80), ("10.0.0.1", "10.0.0.3", 80)
    # 1,000 ports, threshold 0.8: near at 400 in use, or on course for 800 five seconds on
    assert not near({}, {d: 399}, 10, 1000, 0.8, 5)         # 39.9/s: 599 in 5 s
    assert near({}, {d: 400}, 10, 1000, 0.8, 5)
    assert near({d: 300}, {d: 399, e: 1}, 1, 1000, 0.8, 5)  # +99/s: 894 in 5 s
    assert not near({d: 350}, {d: 399}, 1, 1000, 0.8, 5)    # +49/s: 644 in 5 s
    assert not near({d: 399}, {d: 10}, 1, 1000, 0.8, 5)     # shrinking
    assert near({d: 399}, {d: 10, e: 360}, 4, 1000, 0.8, 5)   # a new one: 0 -> 360 in 4 s
    assert not near({d: 1}, {d: 1}, 0, 1000, 0.8, 5)


def test_watch_samples_every_second_while_a_destination_is_near(monkeypatch):
    """The sampler's own rows decide: the period after a dump is a second while near() holds
    for one of the namespace's destinations, 5 s after."""
    from tcptrace.host import timewait

    class Diag:
        def dump(self, *a, **k):
            return []

        def raw(self, *a, **k):
            return []

    class Ns(timewait._Namespace):
        def __init__(self):
            self.base, self.tw, self.in_use, self.in_use_ns = "base", {}, {}, None
            self.diag = Diag()

        def settings(self):
            return {"ip_local_port_range": [40000, 40999], "tcp_tw_reuse": 2,
                    "tcp_max_tw_buckets": 1000}

    class One:
        def get(self, now_ns):
            return {1: "base"}

    monkeypatch.setattr(timewait.counters, "sockstat", lambda base: {"tw": 0})
    monkeypatch.setattr(timewait.counters, "tcp_counters", lambda base: {})
    s = timewait.TimeWaitSampler(One(), calm_period_ns=5 * SEC, threshold=0.8)
    s.open[1] = Ns()
    periods = []
    for t, used in ((0, 400), (1, 100), (6, 200), (11, 500), (12, 300), (17, 300)):
        monkeypatch.setattr(timewait, "aggregate", lambda *a, n=used: (
            [["10.0.0.1", "10.0.0.2", 80, n, 0]], [], [], {}))
        s.sample(t * SEC)
        periods.append(s.period_ns // SEC)
    # 400 used (half of 0.8) at the first dump; 100: falling; 20/s: 300 in 5 s; 500 used;
    # falling; still
    assert periods == [1, 5, 5, 1, 5, 5]


def test_the_time_wait_period_stretches_past_its_floor_only_for_the_cpu_budget():
    from tcptrace.host import timewait

    class Busy(timewait.TimeWaitSampler):
        def _one(self, ino, base, now_ns):         # a namespace reading that costs CPU
            t = time.thread_time_ns()
            while time.thread_time_ns() - t < self.cost_ns:
                pass
            return Sample(now_ns, self.name, ino, {})

    class One:
        def get(self, now_ns):
            return {1: "base"}
    for floor_s, cost_ms in ((1, 1), (5, 1), (1, 100), (5, 100)):
        s = Busy(namespaces=One(), period_ns=floor_s * SEC)
        s.cost_ns = cost_ms * 1_000_000
        s.sample(0)
        # the budget's period: the sample's CPU over BUDGET (at least cost / 0.05)
        want = max(floor_s, cost_ms / 1000 / timewait.BUDGET)
        assert want <= s.period_ns / SEC < max(floor_s, 1.5 * want), (floor_s, cost_ms)
