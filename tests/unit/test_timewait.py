"""TIME_WAIT: the inferred step into it on close findings and --transitions, the step out of it
from the sampler's dumps (or the 60 s rule), the namespace view, port pressure, overflow, and
connects that found no local port. Hand-built streams and samples; no root, no BCC."""
import gc
import io
import socket

from tcptrace import states as S
from tcptrace.detect import timewait
from tcptrace.detect.timewait import TIME_WAIT_NS, TimeWaits
from tcptrace.host.diag import _MSG, STATES, DiagSock
from tcptrace.host.timewait import aggregate, tuples_text
from tcptrace.lifecycle import Tracker
from tcptrace.options import Options
from tcptrace.output.jsonl import JsonSink
from tcptrace.output.report import Report
from tcptrace.output.text import TextSink
from tcptrace.session import Pipeline
from tcptrace.wire import F_KPROBE, F_SYSCALL, Batch, Kind, Sample
from streams import MS, SEC, active_close, active_open, ev, passive_close, passive_open, state

CLI, SRV = 0xC0, 0x50
NETNS = 4026532000
TUPLE = ["127.0.0.1", 40000, "127.0.0.1", 8080]


def conn(t0=SEC, client_first=True):
    """One loopback connection, closed first by the client (or by the server)."""
    recs = active_open(t0, CLI, 40000, 8080) + passive_open(t0 + 10, SRV, 8080, 40000)
    if client_first:
        recs += active_close(t0 + MS, CLI, 40000, 8080) \
            + passive_close(t0 + MS + 500, SRV, 8080, 40000)
    else:
        recs += active_close(t0 + MS, SRV, 8080, 40000, pid=200, comm="server") \
            + passive_close(t0 + MS + 500, CLI, 40000, 8080, pid=100, comm="client")
    return recs


def tw_sample(ts, tw=0, counters=(0, 0, 0, 0), dests=(), entered=(), left=(), services=(),
              port_range=(40000, 40009)):
    return Sample(ts, "time_wait", NETNS, {
        "tw": tw, "counters": dict(zip(("TW", "TWRecycled", "TWKilled", "TCPTimeWaitOverflow"),
                                       counters)),
        "port_range": list(port_range), "tw_reuse": 2, "max_tw_buckets": 131072,
        "dests": [list(d) for d in dests], "locals": [], "services": [list(s) for s in services],
        "entered": [list(e) for e in entered], "left": [list(x) for x in left]})


def feed(recs, transitions=False, ticks=(), **kw):
    """Process records and clock ticks in time order; the findings as records."""
    tr = Tracker(transitions=transitions, **kw)
    items = sorted([(r.ts_ns, 0, r) for r in recs] + [(t, 1, None) for t in ticks],
                   key=lambda x: x[:2])
    for ts, is_tick, r in items:
        if is_tick:
            tr.tick(ts)
        else:
            tr.process(r)
    tr.finish()
    return tr, [f.to_record(0) for f in tr.take()]


def of(recs, type_):
    return [r for r in recs if r["type"] == type_]


def test_the_side_that_closed_first_says_time_wait_and_for_how_long():
    for client_first in (True, False):
        _, out = feed(conn(client_first=client_first))
        closes = {c["lport"]: c for c in of(out, "close")}
        waits, other = (40000, 8080) if client_first else (8080, 40000)
        assert (closes[waits]["time_wait"], closes[waits]["time_wait_ns"]) == (True, TIME_WAIT_NS)
        assert closes[waits]["path"][-2:] == ["FIN_WAIT2", "CLOSE"]
        assert (closes[other]["time_wait"], closes[other]["time_wait_ns"]) == (False, None)


def test_a_reset_or_a_simultaneous_close():
    # FIN_WAIT2 -> CLOSE by a reset from the peer leaves no timewait sock
    recs = active_open(SEC, CLI, 40000, 8080) + [
        state(SEC + MS, CLI, S.ESTABLISHED, S.FIN_WAIT1, lport=40000, rport=8080),
        state(SEC + 2 * MS, CLI, S.FIN_WAIT1, S.FIN_WAIT2, lport=40000, rport=8080)]
    reset = recs + [state(SEC + 3 * MS, CLI, S.FIN_WAIT2, S.CLOSE, lport=40000, rport=8080)]
    reset[-1] = reset[-1]._replace(rst_ns=SEC + 3 * MS - 10, nsteps=0)
    _, out = feed(reset)
    assert of(out, "close") == [] and len(of(out, "reset")) == 1
    # both sides closed at once: FIN_WAIT1 -> CLOSING -> CLOSE, and both wait
    both = active_open(SEC, CLI, 40000, 8080) + [
        state(SEC + MS, CLI, S.ESTABLISHED, S.FIN_WAIT1, lport=40000, rport=8080),
        state(SEC + 2 * MS, CLI, S.FIN_WAIT1, S.CLOSING, lport=40000, rport=8080),
        state(SEC + 3 * MS, CLI, S.CLOSING, S.CLOSE, lport=40000, rport=8080)]
    tr, out = feed(both)
    assert of(out, "close")[0]["time_wait"] is True
    assert tr.stats.matrix[(S.CLOSING, S.TIME_WAIT)] == 1


def test_transitions_show_the_step_into_time_wait_and_out_of_it_from_a_dump():
    recs = conn() + [tw_sample(SEC + 2 * MS, tw=1, entered=[TUPLE + [59_990]]),
                     tw_sample(SEC + 61 * SEC, left=[TUPLE])]
    tr, out = feed(recs, transitions=True, ticks=range(SEC, 62 * SEC, SEC // 10))
    inferred = [(t["oldstate"], t["newstate"], t["by"], t["time"]) for t in of(out, "transition")
                if t.get("inferred")]
    assert [i[:3] for i in inferred] == [("FIN_WAIT2", "TIME_WAIT", "close"),
                                        ("TIME_WAIT", "CLOSE", "sock_diag")]
    # into it when the full socket closed; out of it at the dump that no longer showed it,
    # not at the 60 s mark (the dump had shown it)
    close = [t for t in of(out, "transition") if t["newstate"] == "CLOSE"
             and t["oldstate"] == "FIN_WAIT2"][0]
    assert inferred[0][3] == close["time"]
    assert inferred[1][3] == "1970-01-01T00:01:02.000000Z"
    assert tr.stats.matrix[(S.FIN_WAIT2, S.TIME_WAIT)] == 1
    assert tr.stats.matrix[(S.TIME_WAIT, S.CLOSE)] == 1


def test_without_following_the_closed_hook_is_off_and_findings_are_the_same():
    # watch without --transitions or report shows neither the step into TIME_WAIT nor the
    # matrix that counts it: the hook, which would run for every closed socket, is not called
    followed, out = feed(conn())
    quiet, quiet_out = feed(conn(), follow_time_wait=False)
    assert followed.detector(TimeWaits).closed is not None
    assert quiet.detector(TimeWaits).closed is None
    assert quiet_out == out and of(out, "close")
    assert followed.stats.matrix[(S.FIN_WAIT2, S.TIME_WAIT)] == 1
    assert quiet.stats.matrix[(S.FIN_WAIT2, S.TIME_WAIT)] == 0


def test_a_followed_timewait_sock_is_kept_as_plain_values_the_collector_skips():
    # Up to MAX_WAITING of them live a minute: held as objects (a list and the Ends), each
    # collection of the young generation walked them. A tuple of plain values is walked once.
    tr = Tracker(transitions=True)
    for r in conn():
        tr.process(r)
    tr.tick(SEC + 2 * SEC)
    waiting = tr.detector(TimeWaits).waiting
    assert list(waiting) == [tuple(TUPLE)]
    gc.collect()
    assert not any(gc.is_tracked(w) for w in waiting.values())
    # and the step out still names the connection's owner and socket
    tr.tick(SEC + TIME_WAIT_NS + 2 * SEC)
    out = [t.to_record(0) for t in tr.take() if t.type == "transition" and t.pair & 0xff
           == S.CLOSE and t.pair >> 8 == S.TIME_WAIT]
    assert [(t["pid"], t["comm"], t["lport"], t["skaddr"], t["by"]) for t in out] == \
        [(100, "client", 40000, f"{CLI:x}", "rule")]


def test_when_full_the_newest_timewait_socks_are_not_followed_and_the_followed_leave(
        monkeypatch):
    # More timewait socks a minute than the follower keeps: dropping the oldest for each new
    # one would drop every one before its 60 s, and tell no exit at all
    monkeypatch.setattr(timewait, "MAX_WAITING", 3)
    recs = []
    for i in range(5):
        port = 40000 + i
        t0 = SEC + i * MS
        recs += active_open(t0, CLI + i, port, 8080) + \
            active_close(t0 + 100_000, CLI + i, port, 8080)
    tr, out = feed(recs, transitions=True, ticks=[SEC + TIME_WAIT_NS + SEC])
    left = [t["lport"] for t in of(out, "transition") if t.get("by") == "rule"]
    assert left == [40000, 40001, 40002]
    assert tr.stats.unfollowed == 2
    # the step into TIME_WAIT is shown and counted for each of them all the same
    assert len([t for t in of(out, "transition") if t.get("by") == "close"]) == 5
    assert tr.stats.matrix[(S.FIN_WAIT2, S.TIME_WAIT)] == 5
    assert tr.stats.matrix[(S.TIME_WAIT, S.CLOSE)] == 3
    # and the run's closing summary says how many went unfollowed
    pipe = Pipeline(Options(json=True, transitions=True), JsonSink(io.StringIO(), 0))
    pipe.feed(Batch(sorted(recs, key=lambda r: r.ts_ns), SEC + SEC))
    pipe.finish()
    assert "2 timewait socks not followed to their exit (over 3 at once)" in pipe.summary_line()


def test_a_timewait_sock_no_dump_showed_leaves_by_the_60_s_rule():
    close_ns = SEC + MS + 2000
    tr, out = feed(conn(), transitions=True, ticks=[close_ns + TIME_WAIT_NS - 1,
                                                    close_ns + TIME_WAIT_NS + 20 * MS])
    out_of = [t for t in of(out, "transition") if t.get("by") == "rule"]
    assert [(t["oldstate"], t["newstate"], t["lport"]) for t in out_of] == \
        [("TIME_WAIT", "CLOSE", 40000)]
    assert out_of[0]["time"] == "1970-01-01T00:01:01.001002Z"     # close + 60 s exactly


def test_the_namespace_view_is_written_when_it_changes():
    dest = ("10.0.0.1", "10.0.0.2", 80, 7, 1)
    recs = [tw_sample(SEC, tw=7, counters=(100, 2, 0, 0), dests=[dest]),
            tw_sample(2 * SEC, tw=7, counters=(100, 2, 0, 0), dests=[dest]),   # unchanged
            tw_sample(3 * SEC, tw=9, counters=(103, 3, 1, 0),
                      dests=[("10.0.0.1", "10.0.0.2", 80, 9, 0)],
                      services=[("10.0.0.1", 443, 2)]),
            tw_sample(4 * SEC, tw=0, counters=(103, 3, 1, 0))]
    _, out = feed(recs)
    views = of(out, "time_wait")
    assert [(v["time_wait"], v["entered"], v["recycled"], v["killed"], v["interval_ns"])
            for v in views] == [(7, None, None, None, None), (9, 3, 1, 1, SEC),
                                (0, 0, 0, 0, SEC)]
    assert views[0]["destinations"] == [{"laddr": "10.0.0.1", "raddr": "10.0.0.2", "rport": 80,
                                         "time_wait": 7, "in_use": 8, "port_share": 0.8}]
    assert views[1]["services"] == [{"laddr": "10.0.0.1", "lport": 443, "time_wait": 2}]
    assert views[2]["destinations"] == [] and views[2]["netns"] == NETNS


def test_port_pressure_once_per_crossing_of_the_threshold():
    def dest(tw, other):
        return [("10.0.0.1", "10.0.0.2", 80, tw, other)]
    recs = [tw_sample(SEC, dests=dest(2, 5)),         # 70%
            tw_sample(2 * SEC, dests=dest(3, 5)),     # 80%: reported
            tw_sample(3 * SEC, dests=dest(10, 0)),    # still over: not again
            tw_sample(4 * SEC, dests=dest(1, 0)),     # below
            tw_sample(5 * SEC, dests=dest(0, 9))]     # over again
    _, out = feed(recs)
    got = of(out, "port_pressure")
    assert [(p["time"][17:19], p["time_wait"], p["connected"], p["port_share"]) for p in got] \
        == [("02", 3, 5, 0.8), ("05", 0, 9, 0.9)]
    assert (got[0]["laddr"], got[0]["raddr"], got[0]["rport"], got[0]["ports"],
            got[0]["port_range"]) == ("10.0.0.1", "10.0.0.2", 80, 10, [40000, 40009])
    # --port-pressure 95: only the 100% sample crosses it
    _, out = feed(recs, port_pressure=0.95)
    assert [(p["time"][17:19], p["threshold"]) for p in of(out, "port_pressure")] == \
        [("03", 0.95)]


def test_overflow_is_reported_when_the_counter_moves():
    recs = [tw_sample(SEC, tw=5, counters=(10, 0, 0, 4)),
            tw_sample(2 * SEC, tw=5, counters=(12, 0, 0, 4)),
            tw_sample(3 * SEC, tw=5, counters=(12, 0, 0, 7))]
    _, out = feed(recs)
    assert [(o["count"], o["max_tw_buckets"], o["interval_ns"]) for o in
            of(out, "time_wait_overflow")] == [(3, 131072, SEC)]


def test_a_connect_that_found_no_local_port_names_its_destination():
    # LAB-FACTS: CLOSE -> SYN_SENT -> CLOSE within connect(), the local port still 0
    recs = [state(SEC, CLI, S.CLOSE, S.SYN_SENT, raddr="10.0.0.2", rport=80),
            state(SEC + 20_000, CLI, S.SYN_SENT, S.CLOSE, raddr="10.0.0.2", rport=80)]
    _, out = feed(recs)
    [f] = of(out, "failed")
    assert (f["reason"], f["errno"], f["errno_inferred"], f["raddr"], f["rport"], f["lport"]) \
        == ("no_local_port", "EADDRNOTAVAIL", True, "10.0.0.2", 80, None)
    # tcp_v4_connect()'s return (the kprobe plan) reports the errno: it belongs to that
    # attempt, no second finding, and the errno is no longer inferred
    ret = ev(Kind.CONNECT_RET, SEC + 25_000, CLI, raddr="10.0.0.2", rport=80, err=-99,
             flags=F_KPROBE)
    _, out = feed(recs + [ret])
    assert [(f["reason"], f["errno"], "errno_inferred" in f) for f in of(out, "failed")] == \
        [("no_local_port", "EADDRNOTAVAIL", False)]
    # the syscall hook sends connect()'s failures with the socket behind its descriptor: the
    # same, when its return comes while the attempt is still in the table
    ret = ev(Kind.CONNECT_RET, SEC + 25_000, CLI, raddr="10.0.0.2", rport=80, err=-99,
             flags=F_SYSCALL, aux=5)
    _, out = feed(recs + [ret])
    assert [(f["reason"], "errno_inferred" in f) for f in of(out, "failed")] == \
        [("no_local_port", False)]
    # and when it comes after the attempt was concluded (a loaded host), no second finding
    late = ev(Kind.CONNECT_RET, SEC + 600_000_000, CLI, raddr="10.0.0.2", rport=80, err=-99,
              flags=F_SYSCALL, aux=5)
    _, out = feed(recs + [late])
    assert [(f["reason"], f["errno_inferred"]) for f in of(out, "failed")] == \
        [("no_local_port", True)]
    # while on a socket that made no attempt it is a failure before any SYN
    _, out = feed([ret])
    assert [(f["reason"], f["before_syn"]) for f in of(out, "failed")] == \
        [("no_local_address", True)]
    # with a local port it is an application's close in SYN_SENT, as before
    recs[1] = state(SEC + 20_000, CLI, S.SYN_SENT, S.CLOSE, lport=40001, raddr="10.0.0.2",
                    rport=80)
    _, out = feed(recs)
    assert [f["reason"] for f in of(out, "failed")] == ["cancelled"]


def raw_chunks(socks, per_chunk=4):
    """Diag.raw's chunks for these DiagSocks: inet_diag_msgs as the kernel lays them out, a few
    per read, each family's in reads of its own, as the dump is made per family."""
    out = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        mine = [s for s in socks if s.family == fam]
        for i in range(0, len(mine), per_chunk):
            buf, offsets = bytearray(b"junk"), []
            for s in mine[i:i + per_chunk]:
                offsets.append(len(buf))
                buf += _MSG.pack(s.family, s.state, s.timer, s.retrans,
                                 s.lport.to_bytes(2, "big"), s.rport.to_bytes(2, "big"),
                                 socket.inet_pton(fam, s.laddr).ljust(16, b"\0"),
                                 socket.inet_pton(fam, s.raddr).ljust(16, b"\0"), 0,
                                 s.cookie.to_bytes(8, "little"), s.expires_ms, s.rqueue,
                                 s.wqueue, s.uid, s.inode) + b"pad!"
            out.append((fam, buf, offsets))
    return out


def test_a_dump_is_aggregated_per_destination_local_address_and_service():
    def sock(state, lport, raddr="10.0.0.2", rport=80, laddr="10.0.0.1", expires=1000):
        fam = socket.AF_INET6 if ":" in laddr else socket.AF_INET
        return DiagSock(fam, STATES[state], 0, 0, laddr, lport, raddr, rport, expires, 0, 0, 0,
                        0, 0)
    socks = [sock("TIME_WAIT", 40000), sock("TIME_WAIT", 40001), sock("ESTABLISHED", 40002),
             sock("TIME_WAIT", 40003, rport=443, expires=59000), sock("FIN_WAIT2", 40004),
             sock("TIME_WAIT", 80, raddr="10.0.0.9", rport=50000),      # a server's
             sock("ESTABLISHED", 80, raddr="10.0.0.9", rport=50001),
             sock("TIME_WAIT", 40005, laddr="10.0.0.3"),
             # what a listener on a port of the range accepted
             sock("TIME_WAIT", 40006, raddr="10.0.0.9", rport=50002),
             sock("ESTABLISHED", 40006, raddr="10.0.0.9", rport=50003),
             # IPv6: its own rows, though the raw addresses share their first bytes with IPv4's
             sock("TIME_WAIT", 40007, laddr="a00:1::", raddr="a00:2::"),
             sock("TIME_WAIT", 40008, laddr="a00:1::", raddr="a00:2::"),
             sock("TIME_WAIT", 443, laddr="a00:1::", raddr="a00:9::", rport=50004)]
    dests, locs, services, tw = aggregate({40006}, raw_chunks(socks), 40000, 40009)
    assert dests == [["10.0.0.1", "10.0.0.2", 80, 2, 2], ["a00:1::", "a00:2::", 80, 2, 0],
                     ["10.0.0.1", "10.0.0.2", 443, 1, 0], ["10.0.0.3", "10.0.0.2", 80, 1, 0]]
    assert locs == [["10.0.0.1", 3, 2], ["a00:1::", 2, 0], ["10.0.0.3", 1, 0]]
    assert services == [["10.0.0.1", 80, 1], ["10.0.0.1", 40006, 1], ["a00:1::", 443, 1]]
    assert sorted((tuple(tuples_text(f, [k])[0]), ms) for f, d in tw.items()
                  for k, ms in d.items()) == [
        (("10.0.0.1", 80, "10.0.0.9", 50000), 1000),
        (("10.0.0.1", 40000, "10.0.0.2", 80), 1000), (("10.0.0.1", 40001, "10.0.0.2", 80), 1000),
        (("10.0.0.1", 40003, "10.0.0.2", 443), 59000),
        (("10.0.0.1", 40006, "10.0.0.9", 50002), 1000),
        (("10.0.0.3", 40005, "10.0.0.2", 80), 1000),
        (("a00:1::", 443, "a00:9::", 50004), 1000), (("a00:1::", 40007, "a00:2::", 80), 1000),
        (("a00:1::", 40008, "a00:2::", 80), 1000)]
    # not following exits: the same rows, no 4-tuples kept
    assert aggregate({40006}, raw_chunks(socks), 40000, 40009, follow=False) == \
        (dests, locs, services, None)


def test_report_has_a_time_wait_table_within_80_columns():
    recs = conn() + [tw_sample(SEC + 2 * MS, tw=1, dests=[("127.0.0.1", "127.0.0.1", 8080, 1, 0)],
                               port_range=(32768, 60999)),
                     tw_sample(SEC + 3 * SEC, tw=0, port_range=(32768, 60999))]
    tr = Tracker()
    rep = Report()
    for r in sorted(recs, key=lambda r: r.ts_ns):
        tr.process(r)
        for f in tr.take():
            rep.add(f)
    tr.finish()
    for f in tr.take():
        rep.add(f)
    s = rep.summary(tr, 0, start_ns=0, end_ns=4 * SEC)
    assert s["time_wait"] == [{"side": "to", "addr": "127.0.0.1", "port": 8080, "now": 0,
                               "peak": 1, "port_share": 0.0, "entries": 1,
                               "entries_per_s": 0.2}]
    text = rep.tables(tr, 0, start_ns=0, end_ns=4 * SEC)
    assert "TIME_WAIT (to:" in text and max(len(line) for line in text.splitlines()) <= 80
    row = next(line for line in text.splitlines() if line.startswith("to "))
    assert row.split() == ["to", "127.0.0.1:8080", "0", "1", "0%", "0.2"]
    matrix = {(t["old"], t["new"]): t["count"] for t in s["transitions"]}
    assert matrix[("FIN_WAIT2", "TIME_WAIT")] == 1


def test_text_lines_for_the_namespace_view_and_pressure():
    recs = [tw_sample(SEC, tw=9, counters=(1, 0, 0, 0),
                      dests=[("10.0.0.1", "10.0.0.2", 80, 9, 0)]),
            tw_sample(2 * SEC, tw=9, counters=(2, 0, 0, 0),
                      dests=[("10.0.0.1", "10.0.0.2", 80, 9, 0)])]
    tr = Tracker()
    for r in recs:
        tr.process(r)
    out = io.StringIO()
    TextSink(out, 0).emit_many(tr.take())
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    text = " ".join(lines)
    assert "9/10 local ports in use (90%): 9 TIME_WAIT + 0 connected" in text
    assert f"netns {NETNS}: 9 TIME_WAIT, +1 in 1.00s (0 recycled); 10.0.0.2:80 9 (90%)" in text


def test_a_namespace_the_sampler_cannot_read_is_said_at_exit():
    from tcptrace.host.timewait import TimeWaitSampler

    class Gone:
        def get(self, now_ns=None):
            return {1: "/proc/999999999"}       # no such process: its namespace is gone
    s = TimeWaitSampler(Gone())
    assert s.sample(0) == [] and s.dumps == 0
    assert s.describe().endswith("; 1 namespace readings failed: No such file or directory")
