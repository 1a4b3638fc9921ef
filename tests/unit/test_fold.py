"""Folded connections (bpf/aggregate.c -> kernel/aggregates.py -> detect/folded.py -> report and
metrics) give the report the full stream gives. `fold()` below is a model of the kernel's
choice (the C's conditions, the Python buckets: test_histogram_kernel.py shows the C's equal
them) applied to what the kernel would send (streams.grouped); the two reports are compared."""
import io
import json
import random

import pytest

from tcptrace import histogram, states as S
from tcptrace.filters import Filter
from tcptrace.options import Options
from tcptrace.output.metrics import Metrics
from tcptrace.output.report import ReportSink
from tcptrace.session import Pipeline
from tcptrace.wire import AGG, AGG_PASSIVE, AGG_REMOTE, Batch, Kind, Sample, F_HELD, F_OWNER, \
    endpoints, iter_steps
from streams import MS, SEC, Collect, active_close, active_open, grouped, listen, passive_close, \
    passive_open, state

HOLD = 50 * MS
SHAPES = {((S.CLOSE, S.SYN_SENT), (S.FIN_WAIT1, S.FIN_WAIT2)): 0,
          ((S.CLOSE, S.SYN_SENT), (S.CLOSE_WAIT, S.LAST_ACK)): AGG_REMOTE,
          ((S.LISTEN, S.SYN_RECV), (S.FIN_WAIT1, S.FIN_WAIT2)): AGG_PASSIVE,
          ((S.LISTEN, S.SYN_RECV), (S.CLOSE_WAIT, S.LAST_ACK)): AGG_PASSIVE | AGG_REMOTE}


def fold(records, at_ns):
    """What the kernel sends with folding on: records minus the healthy whole lives, and one
    aggregate reading at at_ns (cumulative = growth, as the first reading is)."""
    out, agg = [], {}
    for r in records:
        steps = list(iter_steps(r)) if getattr(r, "kind", None) == Kind.STATE else []
        shape = None
        if len(steps) == 5 and r.nsteps == 5 and not r.retrans and not r.rst_ns \
                and r.flags & (F_OWNER | F_HELD) == F_OWNER \
                and steps[4][0] - steps[0][0] < HOLD // 2 and steps[4][3] == S.CLOSE:
            shape = SHAPES.get(((steps[0][2], steps[0][3]), (steps[2][3], steps[3][3])))
        if shape is None:
            out.append(r)
            continue
        laddr, lport, raddr, rport = endpoints(r)
        key = (r.family, shape, laddr if shape & AGG_PASSIVE else raddr,
               lport if shape & AGG_PASSIVE else rport, r.comm.split(b"\0")[0].decode())
        a = agg.setdefault(key, [0, 0, 0, 0, {}])
        hs = steps[1][0] - steps[0][0]
        a[0] += 1
        a[3] += steps[4][0] - steps[0][0]
        if not shape & AGG_PASSIVE:
            a[1] += hs
            a[2] = max(a[2], hs)
            b = histogram.bucket(hs)
            a[4][b] = a[4].get(b, 0) + 1
    rows = [[fam, shape, False, addr, port, comm, n, hs, mx, life, sorted(h.items())]
            for (fam, shape, addr, port, comm), (n, hs, mx, life, h) in agg.items()]
    return out + [Sample(at_ns, AGG, 0, {"rows": rows})], sum(a[0] for a in agg.values())


def storm(seed=3, n=400):
    """Listeners, then n connections of both close orders with random handshakes, some
    refused, some reset, some long-lived: their one-transition events."""
    rng = random.Random(seed)
    recs = listen(SEC // 2, 0xF00, 80) + listen(SEC // 2, 0xF01, 443)
    t = SEC
    for i in range(n):
        sk, pk, lport, port = 0x1000 + 2 * i, 0x1001 + 2 * i, 30000 + i, rng.choice((80, 443))
        hs = int(rng.lognormvariate(10, 1)) + 2000
        life = rng.choice((5 * MS, 5 * MS, 5 * MS, 200 * MS))
        kind = rng.choice(("local", "remote", "local", "refused", "reset"))
        if kind == "refused":
            recs += [state(t, sk, S.CLOSE, S.SYN_SENT, pid=100, comm="client", rport=9),
                     state(t + hs, sk, S.SYN_SENT, S.CLOSE, pid=0, comm="swapper/0",
                           lport=lport, rport=9)]
            t += MS
            continue
        recs += active_open(t, sk, lport, port, hs=hs)
        recs += passive_open(t + hs // 2, pk, port, lport, pid=200, comm="server")
        if kind == "reset":
            recs += [state(t + life, sk, S.ESTABLISHED, S.CLOSE, pid=0, comm="swapper/0",
                           lport=lport, rport=port),
                     state(t + life, pk, S.ESTABLISHED, S.CLOSE, pid=0, comm="swapper/0",
                           lport=port, rport=lport)]
        elif kind == "local":
            recs += active_close(t + life, sk, lport, port)
            recs += passive_close(t + life + 500, pk, port, lport)
        else:
            recs += passive_close(t + life, sk, lport, port, pid=100, comm="client")
            recs += active_close(t + life + 500, pk, port, lport, pid=200, comm="server")
        t += MS
    return recs


def report(records, **kw):
    out = io.StringIO()
    opts = Options(json=True, report=True, **kw)
    pipe = Pipeline(opts, ReportSink(out, 0, as_json=True))
    end = max(r.ts_ns for r in records) + SEC
    pipe.feed(Batch(sorted(records, key=lambda r: r.ts_ns), end, (), ()))
    pipe.finish()
    return json.loads(out.getvalue()), pipe


def test_a_folded_report_equals_the_full_streams():
    sent = grouped(storm(), hold_ns=HOLD)
    end = max(r.ts_ns for r in sent) + MS
    folded, n = fold(sent, end)
    a, pa = report(folded)
    b, _ = report(sent)
    assert n > 300 and len(folded) < len(sent) - 300       # most lives were folded
    assert pa.tracker.stats.folded == n
    assert a["counts"] == {k: v for k, v in b["counts"].items()}
    for k in ("accepts", "failures", "resets", "closes", "handshake_histogram_us", "lost"):
        assert a[k] == b[k], k
    steps = lambda s: {(t["old"], t["new"]): t["count"] for t in s["transitions"]}
    assert steps(a) == steps(b)
    tw = lambda s: sorted((r["side"], r["addr"], r["port"], r["entries"]) for r in s["time_wait"])
    assert tw(a) == tw(b)
    rows = {(r["raddr"], r["rport"], r["comm"]): r for r in b["connects"]}
    assert len(a["connects"]) == len(rows) == 2
    for r in a["connects"]:
        e = rows[(r["raddr"], r["rport"], r["comm"])]
        assert (r["count"], r["max_ns"]) == (e["count"], e["max_ns"])
        for p in ("p50_ns", "p90_ns", "p99_ns"):
            # the middle of the exact percentile's bucket: the buckets hold the same values
            assert r[p] == min(histogram.middle_ns(histogram.bucket(e[p])), e["max_ns"])
            assert abs(r[p] - e[p]) <= 0.045 * e[p]


def test_folding_can_fail_this_test():
    """The comparison above sees a wrong fold: one dropped connection changes the counts."""
    sent = grouped(storm(), hold_ns=HOLD)
    folded, _ = fold(sent, max(r.ts_ns for r in sent) + MS)
    rows = folded[-1].data["rows"]
    rows[0][6] -= 1
    a, _ = report(folded)
    b, _ = report(sent)
    assert a["counts"] != b["counts"]


def test_metrics_count_folded_connections_as_the_full_stream():
    sent = grouped(storm(), hold_ns=HOLD)
    folded, _ = fold(sent, max(r.ts_ns for r in sent) + MS)
    got = []
    for recs in (folded, sent):
        m = Metrics("dest")
        sink = Collect()
        pipe2 = Pipeline(Options(json=True), sink)
        pipe2.feed(Batch(sorted(recs, key=lambda r: r.ts_ns), max(r.ts_ns for r in recs) + SEC,
                         (), ()))
        pipe2.finish()
        for f in sink.got:
            m.add(f)
        got.append(m)
    a, b = got
    assert a.connects == b.connects and a.accepts == b.accepts and a.closes == b.closes
    assert a.failures == b.failures
    for k in b.handshakes:
        assert a.handshakes[k][:-1] == b.handshakes[k][:-1]     # the same buckets
        assert a.handshakes[k][-1] == pytest.approx(b.handshakes[k][-1])


@pytest.mark.parametrize("kw,fold", [
    (dict(report=True), True),
    (dict(metrics=True), True),
    (dict(report=True, full_stream=True), False),
    (dict(report=True, record="r"), False),
    (dict(report=True, transitions=True), False),
    (dict(report=True, filter=Filter(pids=frozenset({1}))), False),
    (dict(report=True, filter=Filter(ports=frozenset({80}))), True),
    (dict(), False),
    (dict(filter=Filter(types=frozenset({"refused", "stuck"}))), True),
    (dict(filter=Filter(types=frozenset({"refused", "connect"}))), False),
])
def test_when_the_kernel_folds(kw, fold):
    assert Options(**kw).fold is fold


def test_only_keeps_the_asked_types_and_never_hides_losses():
    f = Filter(types=frozenset({"refused"}))
    mk = lambda t: type("F", (), {"type": t, "pid": 1, "comm": "x", "lport": 1, "rport": 2,
                                  "laddr": None, "raddr": None, "family": "ipv4"})()
    assert f.match(mk("refused")) and f.match(mk("lost")) and f.match(mk("evicted"))
    assert not f.match(mk("connect")) and not f.match(mk("aggregate"))
    assert Filter().match(mk("aggregate"))


def test_connections_beyond_the_key_bound_count_under_other():
    rows = [[2, 0, False, "10.0.0.1", 80, "curl", 5, 5 * 20_000, 30_000, 5 * MS,
             [[histogram.bucket(20_000), 5]]],
            [2, 0, True, None, None, None, 7, 7 * 40_000, 50_000, 7 * MS,
             [[histogram.bucket(40_000), 7]]],
            [2, AGG_PASSIVE | AGG_REMOTE, True, None, None, None, 3, 0, 0, 3 * MS, []]]
    s, pipe = report([Sample(SEC, AGG, 0, {"rows": rows})])
    assert s["counts"] == {"connect": 12, "accept": 3, "close": 15}
    assert {(r["raddr"], r["comm"]): r["count"] for r in s["connects"]} == \
        {("10.0.0.1", "curl"): 5, (None, "(other)"): 7}
    assert s["closes"] == {"local": 12, "remote": 3}
    assert pipe.tracker.stats.folded == 15
    from tcptrace.findings import Finding
    m = Metrics("dest")
    for other, addr in ((False, "10.0.0.1"), (True, None)):
        m.add(Finding("aggregate", SEC, comm="x", raddr=addr, rport=80, role="active",
                      closed_by="local", other=other, count=2, handshake_sum_ns=40_000,
                      handshake_max_ns=20_000, handshake_buckets={20: 2}, duration_sum_ns=0))
    assert m.connects == {"10.0.0.1:80": 2, "other": 2}
    assert m.handshakes["other"][20] == 2 and m.closes == {"local": 4} and m.folded == 4
