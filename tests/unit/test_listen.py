"""detect/listen.py: listener pressure from hand-built readings (host/samplers.py: Listeners),
SYN-ACK retransmits (TT_SYNACK) and overflow readings, shaped like the kernel's (the numbers of
the SYN flood and accept queue cases are LAB-FACTS.md's)."""
import functools

import pytest

from tcptrace import states as S
from tcptrace.detect import standard
from tcptrace.detect.listen import Listeners
from tcptrace.host.samplers import LISTEN_COUNTERS, owning_listener
from tcptrace.lifecycle import Tracker
from tcptrace.wire import OVERFLOWS, Kind, Sample
from streams import MS, SEC, ev, state

NS, NS2 = 4026532001, 4026532002
ADDR = "10.77.0.2"
SETTINGS = {"somaxconn": 4096, "tcp_max_syn_backlog": 64, "tcp_syncookies": 0,
            "tcp_synack_retries": 5}


def lsn(lport=8080, laddr=ADDR, family=S.AF_INET, **kw):
    d = {"family": family, "laddr": laddr, "lport": lport, "accept_queue": 0, "backlog": 16,
         "half_open": 0, "sockets": 1, "inode": lport, "pid": 50, "comm": "server"}
    d.update(kw)
    return d


def reading(ts, listeners, netns=NS, settings=SETTINGS, **counters):
    data = {"listeners": listeners, "counters": {k: counters.get(k, 0) for k in LISTEN_COUNTERS}}
    if settings is not None:
        data["settings"] = settings
    return Sample(ts, "listen", netns, data)


def synack(ts, lport=8080, laddr=ADDR, netns=NS, rport=40000, raddr="10.77.0.1"):
    return ev(Kind.SYNACK, ts, sk=0x1000, lport=lport, laddr=laddr,
              raddr=raddr, rport=rport, aux=netns, pid=0, comm="swapper/0")


def tracker(interval=2 * SEC, everything=False):
    if everything:
        return Tracker(pressure_interval_ns=interval)
    return Tracker(detectors=[functools.partial(Listeners, interval_ns=interval)])


def feed(tr, recs):
    out = []
    for r in sorted(recs, key=lambda r: r.ts_ns):
        tr.process(r)
        tr.tick(r.ts_ns)
        out += tr.take()
    return [f for f in out if f.type.startswith("listen")]


def run_all(recs):
    """Every finding of the whole tracker (all detectors) on recs, to the end."""
    tr = tracker(everything=True)
    out = []
    for r in sorted(recs, key=lambda r: r.ts_ns):
        tr.process(r)
        tr.tick(r.ts_ns)
        out += tr.take()
    tr.finish()
    return out + tr.take()


def test_a_syn_flood_without_cookies_is_reported_while_it_lasts_and_every_syn_counted_once():
    drops = [0, 0, 7000, 14000, 21000, 28000, 36411, 36411, 36411, 36411, 36411]
    recs = [reading(t * SEC, [lsn(backlog=16, half_open=17 if 2 <= t <= 6 else 0)],
                    ListenDrops=n, TCPReqQFullDrop=n) for t, n in enumerate(drops)]
    got = feed(tracker(), recs)
    assert [(f.type, f.ts_ns // SEC) for f in got] == [
        ("listen_pressure", 2), ("listen_pressure", 4), ("listen_pressure", 6),
        ("listen_recovered", 8)]
    first = got[0]
    assert first.reason == "SYN flood: request queue full (17/16), 7,000 SYNs dropped, " \
                           "no SYN cookies"
    assert (first.pid, first.comm, first.laddr, first.lport, first.netns) == \
        (50, "server", ADDR, 8080, NS)
    assert first.cause == ["request_queue_full"] and first.counters == "listener"
    assert first.interval_ns == SEC and first.half_open == 17
    assert sum(f.drops["total"] for f in got) == 36411
    assert sum(f.drops["request_queue_full"] for f in got) == 36411
    assert got[-1].episode["dropped"] == 36411 and got[-1].closed is False
    assert got[-1].duration_ns == 6 * SEC


def test_with_cookies_the_flood_is_answered_and_the_cookies_counted():
    recs = [reading(0, [lsn()], settings=dict(SETTINGS, tcp_syncookies=1)),
            reading(SEC, [lsn(half_open=17)], SyncookiesSent=34969, TCPReqQFullDoCookies=34969)]
    f, = feed(tracker(), recs)
    assert f.reason == "SYN flood: request queue full (17/16), answered with 34,969 SYN cookies"
    assert f.cookies == {"sent": 34969, "validated": 0, "failed": 0}
    assert f.drops["total"] == 0


def test_an_accept_queue_nobody_empties_then_accept_called_again():
    recs = [reading(0, [lsn(backlog=4)])]
    recs += [reading(t * SEC, [lsn(backlog=4, accept_queue=5)], ListenOverflows=45 * t,
                     ListenDrops=45 * t) for t in range(1, 4)]
    recs += [reading(t * SEC, [lsn(backlog=4)], ListenOverflows=135, ListenDrops=135)
             for t in range(4, 7)]
    got = feed(tracker(), recs)
    assert [(f.type, f.ts_ns // SEC) for f in got] == [
        ("listen_pressure", 1), ("listen_pressure", 3), ("listen_recovered", 5)]
    assert got[0].reason == ("accept queue full (5/4): the application is not calling "
                             "accept(), 45 SYNs and ACKs dropped")
    assert (got[0].accept_queue, got[0].backlog) == (5, 4)
    assert sum(f.drops["accept_queue_full"] for f in got) == 135
    assert got[-1].accept_queue == 0


def test_syn_ack_retransmits_are_the_listeners_own_and_their_late_retries_no_new_pressure():
    """A request's SYN-ACK retried after the pressure ended (retries space out up to
    tcp_synack_retries) is the tail of that pressure; a new request's is a new one."""
    recs = [reading(t * SEC, [lsn(), lsn(lport=9090, laddr="0.0.0.0")]) for t in range(12)]
    recs += [synack(SEC + MS, rport=40001), synack(SEC + 2 * MS, rport=40002),
             synack(8 * SEC + MS, rport=40001)]
    got = feed(tracker(), recs)
    assert [(f.type, f.lport, f.synack_retransmits) for f in got] == [
        ("listen_pressure", 8080, 2), ("listen_recovered", 8080, 0)]
    assert got[0].cause == ["synack_retransmits"] and got[0].counters is None
    got2 = feed(tracker(), recs + [synack(10 * SEC + MS, rport=40003)])
    assert [(f.type, f.ts_ns // SEC) for f in got2][-1] == ("listen_pressure", 11)


def test_syn_ack_retransmits_name_their_namespace_and_address():
    """The same port in two namespaces (containers): each namespace's SYN-ACKs are its own;
    a wildcard listener takes the SYN-ACKs of every address; a listener read only after its
    first SYN-ACK gets it at its first reading; without a namespace (no BTF) a unique match
    still counts."""
    recs = [reading(0, [lsn(laddr="0.0.0.0")]), reading(0, [lsn(laddr="0.0.0.0")], netns=NS2),
            synack(MS, netns=NS2), synack(2 * MS, netns=NS2, rport=40009),
            synack(3 * MS, netns=NS, laddr="10.9.9.9", lport=7070),    # not read yet
            reading(SEC, [lsn(laddr="0.0.0.0"), lsn(lport=7070, laddr="10.9.9.9")]),
            reading(SEC, [lsn(laddr="0.0.0.0"), lsn(lport=7070)], netns=NS2)]
    got = feed(tracker(), recs)
    assert sorted((f.netns, f.lport, f.synack_retransmits) for f in got) == \
        [(NS, 7070, 1), (NS2, 8080, 2)]
    assert feed(tracker(), [reading(0, [lsn(lport=6060)], netns=NS2), synack(MS, netns=0,
                                                                             lport=6060),
                            reading(SEC, [lsn(lport=6060)], netns=NS2)])[0].netns == NS2


def test_with_several_listeners_the_counters_go_where_the_kernel_shows_pressure():
    two = [lsn(), lsn(lport=22, laddr="0.0.0.0")]
    flooded = [lsn(half_open=17), lsn(lport=22, laddr="0.0.0.0")]
    got = feed(tracker(), [reading(0, two), reading(SEC, flooded, ListenDrops=500,
                                                     TCPReqQFullDrop=500)])
    assert [(f.lport, f.counters, f.drops["total"]) for f in got] == [(8080, "namespace", 500)]
    assert "namespace-wide" in got[0].reason
    # nobody shows pressure of their own: the namespace's, with no listener named
    got = feed(tracker(), [reading(0, two), reading(SEC, two, ListenDrops=30)])
    assert [(f.laddr, f.lport, f.listeners, f.drops["other"]) for f in got] == \
        [(None, None, 2, 30)]
    assert got[0].reason.startswith("30 SYNs dropped, the request queue near "
                                    "tcp_max_syn_backlog (64) and no SYN cookies")


def test_overflows_are_counted_per_listener_where_the_kernel_names_it():
    recs = [reading(0, [lsn(backlog=4), lsn(lport=22, laddr="0.0.0.0")]),
            Sample(SEC - MS, OVERFLOWS, 0, {"listeners": []}),
            Sample(SEC, OVERFLOWS, 0, {"listeners": [["ffff1", NS, S.AF_INET, 8080, 30]]}),
            reading(SEC + MS, [lsn(backlog=4, accept_queue=5), lsn(lport=22, laddr="0.0.0.0")],
                    ListenOverflows=30, ListenDrops=30),
            Sample(2 * SEC, OVERFLOWS, 0, {"listeners": [["ffff1", NS, S.AF_INET, 8080, 2]]})]
    got = feed(tracker(), recs)
    assert [(f.lport, f.overflows, f.drops["accept_queue_full"]) for f in got] == \
        [(8080, 30, 30)]
    d = feed(tracker(), recs[:1] + recs[3:4])
    assert d[0].overflows is None       # no per-listener count on this kernel: null, not 0


def test_a_listener_closed_under_pressure_recovers_as_closed():
    recs = [reading(0, [lsn()]), reading(SEC, [lsn(half_open=17)], ListenDrops=9,
                                          TCPReqQFullDrop=9),
            reading(2 * SEC, [], ListenDrops=9, TCPReqQFullDrop=9)]
    got = feed(tracker(), recs)
    assert [(f.type, getattr(f, "closed", None)) for f in got] == \
        [("listen_pressure", None), ("listen_recovered", True)]


def test_counters_that_went_down_are_a_new_namespace_not_negative_drops():
    recs = [reading(0, [lsn()], ListenDrops=500), reading(SEC, [lsn()], ListenDrops=3),
            reading(2 * SEC, [lsn()], ListenDrops=3)]
    assert feed(tracker(), recs) == []


def test_a_storm_against_a_healthy_listener_is_no_pressure():
    recs = [reading(t * SEC, [lsn(backlog=4096, accept_queue=t % 7, half_open=t % 3)])
            for t in range(10)]
    assert feed(tracker(), recs) == []


V4, V4ANY, V6ANY = (S.AF_INET, ADDR, 80), (S.AF_INET, "0.0.0.0", 80), (S.AF_INET6, "::", 80)


@pytest.mark.parametrize("family,laddr,keys,want", [
    (S.AF_INET, ADDR, {V4, V4ANY, V6ANY}, V4),             # its own address first
    (S.AF_INET, "10.77.0.9", {V4, V4ANY, V6ANY}, V4ANY),   # else its family's wildcard
    (S.AF_INET, "10.77.0.9", {V4, V6ANY}, V6ANY),          # else a dual-stack one
    (S.AF_INET6, "fd77::2", {V4, V4ANY, V6ANY}, V6ANY),
    (S.AF_INET6, "fd77::2", {V4, V4ANY}, None),            # IPv4 listeners take no IPv6
    (S.AF_INET, "10.77.0.9", {V4}, None),
])
def test_a_request_belongs_to_the_listener_on_its_address_else_a_wildcard_one(
        family, laddr, keys, want):
    assert owning_listener(family, laddr, 80, keys) == want


def client(t0, sk, rport, retrans, outcome, raddr=ADDR):
    """A connect to raddr:rport that needed `retrans` SYN retransmits, then completed
    ("ok") or timed out."""
    out = [state(t0, sk, S.CLOSE, S.SYN_SENT, pid=300, comm="curl", raddr=raddr, rport=rport)]
    out += [ev(Kind.RETRANS, t0 + (i + 1) * SEC, sk=sk, lport=50000, raddr=raddr, rport=rport)
            for i in range(retrans)]
    end = t0 + (retrans + 1) * SEC
    if outcome == "ok":
        out.append(state(end, sk, S.SYN_SENT, S.ESTABLISHED, pid=0, lport=50000, raddr=raddr,
                         rport=rport))
    else:
        out += [state(end, sk, S.SYN_SENT, S.CLOSE, pid=0, lport=50000, raddr=raddr,
                      rport=rport),
                ev(Kind.SOCK_ERROR, end + 1, lport=50000, raddr=raddr, rport=rport, err=110)]
    return out


def test_connects_that_waited_on_a_local_listener_under_pressure_name_it():
    flood = [reading(t * SEC, [lsn(half_open=17 if t >= 1 else 0)], ListenDrops=1000 * t,
                     TCPReqQFullDrop=1000 * t) for t in range(12)]
    recs = flood + client(SEC // 2, 0xC1, 8080, 5, "ok") + client(SEC, 0xC2, 8080, 3, "fail") \
        + client(2 * SEC, 0xC3, 9999, 2, "ok") + client(3 * SEC, 0xC4, 8080, 0, "ok")
    out = run_all(recs)
    conns = {f.raddr and (f.type, f.rport, f.syn_retransmits): getattr(f, "listener", None)
             for f in out if f.type in ("connect", "failed")}
    want = {"laddr": ADDR, "lport": 8080, "pid": 50, "comm": "server", "netns": NS,
            "cause": ["request_queue_full"]}
    assert conns == {("connect", 8080, 5): want, ("failed", 8080, 3): want,
                     ("connect", 9999, 2): None, ("connect", 8080, 0): None}


def test_a_connect_that_waited_through_a_flood_names_every_cause_it_met():
    """A SYN flood drops SYNs (request queue full) until 5 s; after it, only the flood's
    SYN-ACK retransmissions go on, and the listener's findings of those windows say just
    that. A client whose SYNs were dropped during the flood and let in at 7.5 s met both:
    its finding says both, in that order, not only the last window's cause (the CI VM, slower,
    let the client in only after the drops had stopped)."""
    drops = lambda t: 1000 * min(t, 5)
    flood = [reading(t * SEC, [lsn(half_open=17 if 1 <= t < 5 else 0)], ListenDrops=drops(t),
                     TCPReqQFullDrop=drops(t)) for t in range(12)]
    flood += [synack(t * SEC + MS, rport=41000 + t) for t in range(5, 10)]
    recs = flood + client(SEC // 2, 0xC1, 8080, 6, "ok")
    out = run_all(recs)
    windows = [f.cause for f in out if f.type == "listen_pressure"]
    assert windows[0] == ["request_queue_full"] and ["synack_retransmits"] in windows
    conn, = [f for f in out if f.type == "connect" and f.rport == 8080]
    assert conn.syn_retransmits == 6
    assert conn.listener["cause"] == ["request_queue_full", "synack_retransmits"]


def test_the_sampler_counts_request_socks_only_when_they_can_matter(monkeypatch):
    """host/samplers.py: counting request socks walks the host's whole connection table in
    the kernel, so a reading counts them when the namespace's counters moved and for
    refresh_every readings after, and every refresh_every-th reading; otherwise half_open is
    None (not while some are there: a busy healthy listener always has some)."""
    from tcptrace.host import samplers
    from tcptrace.host.diag import DiagSock
    state = {"counters": {"ListenDrops": 0}, "requests": 0, "asked": []}

    def dumps(diag, families, ports, requests):
        state["asked"].append(requests)
        if state.get("closed"):
            return [], None
        lsn = DiagSock(S.AF_INET, 10, 0, 0, ADDR, 80, "0.0.0.0", 0, 0, 0, 16, 0, 77, 1)
        req = DiagSock(S.AF_INET, 3, 0, 0, ADDR, 80, "10.77.0.1", 4000, 0, 0, 0, 0, 0, 2)
        return [lsn], ([req] * state["requests"] if requests else None)

    monkeypatch.setattr(samplers, "_dumps", dumps)
    monkeypatch.setattr(samplers.netns, "run_in", lambda base, fn: "a diag socket")
    monkeypatch.setattr(samplers.counters, "tcp_counters", lambda base: state["counters"])
    monkeypatch.setattr(samplers.counters, "sysctls", lambda base, names: {"somaxconn": 1})
    asked = []
    monkeypatch.setattr(samplers.owners, "inode_owners",
                        lambda inodes, likely: asked.append(likely) or {77: (5, "srv", 3)})
    ns = type("N", (), {"get": lambda self, now: {NS: "/proc/x"},
                        "pids": lambda self, ino: [9, 10] if ino == NS else []})()
    s = samplers.Listeners(namespaces=ns, refresh_every=5)
    half_open = []
    for moved, present in ((0, 0), (0, 3), (1, 2), (0, 2), (0, 0), (0, 0), (0, 0), (0, 3)):
        state["counters"] = {"ListenDrops": state["counters"]["ListenDrops"] + moved,
                             "ListenOverflows": 0}
        state["requests"] = present
        got, = s.sample(0)
        half_open.append(got.data["listeners"][0]["half_open"])
        assert got.data["listeners"][0]["pid"] == 5
    assert asked == [[9, 10]]       # once, among the namespace's own processes first
    # refresh, quiet (though some are there), moved, 4 after it (one a refresh), quiet again
    assert state["asked"] == [True, False, True, True, True, True, True, False]
    assert half_open == [0, None, 2, 2, 0, 0, 0, None]
    # drops with the accept queue full (its length shows it) count no request socks
    state["counters"] = {"ListenDrops": 9, "ListenOverflows": 8}
    s.sample(0)
    assert state["asked"][-1] is False
    # the listener closes: one last reading says so, then the namespace costs a dump only
    state["closed"] = True
    last, = s.sample(0)
    assert last.data["listeners"] == [] and last.data["counters"]["ListenDrops"] == 9
    assert s.sample(0) == []


def test_resets_a_listener_sends_under_pressure_are_counted_by_reason():
    """Bogus ACKs during a flood with cookies: each fails the cookie check and the listener
    resets it (tcp_send_reset names the listener, and on 6.10+ the reason); a listener is
    known by the skaddr its listen() had. Outside pressure they are no finding."""
    from tcptrace.wire import F_REASON, NAMES
    tr = tracker()
    recs = [state(1, 0x5000, S.CLOSE, S.LISTEN, pid=50, comm="server", lport=8080,
                  laddr=ADDR, raddr="0.0.0.0"),
            Sample(2, NAMES, 0, {"rst_reasons": {"6": "TCP_FLAGS"}}),
            reading(3, [lsn()], settings=dict(SETTINGS, tcp_syncookies=1)),
            ev(Kind.SEND_RESET, SEC // 2, sk=0x5000, aux=6, flags=F_REASON),   # no pressure
            reading(SEC, [lsn(half_open=17)], SyncookiesSent=900, SyncookiesFailed=2)]
    recs += [ev(Kind.SEND_RESET, SEC + i, sk=0x5000, aux=6, flags=F_REASON) for i in (1, 2)]
    recs += [ev(Kind.SEND_RESET, SEC + 3, sk=0x5000),                   # no reason (6.1)
             ev(Kind.SEND_RESET, SEC + 4, sk=0x7777, aux=6, flags=F_REASON),   # not a listener
             reading(4 * SEC, [lsn()], SyncookiesSent=900, SyncookiesFailed=2)]
    tr.process(recs[0])     # the listen() transition
    got = feed(tr, recs[1:])
    assert [(f.type, f.resets) for f in got] == [
        ("listen_pressure", {}), ("listen_recovered", {"TCP_FLAGS": 2, "unknown": 1})]
    assert "2 ACKs matched no SYN cookie" in got[0].reason
    assert tr.listeners().table()[0].totals["resets"] == 4


def test_a_namespace_whose_listeners_are_gone_is_forgotten_after_what_it_owed():
    """The sampler's last reading of a namespace has no listeners (host/samplers.py): its
    listeners and its namespace-wide pressure end there, and nothing of it is kept but the
    report's past."""
    two = [lsn(), lsn(lport=22, laddr="0.0.0.0")]
    tr = tracker()
    got = feed(tr, [reading(0, two), reading(SEC, two, ListenDrops=30),
                    reading(2 * SEC, [], ListenDrops=30)])
    assert [(f.type, f.lport, getattr(f, "closed", None)) for f in got] == \
        [("listen_pressure", None, None), ("listen_recovered", None, True)]
    d = tr.listeners()
    assert d.spaces == {} and d.readings == {} and len(d.past) == 3
