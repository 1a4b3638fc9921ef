"""--max-conns: the tracker drops its oldest connections beyond the cap, and must not change
what it reports about them except to mark it (issue 17, item 1), and a listener is never
mistaken for a connection (item 8)."""
import collections

import pytest

from tcptrace import states as S
from tcptrace.lifecycle import Tracker
from streams import (MS, SEC, active_close, active_open, grouped, listen, passive_close,
                     passive_open, state)

LISTEN_SK = 0xC1


def held_connections(n, hold_s=1):
    """A listener, then n loopback connections opened 1 ms apart, all held open hold_s, then
    closed by the client: one process, as in the issue's reproduction."""
    recs = listen(SEC - MS, LISTEN_SK, 8080)
    for i in range(n):
        t = SEC + i * MS
        recs += active_open(t, 0x10000 + i, 40000 + i, 8080)
        recs += passive_open(t + 60_000, 0x20000 + i, 8080, 40000 + i)
    for i in range(n):
        t = SEC + hold_s * SEC + i * MS
        recs += active_close(t, 0x10000 + i, 40000 + i, 8080)
        recs += passive_close(t + 500, 0x20000 + i, 8080, 40000 + i)
    recs += [state(3 * SEC + hold_s * SEC, LISTEN_SK, S.LISTEN, S.CLOSE, pid=200, comm="server",
                   lport=8080, raddr="0.0.0.0")]
    return recs


def run(recs, **kw):
    tr = Tracker(**kw)
    out = []
    for r in sorted(recs, key=lambda r: r.ts_ns):
        while tr.now_ns and tr.now_ns + 100 * MS < r.ts_ns:
            tr.tick(tr.now_ns + 100 * MS)
        tr.process(r)
    tr.tick(tr.now_ns + SEC)
    tr.finish()
    return tr, out + tr.take()


# The kernel sends held sockets' opening steps early (after hold_ns) and again with their close:
# hold_0 makes every held socket's steps come twice.
@pytest.mark.parametrize("hold_ns", [None, 0, 50 * MS], ids=["no_hold", "hold_0", "hold_50ms"])
def test_eviction_never_repeats_a_finding(hold_ns):
    n = 200
    recs = grouped(held_connections(n), hold_ns=hold_ns)
    tr, out = run(recs, max_conns=16)
    types = collections.Counter(f.type for f in out)
    assert types["connect"] == n and types["accept"] == n
    assert types["close"] == 2 * n
    assert tr.table.evicted > 0
    # each connection once: no finding about the same socket end twice
    ends = collections.Counter((f.type, f.lport, f.rport) for f in out
                               if f.type in ("connect", "accept", "close"))
    assert max(ends.values()) == 1


def test_findings_about_evicted_connections_are_marked_and_otherwise_unchanged():
    n = 40
    recs = grouped(held_connections(n), hold_ns=0)
    _, want = run(recs)
    _, got = run(recs, max_conns=16)
    key = lambda f: (f.type, f.lport, f.rport)      # noqa: E731
    want = {key(f): f.to_record(0) for f in want if f.type != "evicted"}
    marked = 0
    for f in got:
        if f.type == "evicted":
            continue
        rec = f.to_record(0)
        if rec.pop("evicted", False):
            marked += 1
            # what the tracker could not keep is marked unknown, as for a partial connection
            assert rec.get("partial") is True
            assert rec.get("duration_ns") is None
        else:
            assert rec == want[key(f)]
    assert marked > 0


def test_eviction_is_in_the_output_not_only_on_stderr():
    recs = grouped(held_connections(40), hold_ns=0)
    tr, out = run(recs, max_conns=16)
    ev = [f for f in out if f.type == "evicted"]
    assert ev, "no evicted record"
    assert ev[-1].evicted_total == tr.table.evicted and ev[-1].max_conns == 16
    assert sum(f.count for f in ev) == tr.table.evicted


def test_listeners_are_never_evicted_and_never_reported_as_a_connection():
    recs = grouped(held_connections(40), hold_ns=0)
    _, out = run(recs, max_conns=16)
    assert not [f for f in out if f.lport == 8080 and f.raddr == "0.0.0.0"]
    accepts = [f for f in out if f.type == "accept"]
    assert {(f.pid, f.comm) for f in accepts} == {(200, "server")}


def test_a_listener_that_existed_before_start_closes_without_a_finding():
    """Item 8: LISTEN -> CLOSE of a listener seeded from /proc (or never seen) is no close."""
    tr = Tracker()
    tr.seed(S.AF_INET, "0.0.0.0", 8080, "0.0.0.0", 0, S.LISTEN, SEC, owner=(55, "haproxy", 3))
    tr.process(state(2 * SEC, LISTEN_SK, S.LISTEN, S.CLOSE, pid=55, comm="haproxy",
                     lport=8080, raddr="0.0.0.0"))
    tr.finish()
    assert tr.take() == []


def test_the_evicted_record_passes_every_filter():
    from tcptrace import filters
    from tcptrace.findings import Finding
    f = filters.build(pid=[5], comm=["x"], port=[81], ipv4=True)
    assert f.match(Finding("evicted", 1, count=1, evicted_total=1, max_conns=16))
    assert not f.match(Finding("connect", 1, 6, "y", S.AF_INET6, "::1", 1, "::1", 2))
