"""The metrics sink (output/metrics.py): what /metrics says of findings, and labels that stay
bounded however many destinations a host talks to."""
import tracemalloc

import pytest

from tcptrace import states as S
from tcptrace.findings import Connect, Finding
from tcptrace.output import metrics as M

prometheus_client = pytest.importorskip("prometheus_client")


def scrape(m):
    """{(sample name, labels): value} of what /metrics says of m, read by prometheus_client's
    parser."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(M.render(m)):
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


def test_the_served_text_is_rendered_again_only_after_a_change():
    """/metrics renders our metrics only when they changed since the last render: a scrape of
    unchanged numbers serves the same text."""
    m = M.Metrics("dest")
    m.add(connect("10.0.0.2", 443, 10_000))
    ex = M._Exposition(m)
    first = ex.render()
    second = ex.render()
    assert ex.renders == 1
    ours = lambda text: [l for l in text.decode().splitlines()              # noqa: E731
                         if not l.startswith(("process_", "tcptrace_process_", "# "))]
    assert ours(first) == ours(second) and b'tcptrace_connects_total{dest="10.0.0.2:443"} 1\n' in first
    m.add(connect("10.0.0.2", 443, 10_000))
    third = ex.render()
    assert ex.renders == 2
    assert b'tcptrace_connects_total{dest="10.0.0.2:443"} 2\n' in third


def test_scrapes_at_once_render_once(monkeypatch):
    """Scrapes that arrive while one renders wait for it and serve its text, rather than each
    rendering the same numbers again (which, slower for each other, outlast the scrape
    timeout: tests/kernel/test_metrics_kernel.py in the emulated guest)."""
    import threading
    m = M.Metrics("dest")
    m.add(connect("10.0.0.2", 443, 10_000))
    ex = M._Exposition(m)
    inside, go = threading.Event(), threading.Event()
    real = M.render

    def slow(metrics):
        inside.set()
        assert go.wait(10)
        return real(metrics)
    monkeypatch.setattr(M, "render", slow)
    got = []
    first = threading.Thread(target=lambda: got.append(ex.render()))
    first.start()
    assert inside.wait(10)
    others = [threading.Thread(target=lambda: got.append(ex.render())) for _ in range(4)]
    for t in others:
        t.start()
    go.set()
    for t in [first] + others:
        t.join(10)
    assert ex.renders == 1 and len(got) == 5
    assert all(b'tcptrace_connects_total{dest="10.0.0.2:443"} 1\n' in g for g in got)


def test_promtool_finds_the_text_well_formed():
    """Prometheus's own linter (promtool check metrics) on a text with every family, a
    histogram, and a label value that needs escaping."""
    import shutil
    import subprocess
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (scripts/setup.sh installs prometheus)")
    m = M.Metrics("comm")
    m.add(connect("10.0.0.2", 443, 10_000, comm='a "quoted\\ name\n"'))
    m.add(Finding("refused", 2, 7, "curl", S.AF_INET, None, None, "10.0.0.3", 81,
                  reason="refused"))
    m.add(Finding("reset", 3, reset_by="remote"))
    m.stuck = {"CLOSE_WAIT": 3}
    text = M.render(m)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert scrape(m)[("tcptrace_connects_total", (("comm", 'a "quoted\\ name\n"'),))] == 1


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
        assert b'tcptrace_connects_total{dest="10.0.0.2:443"} 1\n' in r.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert e.value.code == 404
