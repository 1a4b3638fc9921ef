"""Samples (readings of the kernel's tables and counters, host/samplers.py) travel as records:
in time order with the events, into the detectors' sample hook, and through a recording."""
import io

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
        def __init__(self, flt):
            self.flt = flt
    got = samplers_for([type("D", (), {"SAMPLERS": (A,)})(), type("E", (), {"SAMPLERS": (A,)})(),
                        object()], "the filter")
    assert [(type(x), x.flt) for x in got] == [(A, "the filter")]


def test_a_pipeline_with_samples_writes_no_finding_for_them():
    out = io.StringIO()
    pipe = Pipeline(Options(json=True), JsonSink(out, 0))
    pipe.feed(Batch([Sample(SEC, "x", 1, {})], 2 * SEC))
    pipe.finish()
    assert out.getvalue() == ""
