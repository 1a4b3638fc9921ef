"""The metrics sink (output/metrics.py): what /metrics says of findings, and labels that stay
bounded however many destinations a host talks to."""
import tracemalloc

import pytest

from tcptrace import states as S
from tcptrace.findings import Connect, Finding
from tcptrace.output import metrics as M

prometheus_client = pytest.importorskip("prometheus_client")


def scrape(m):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    reg = CollectorRegistry()
    reg.register(M.Collector(m))
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def connect(raddr, rport, hs_ns, comm="curl"):
    return Connect(1, 7, comm, S.AF_INET, "10.0.0.1", 40000, raddr, rport, False, False,
                   "active", hs_ns, 0)


def test_findings_become_counters_and_a_histogram():
    m = M.Metrics("dest")
    for hs in (10_000, 20_000, 1_000_000):
        m.add(connect("10.0.0.2", 443, hs))
    m.add(Finding("refused", 2, 7, "curl", S.AF_INET, None, None, "10.0.0.3", 81,
                  reason="refused"))
    m.add(Finding("reset", 3, reset_by="remote"))
    m.add(Finding("lost", 4, count=5, where="bpf:state", lost_total=5))
    got = scrape(m)
    dest = (("dest", "10.0.0.2:443"),)
    assert got[("tcptrace_connects_total", dest)] == 3
    assert got[("tcptrace_handshake_seconds_count", dest)] == 3
    assert got[("tcptrace_handshake_seconds_sum", dest)] == pytest.approx(0.00103)
    # cumulative buckets: 10 us and 20 us fall at or below 21 us, 1 ms not until 1.09 ms
    le = lambda v: got[("tcptrace_handshake_seconds_bucket",                 # noqa: E731
                        (("dest", "10.0.0.2:443"), ("le", repr(v))))]
    b = M.BUCKETS_S
    assert le(next(x for x in b if x >= 20e-6)) == 2 and le(next(x for x in b if x >= 1e-3)) == 3
    assert got[("tcptrace_connect_failures_total",
                (("cause", "refused"), ("dest", "10.0.0.3:81")))] == 1
    assert got[("tcptrace_resets_total", (("by", "remote"),))] == 1
    assert got[("tcptrace_lost_events_total", (("source", "bpf:state"),))] == 5


def test_labels_stay_bounded_with_100k_destinations():
    m = M.Metrics("dest")
    tracemalloc.start()
    for i in range(100_000):
        m.add(connect(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 443, 10_000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(m.connects) == M.MAX_SERIES + 1 and "other" in m.connects
    assert m.connects["other"] == 100_000 - M.MAX_SERIES
    assert m.overflow == 100_000 - M.MAX_SERIES
    assert peak < 20 * 2 ** 20          # bounded: a thousand histograms, not 100k
    assert scrape(m)[("tcptrace_label_overflow_total", ())] == m.overflow


@pytest.mark.parametrize("by,label", [("port", ("port", "443")), ("comm", ("comm", "curl"))])
def test_by_chooses_the_label(by, label):
    m = M.Metrics(by)
    m.add(connect("10.0.0.2", 443, 10_000))
    assert scrape(m)[("tcptrace_connects_total", (label,))] == 1


def test_the_served_text_is_rendered_again_only_after_a_change(monkeypatch):
    """/metrics renders the histograms only when the metrics changed since the last render:
    a scrape of unchanged numbers costs the process metrics alone, and serves the same text."""
    from prometheus_client import exposition
    m = M.Metrics("dest")
    m.add(connect("10.0.0.2", 443, 10_000))
    ex = M._Exposition(m)
    renders = []
    real = exposition.generate_latest

    def counting(registry):
        renders.append(registry is ex.ours)
        return real(registry)
    monkeypatch.setattr("prometheus_client.generate_latest", counting)
    first = ex.render()
    second = ex.render()
    assert renders.count(True) == 1 and renders.count(False) == 2
    ours = lambda text: [l for l in text.decode().splitlines()              # noqa: E731
                         if not l.startswith(("process_", "tcptrace_process_", "# "))]
    assert ours(first) == ours(second) and b'tcptrace_connects_total{dest="10.0.0.2:443"} 1.0' in first
    m.add(connect("10.0.0.2", 443, 10_000))
    third = ex.render()
    assert renders.count(True) == 2
    assert b'tcptrace_connects_total{dest="10.0.0.2:443"} 2.0' in third


def test_the_endpoint_serves_metrics_and_nothing_else():
    import socket
    import urllib.error
    import urllib.request
    m = M.Metrics("dest")
    m.add(connect("10.0.0.2", 443, 10_000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    M.serve(m, "127.0.0.1", port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        assert b'tcptrace_connects_total{dest="10.0.0.2:443"} 1.0' in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert e.value.code == 404
