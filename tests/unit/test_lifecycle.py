"""The lifecycle engine on hand-built streams shaped like the kernel's (see tests/kernel for
the real ones). Table-driven where the cases share a shape."""
import errno

import pytest

from tcptrace import states as S
from tcptrace.wire import Kind, F_KPROBE, F_SYSCALL
from tcptrace.lifecycle import Tracker
from streams import (MS, SEC, active_close, active_open, ev, grouped, listen, lost,
                     passive_close, passive_open, state, unlisten)

CLIENT_SK, SERVER_SK, LISTEN_SK = 0xA1, 0xB1, 0xC1


def run(recs, end_ns=None, **kw):
    tr = Tracker(**kw)
    for r in sorted(recs, key=lambda r: r.ts_ns):
        tr.process(r)
    if end_ns is not None:
        tr.tick(end_ns)
    tr.finish()
    return tr, tr.take()


def only(findings, type_):
    got = [f for f in findings if f.type == type_]
    assert len(got) == 1, f"expected one {type_}, got {got}"
    return got[0]


def loopback_connection(t0=1 * SEC):
    return (listen(t0 - MS, LISTEN_SK, 8080)
            + active_open(t0, CLIENT_SK, 40000, 8080, hs=70_000)
            + passive_open(t0 + 60_000, SERVER_SK, 8080, 40000)
            + active_close(t0 + 5 * MS, CLIENT_SK, 40000, 8080)
            + passive_close(t0 + 5 * MS + 500, SERVER_SK, 8080, 40000))


def test_successful_connection_both_ends():
    _, out = run(loopback_connection())
    c = only(out, "connect")
    assert (c.pid, c.comm, c.lport, c.rport) == (100, "client", 40000, 8080)
    assert c.handshake_ns == 70_000 and c.syn_retransmits == 0
    a = only(out, "accept")
    # The accepted socket belongs to the listener's owner, not the softirq bystander.
    assert (a.pid, a.comm, a.lport, a.rport) == (200, "server", 8080, 40000)
    closes = {f.lport: f for f in out if f.type == "close"}
    assert closes[40000].closed_by == "local" and closes[8080].closed_by == "remote"
    assert closes[40000].path == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    assert closes[8080].path == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert closes[40000].duration_ns == 5 * MS + 2000 - 70_000
    assert not any(f.extra.get("partial") or f.extra.get("incomplete") for f in out)


def test_accept_without_known_listener_has_no_owner_rather_than_a_bystander():
    _, out = run(passive_open(SEC, SERVER_SK, 8080, 40000, pid=7, comm="ksoftirqd/0"))
    a = only(out, "accept")
    assert a.pid is None and a.comm is None


def test_accept_owner_refined_by_close_in_process_context():
    recs = passive_open(SEC, SERVER_SK, 8080, 40000) + [
        state(2 * SEC, SERVER_SK, S.ESTABLISHED, S.FIN_WAIT1, pid=321, comm="nginx", lport=8080,
              rport=40000)]
    _, out = run(recs)
    assert only(out, "accept").pid is None
    # still open (FIN_WAIT1), so no close yet; the owner learnt shows in later findings
    recs += [state(2 * SEC + 10, SERVER_SK, S.FIN_WAIT1, S.CLOSE, pid=0, comm="swapper/1",
                   lport=8080, rport=40000)]
    _, out = run(recs)
    assert only(out, "close").pid == 321


FAILED_CONNECTS = [
    # name, facts after CLOSE->SYN_SENT (offsets in ms), expected type, reason, errno, retransmits
    ("refused", [("rst", 1), ("close", 1), ("err", 1, errno.ECONNREFUSED)],
     "refused", "refused", "ECONNREFUSED", 0),
    ("refused, error report only", [("close", 1), ("err", 1, errno.ECONNREFUSED)],
     "refused", "refused", "ECONNREFUSED", 0),
    ("timeout", [("retrans", 1000), ("retrans", 3000), ("close", 7000),
                 ("err", 7000, errno.ETIMEDOUT)], "failed", "timeout", "ETIMEDOUT", 2),
    ("unreachable before the port is known", [("err_noport", 3, errno.EHOSTUNREACH),
                                              ("close", 3)],
     "failed", "unreachable", "EHOSTUNREACH", 0),
    ("cancelled", [("close_by_app", 50)], "failed", "cancelled", None, 0),
]


@pytest.mark.parametrize("name,facts,type_,reason,errname,retrans", FAILED_CONNECTS,
                         ids=[c[0] for c in FAILED_CONNECTS])
def test_failed_connects(name, facts, type_, reason, errname, retrans):
    t0 = SEC
    recs = [state(t0, CLIENT_SK, S.CLOSE, S.SYN_SENT, pid=100, comm="curl", rport=443,
                  raddr="10.0.0.9")]
    tup = dict(lport=50000, rport=443, raddr="10.0.0.9", pid=0, comm="swapper/1")
    for fact in facts:
        what, at = fact[0], t0 + fact[1] * MS
        if what == "rst":
            recs.append(ev(Kind.RECV_RESET, at, CLIENT_SK, **tup))
        elif what == "retrans":
            recs.append(ev(Kind.RETRANS, at, CLIENT_SK, old=S.SYN_SENT, **tup))
        elif what == "close":
            recs.append(state(at, CLIENT_SK, S.SYN_SENT, S.CLOSE, **tup))
        elif what == "close_by_app":
            recs.append(state(at, CLIENT_SK, S.SYN_SENT, S.CLOSE, lport=50000, rport=443,
                              raddr="10.0.0.9", pid=100, comm="curl"))
        elif what == "err":
            recs.append(ev(Kind.SOCK_ERROR, at + 1, err=fact[2], **tup))
        elif what == "err_noport":
            recs.append(ev(Kind.SOCK_ERROR, at - 1, err=fact[2], **tup))
    _, out = run(recs)
    f = only(out, type_)
    assert (f.pid, f.comm, f.raddr, f.rport) == (100, "curl", "10.0.0.9", 443)
    assert (f.reason, f.errno, f.syn_retransmits) == (reason, errname, retrans)
    assert not [x for x in out if x.type in ("connect", "close")]


def test_error_report_that_follows_close_is_still_tied_to_the_socket():
    # The kernel reports ECONNREFUSED after SYN_SENT -> CLOSE (tcp_done_with_error).
    recs = [state(SEC, CLIENT_SK, S.CLOSE, S.SYN_SENT, rport=1),
            state(SEC + 10_000, CLIENT_SK, S.SYN_SENT, S.CLOSE, lport=5555, rport=1),
            ev(Kind.SOCK_ERROR, SEC + 12_000, err=errno.ECONNREFUSED, lport=5555, rport=1)]
    _, out = run(recs)
    assert only(out, "refused").errno == "ECONNREFUSED"


@pytest.mark.parametrize("carried,reason", [(errno.ETIMEDOUT, "timeout"), (0, "cancelled")])
def test_errno_on_the_close_does_not_wait_for_the_error_report(carried, reason):
    # A 6.1 guest under emulation reported ETIMEDOUT 10.3 ms after the CLOSE, past the grace: a
    # record that carries sk_err (bpf/state.c: tt_close_err) gets the reason right anyway;
    # without it the late report finds the attempt concluded.
    tr = Tracker()
    late = SEC + 7 * SEC + tr.grace_ns + MS
    tup = dict(lport=50000, rport=443, raddr="10.0.0.9", pid=0, comm="swapper/1")
    recs = [state(SEC, CLIENT_SK, S.CLOSE, S.SYN_SENT, pid=100, comm="curl", rport=443,
                  raddr="10.0.0.9"),
            state(8 * SEC, CLIENT_SK, S.SYN_SENT, S.CLOSE, err=carried, **tup),
            ev(Kind.SOCK_ERROR, late, err=errno.ETIMEDOUT, **tup)]
    _, out = run(recs)
    f = only(out, "failed")
    assert (f.reason, f.errno) == (reason, "ETIMEDOUT" if carried else None)


@pytest.mark.parametrize("closer", ["local", "remote"])
def test_reset_of_established_connection_names_the_side(closer):
    recs = active_open(SEC, CLIENT_SK, 40000, 8080)
    t = SEC + 10 * MS
    if closer == "local":      # SO_LINGER 0: tcp_disconnect sets CLOSE, then sends the RST
        recs += [state(t, CLIENT_SK, S.ESTABLISHED, S.CLOSE, lport=40000, rport=8080),
                 ev(Kind.SEND_RESET, t + 500, CLIENT_SK)]
    else:                      # tcp_reset: the receive tracepoint fires before tcp_done
        recs += [ev(Kind.RECV_RESET, t, CLIENT_SK, lport=40000, rport=8080),
                 state(t + 100, CLIENT_SK, S.ESTABLISHED, S.CLOSE, lport=40000, rport=8080)]
    _, out = run(recs)
    r = only(out, "reset")
    assert r.reset_by == closer and r.state == "ESTABLISHED"
    assert not [f for f in out if f.type == "close"]


def test_socket_address_reuse_starts_a_new_connection():
    recs = (active_open(SEC, CLIENT_SK, 40000, 80) + active_close(SEC + MS, CLIENT_SK, 40000, 80)
            + active_open(SEC + 2 * MS, CLIENT_SK, 40001, 81, hs=30_000)
            + active_close(SEC + 3 * MS, CLIENT_SK, 40001, 81))
    _, out = run(recs)
    connects = [f for f in out if f.type == "connect"]
    assert [(f.lport, f.rport, f.handshake_ns) for f in connects] == [(40000, 80, 50_000),
                                                                      (40001, 81, 30_000)]
    closes = [f for f in out if f.type == "close"]
    assert [f.duration_ns for f in closes] == [MS + 2000 - 50_000, MS + 2000 - 30_000]


def _close_wait(t0, wait):
    return (listen(t0 - MS, LISTEN_SK, 8080) + passive_open(t0, SERVER_SK, 8080, 40000)
            + passive_close(t0 + MS, SERVER_SK, 8080, 40000, wait=wait))


def test_stuck_close_wait_reported_once_while_stuck_then_unstuck():
    tr = Tracker(stuck_after_ns=2 * SEC)
    recs = sorted(_close_wait(SEC, wait=5 * SEC), key=lambda r: r.ts_ns)
    enter_cw = SEC + MS
    found = []
    for r in recs:
        # the clock ticks every 100 ms while the socket lingers
        while tr.now_ns + 100 * MS < r.ts_ns:
            tr.tick(tr.now_ns + 100 * MS)
            found += tr.take()
        tr.process(r)
    tr.finish()
    found += tr.take()
    stuck = [f for f in found if f.type == "stuck"]
    assert len(stuck) == 1
    s = stuck[0]
    assert s.state == "CLOSE_WAIT" and s.pid == 200
    assert 2 * SEC <= s.age_ns <= 2 * SEC + 350 * MS       # within one check period
    assert s.ts_ns - enter_cw == s.age_ns
    assert "close()" in s.blame
    un = only(found, "unstuck")
    assert un.duration_ns == 5 * SEC and un.state == "CLOSE_WAIT"
    assert found.index(s) < found.index(un)


def test_short_close_wait_is_not_stuck():
    _, out = run(_close_wait(SEC, wait=SEC), stuck_after_ns=2 * SEC, end_ns=10 * SEC)
    assert not [f for f in out if f.type in ("stuck", "unstuck")]


def test_gap_no_false_stuck_and_touched_connections_marked_incomplete():
    # The CLOSE_WAIT -> LAST_ACK -> CLOSE of the server socket fell into a loss.
    recs = (listen(SEC - MS, LISTEN_SK, 8080) + passive_open(SEC, SERVER_SK, 8080, 40000)
            + [state(SEC + MS, SERVER_SK, S.ESTABLISHED, S.CLOSE_WAIT, lport=8080, rport=40000),
               lost(SEC + 2 * MS, 2)]
            + active_open(SEC + 3 * MS, CLIENT_SK, 40001, 9090)
            + active_close(SEC + 4 * MS, CLIENT_SK, 40001, 9090))
    tr, out = run(recs, stuck_after_ns=SEC, end_ns=60 * SEC)
    assert not [f for f in out if f.type == "stuck"]
    lost_f = only(out, "lost")
    assert lost_f.count == 2 and tr.stats.lost_total == 2
    # opened after the loss: complete
    assert "incomplete" not in only(out, "close").extra


def test_connection_alive_across_a_loss_is_marked_incomplete():
    recs = (active_open(SEC, CLIENT_SK, 40000, 80) + [lost(SEC + MS)]
            + active_close(SEC + 2 * MS, CLIENT_SK, 40000, 80))
    _, out = run(recs)
    assert only(out, "close").extra.get("incomplete") is True


@pytest.mark.parametrize("kernel_says,reported", [(True, True), (False, False)])
def test_kernel_confirmation_decides_for_incomplete_connections(kernel_says, reported):
    recs = (passive_open(SEC, SERVER_SK, 8080, 40000)
            + [state(SEC + MS, SERVER_SK, S.ESTABLISHED, S.CLOSE_WAIT, lport=8080, rport=40000),
               lost(SEC + 2 * MS)])
    asked = []

    def confirm(c):
        asked.append(c.state)
        return kernel_says

    _, out = run(recs, stuck_after_ns=SEC, end_ns=5 * SEC, confirm=confirm,
                 resolve_owner=lambda cs: {c.id: (999, "holder", 7) for c in cs})
    assert asked == [S.CLOSE_WAIT]
    stuck = [f for f in out if f.type == "stuck"]
    assert bool(stuck) == reported
    if reported:
        assert (stuck[0].pid, stuck[0].comm, stuck[0].fd) == (999, "holder", 7)
        assert stuck[0].extra["incomplete"] is True


def test_partial_connection_first_seen_mid_life():
    recs = active_close(SEC, CLIENT_SK, 40000, 80)
    tr, out = run(recs)
    c = only(out, "close")
    assert c.extra["partial"] is True and c.duration_ns is None
    assert tr.stats.partial == 1
    assert not [f for f in out if f.type == "connect"]


def test_partial_close_wait_is_not_reported_stuck_without_confirmation():
    recs = [state(SEC, SERVER_SK, S.ESTABLISHED, S.CLOSE_WAIT, lport=8080, rport=40000)]
    _, out = run(recs, stuck_after_ns=SEC, end_ns=10 * SEC)
    assert not [f for f in out if f.type == "stuck"]


def test_preexisting_socket_seeded_then_adopted():
    tr = Tracker(stuck_after_ns=SEC)
    tr.seed(S.AF_INET, "127.0.0.1", 8080, "127.0.0.1", 40000, S.CLOSE_WAIT, SEC,
            owner=(4242, "legacy", 9))
    tr.tick(3 * SEC)
    s = only(tr.take(), "stuck")
    assert (s.pid, s.comm, s.fd, s.state) == (4242, "legacy", 9, "CLOSE_WAIT")
    assert s.age_is_lower_bound is True and s.partial is True
    # Its first transition adopts it (no skaddr was known) and ends the stuck period.
    tr.process(state(4 * SEC, SERVER_SK, S.CLOSE_WAIT, S.LAST_ACK, pid=4242, comm="legacy",
                     lport=8080, rport=40000))
    tr.process(state(4 * SEC + 1000, SERVER_SK, S.LAST_ACK, S.CLOSE, lport=8080, rport=40000))
    tr.finish()
    out = tr.take()
    un = only(out, "unstuck")
    assert un.duration_ns == 3 * SEC
    c = only(out, "close")
    assert c.partial is True and c.closed_by is None
    assert tr.stats.partial == 0      # adopted, not a new partial connection


def test_listener_owner_seeded_from_proc_attributes_accepts():
    tr = Tracker()
    tr.seed(S.AF_INET, "0.0.0.0", 8080, "0.0.0.0", 0, S.LISTEN, SEC, owner=(55, "haproxy", 3))
    for r in passive_open(2 * SEC, SERVER_SK, 8080, 40000):
        tr.process(r)
    a = only(tr.take(), "accept")
    assert (a.pid, a.comm) == (55, "haproxy")


def same_port_listeners():
    """Four listeners on port 8080 of one host: 0.0.0.0 in two namespaces (two containers),
    127.0.0.1 and 127.0.0.2 in the first (a specific address outscores the wildcard), then
    one connection accepted by each."""
    t = SEC
    recs = (listen(t, 0xC1, 8080, pid=201, comm="web-a", netns=111, laddr="0.0.0.0")
            + listen(t + 1, 0xC2, 8080, pid=202, comm="web-b", netns=222, laddr="0.0.0.0")
            + listen(t + 2, 0xC3, 8080, pid=203, comm="lo-1", netns=111, laddr="127.0.0.1")
            + listen(t + 3, 0xC4, 8080, pid=204, comm="lo-2", netns=111, laddr="127.0.0.2"))
    accepts = [(0xB1, 111, "10.0.0.5", 40001), (0xB2, 222, "10.0.0.6", 40002),
               (0xB3, 111, "127.0.0.1", 40003), (0xB4, 111, "127.0.0.2", 40004)]
    for i, (sk, ns, laddr, rport) in enumerate(accepts):
        t0 = 2 * SEC + i * 10 * MS
        recs += passive_open(t0, sk, 8080, rport, netns=ns, laddr=laddr, raddr="10.9.9.9")
        recs += passive_close(t0 + MS, sk, 8080, rport, laddr=laddr, raddr="10.9.9.9",
                              pid=300 + i, comm="closer")
    return recs


@pytest.mark.parametrize("kernel", ["one step a record", "grouped and held"])
def test_accepts_take_the_owner_of_their_own_namespace_and_address(kernel):
    recs = same_port_listeners()
    if kernel != "one step a record":
        recs = grouped(recs, hold_ns=10 * MS)
    _, out = run(recs, end_ns=5 * SEC)
    owners = {f.rport: (f.pid, f.comm) for f in out if f.type == "accept"}
    assert owners == {40001: (201, "web-a"), 40002: (202, "web-b"), 40003: (203, "lo-1"),
                      40004: (204, "lo-2")}


def test_listener_closed_in_one_namespace_leaves_the_others():
    recs = (listen(SEC, 0xC1, 8080, pid=201, comm="web-a", netns=111, laddr="0.0.0.0")
            + listen(SEC + 1, 0xC2, 8080, pid=202, comm="web-b", netns=222, laddr="0.0.0.0")
            + unlisten(SEC + MS, 0xC2, 8080, pid=202, comm="web-b", netns=222,
                       laddr="0.0.0.0"))
    tr, _ = run(recs, end_ns=3 * SEC)       # past the grace: the closed listener concluded
    assert tr.table.accepted_by(111, S.AF_INET, "10.0.0.5", 8080, 3 * SEC) == (201, "web-a")
    assert tr.table.accepted_by(222, S.AF_INET, "10.0.0.6", 8080, 3 * SEC) is None
    # an IPv6 wildcard listener takes IPv4 (unless IPV6_V6ONLY)
    tr.table.listening(111, S.AF_INET6, "::", 9090, (205, "v6"))
    assert tr.table.accepted_by(111, S.AF_INET, "10.0.0.5", 9090, 3 * SEC) == (205, "v6")


@pytest.mark.parametrize("kernel", ["one step a record", "grouped", "grouped and held"])
def test_a_child_that_comes_after_its_listener_closed_is_still_the_listeners(kernel):
    # Seen in tests/data/kernel-tier: an accepted socket rested in CLOSE_WAIT, so its opening
    # came from a scan (every 100 ms), 72 ms after it; its listener had closed 18 ms after it
    # and been concluded meanwhile.
    t = SEC
    tr = Tracker()
    child = passive_open(t + MS, 0xB1, 8080, 40001, netns=111, laddr="10.0.0.5",
                         raddr="10.9.9.9")
    # the same address and port, listened on again by another process, whose child comes
    # after the first listener closed: not the first listener's
    after = passive_open(t + 3 * MS, 0xB2, 8080, 40002, netns=111, laddr="10.0.0.5",
                         raddr="10.9.9.9")
    if kernel != "one step a record":            # "grouped": whole-record (lifecycle/fast.py)
        hold = 10 * MS if kernel == "grouped and held" else None
        child, after = grouped(child, hold_ns=hold), grouped(after, hold_ns=hold)
    for r in (listen(t, 0xC1, 8080, pid=201, comm="web-a", netns=111, laddr="0.0.0.0")
              + unlisten(t + 2 * MS, 0xC1, 8080, pid=201, comm="web-a", netns=111,
                         laddr="0.0.0.0")):
        tr.process(r)
    tr.tick(t + 2 * MS + tr.grace_ns + 1)            # the listener is concluded
    assert tr.table.accepted_by(111, S.AF_INET, "10.0.0.5", 8080, t + 3 * MS) is None
    assert tr.table.accepted_by(111, S.AF_INET, "10.0.0.5", 8080, t + MS) == (201, "web-a")
    for r in child + after:
        tr.process(r)
    tr.finish()
    owners = {f.rport: (f.pid, f.comm) for f in tr.take() if f.type == "accept"}
    assert owners == {40001: (201, "web-a"), 40002: (None, None)}


def test_eviction_is_bounded_and_counted():
    recs = []
    for i in range(20):
        recs += [state(SEC + i * MS, 0x1000 + i, S.CLOSE, S.SYN_SENT, rport=80)]
    tr, _ = run(recs, max_conns=16)
    assert len(tr.conns) == 16 and tr.table.evicted == 4


def test_connect_failing_before_any_state_change():
    e = ev(Kind.CONNECT_RET, SEC, sk=0xD1, err=-errno.ENETUNREACH, raddr="203.0.113.9",
           rport=443, pid=77, comm="curl", flags=F_KPROBE)
    _, out = run([e])
    f = only(out, "failed")
    assert (f.reason, f.errno, f.before_syn, f.source) == ("unreachable", "ENETUNREACH", True,
                                                           "kprobe")
    assert (f.pid, f.raddr, f.rport) == (77, "203.0.113.9", 443)


def test_syscall_returns_that_are_no_failed_attempt_make_no_finding():
    """The syscall hook sends connect()'s failures with the socket behind the descriptor. A
    connect() interrupted or restarted while it waits (EINTR, ERESTARTSYS), asked again about a
    connect under way (EALREADY) or done (EISCONN), or returning its SYN's outcome
    (ECONNREFUSED) failed no attempt of its own; a return for a socket whose attempt is in the
    table is that attempt's; a fresh socket's failure is one before any SYN."""
    errs = (errno.EINTR, 512, errno.EALREADY, errno.EISCONN, errno.ECONNREFUSED)
    rets = [ev(Kind.CONNECT_RET, SEC + i, sk=0xD1, err=-e, raddr="203.0.113.9", rport=443,
               pid=77, comm="curl", flags=F_SYSCALL, aux=3) for i, e in enumerate(errs)]
    _, out = run(rets)
    assert [f for f in out if f.type in ("failed", "refused")] == []
    # a socket under way (SYN_SENT) whose connect() returns an errno of its own: its attempt's
    opening = state(SEC, 0xD2, S.CLOSE, S.SYN_SENT, raddr="203.0.113.9", rport=443, pid=77)
    again = ev(Kind.CONNECT_RET, SEC + MS, sk=0xD2, err=-errno.EHOSTUNREACH,
               raddr="203.0.113.9", rport=443, pid=77, comm="curl", flags=F_SYSCALL, aux=3)
    _, out = run([opening, again])
    assert [f for f in out if f.type in ("failed", "refused")] == []
    fresh = again._replace(skaddr=0xD3)
    _, out = run([opening, fresh])
    f = only(out, "failed")
    assert (f.reason, f.errno, f.before_syn, f.source) == ("unreachable", "EHOSTUNREACH", True,
                                                           "syscall")


def test_transitions_mode_emits_every_state_change():
    recs = loopback_connection()
    _, out = run(recs, transitions=True)
    tr_f = [f for f in out if f.type == "transition" and not hasattr(f, "by")]
    assert len(tr_f) == sum(1 for r in recs if r.kind == Kind.STATE)
    assert (tr_f[1].oldstate, tr_f[1].newstate) == ("CLOSE", "SYN_SENT")
    # the step into TIME_WAIT no tracepoint shows, inferred from the client's FIN_WAIT2 -> CLOSE
    tw = [f.to_record(0) for f in out if hasattr(f, "by")]
    assert [(t["oldstate"], t["newstate"], t["lport"], t["inferred"], t["by"]) for t in tw] == \
        [("FIN_WAIT2", "TIME_WAIT", 40000, True, "close")]


def test_matrix_counts_transitions():
    tr, _ = run(loopback_connection())
    assert tr.stats.matrix[(S.CLOSE, S.SYN_SENT)] == 1
    assert tr.stats.matrix[(S.LAST_ACK, S.CLOSE)] == 1
    # 11 from the kernel, and the client's step into TIME_WAIT (inferred)
    assert tr.stats.matrix[(S.FIN_WAIT2, S.TIME_WAIT)] == 1
    assert sum(tr.stats.matrix.values()) == 12


def test_orphaned_stuck_socket_has_no_holder_but_keeps_its_closer():
    """LAST_ACK after close(): the kernel owns the socket; the stuck record names no holder,
    the close record still names the process that closed it."""
    recs = (listen(SEC - MS, LISTEN_SK, 8080) + passive_open(SEC, SERVER_SK, 8080, 40000)
            + [state(SEC + MS, SERVER_SK, S.ESTABLISHED, S.CLOSE_WAIT, lport=8080, rport=40000),
               state(SEC + 2 * MS, SERVER_SK, S.CLOSE_WAIT, S.LAST_ACK, pid=200, comm="server",
                     lport=8080, rport=40000)])
    tr = Tracker(stuck_after_ns=SEC, confirm=lambda c: True,
                 resolve_owner=lambda cs: {c.id: (None, None, None) for c in cs})
    for r in recs:
        tr.process(r)
    tr.tick(5 * SEC)
    stuck = only(tr.take(), "stuck")
    assert (stuck.state, stuck.pid, stuck.comm, stuck.fd) == ("LAST_ACK", None, None, None)
    tr.process(state(6 * SEC, SERVER_SK, S.LAST_ACK, S.CLOSE, lport=8080, rport=40000))
    tr.finish()
    out = tr.take()
    assert only(out, "close").pid == 200 and only(out, "unstuck").pid == 200


def test_connection_whose_close_was_lost_is_concluded_when_its_address_is_reused():
    # FIN_WAIT2 -> CLOSE fell into a loss; the socket address then serves a new connect.
    recs = (active_open(SEC, CLIENT_SK, 40000, 80)
            + active_close(SEC + MS, CLIENT_SK, 40000, 80)[:2]
            + [lost(SEC + 2 * MS)]
            + active_open(SEC + 3 * MS, CLIENT_SK, 40001, 81))
    _, out = run(recs)
    closes = [f for f in out if f.type == "close"]
    assert len(closes) == 1
    c = closes[0]
    assert (c.lport, c.incomplete, c.closed_by) == (40000, True, "local")
    assert c.path == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
    assert c.ts_ns == SEC + 3 * MS                   # when we learnt it was over
    assert [f.lport for f in out if f.type == "connect"] == [40000, 40001]
