"""The kernel sends each socket's transitions in groups (bpf/state.c, docs/design.md), and user
space may take pending ones early from a scan of the kernel's map. Whatever the grouping, the
findings must be exactly those of the one-record-per-transition stream: checked here on the
hand-built scenarios of test_lifecycle, grouped the way the kernel groups them."""
import errno
import json

import pytest

from tcptrace import states as S
from tcptrace.wire import Kind, Lost, F_HELD, F_SCAN, iter_steps
from tcptrace.lifecycle import Tracker
from streams import (MS, SEC, active_close, active_open, ev, grouped, listen, lost,
                     passive_close, passive_open, state)
from test_lifecycle import CLIENT_SK, LISTEN_SK, SERVER_SK, loopback_connection

TUP = dict(lport=50000, rport=443, raddr="10.0.0.9", pid=0, comm="swapper/1")


def refused():
    return [state(SEC, CLIENT_SK, S.CLOSE, S.SYN_SENT, pid=100, comm="curl", rport=443,
                  raddr="10.0.0.9"),
            ev(Kind.RECV_RESET, SEC + MS, CLIENT_SK, **TUP),
            state(SEC + MS + 10, CLIENT_SK, S.SYN_SENT, S.CLOSE, **TUP),
            ev(Kind.SOCK_ERROR, SEC + MS + 20, err=errno.ECONNREFUSED, **TUP)]


def timeout():
    return [state(SEC, CLIENT_SK, S.CLOSE, S.SYN_SENT, pid=100, comm="curl", rport=443,
                  raddr="10.0.0.9"),
            ev(Kind.RETRANS, 2 * SEC, CLIENT_SK, old=S.SYN_SENT, **TUP),
            ev(Kind.RETRANS, 4 * SEC, CLIENT_SK, old=S.SYN_SENT, **TUP),
            state(8 * SEC, CLIENT_SK, S.SYN_SENT, S.CLOSE, **TUP),
            ev(Kind.SOCK_ERROR, 8 * SEC + 10, err=errno.ETIMEDOUT, **TUP)]


def icmp_unreachable():
    # The error report comes before the SYN_SENT -> CLOSE (tcp_v4_err), so before the kernel
    # sends the record that carries the socket's SYN_SENT.
    return [state(SEC, CLIENT_SK, S.CLOSE, S.SYN_SENT, pid=100, comm="curl", rport=443,
                  raddr="10.0.0.9"),
            ev(Kind.SOCK_ERROR, SEC + 5 * MS, err=errno.EHOSTUNREACH, **TUP),
            state(SEC + 5 * MS + 10, CLIENT_SK, S.SYN_SENT, S.CLOSE, **TUP)]


def slow_handshake():
    return (active_open(SEC, CLIENT_SK, 40000, 8080, hs=1 * SEC)[:1]
            + [ev(Kind.RETRANS, SEC + SEC // 2, CLIENT_SK, old=S.SYN_SENT, lport=40000,
                  rport=8080)]
            + active_open(SEC, CLIENT_SK, 40000, 8080, hs=1 * SEC)[1:]
            + active_close(3 * SEC, CLIENT_SK, 40000, 8080))


def remote_reset():
    return (active_open(SEC, CLIENT_SK, 40000, 8080)
            + [state(SEC + MS, CLIENT_SK, S.ESTABLISHED, S.FIN_WAIT1, lport=40000, rport=8080),
               ev(Kind.RECV_RESET, SEC + 2 * MS, CLIENT_SK, lport=40000, rport=8080),
               state(SEC + 2 * MS + 100, CLIENT_SK, S.FIN_WAIT1, S.CLOSE, lport=40000,
                     rport=8080)])


def close_wait(wait):
    return (listen(SEC - MS, LISTEN_SK, 8080) + passive_open(SEC, SERVER_SK, 8080, 40000)
            + passive_close(SEC + MS, SERVER_SK, 8080, 40000, wait=wait))


def reuse():
    return (active_open(SEC, CLIENT_SK, 40000, 80) + active_close(SEC + MS, CLIENT_SK, 40000, 80)
            + active_open(SEC + 2 * MS, CLIENT_SK, 40001, 81, hs=30_000)
            + active_close(SEC + 3 * MS, CLIENT_SK, 40001, 81))


def with_loss():
    return (listen(SEC - MS, LISTEN_SK, 8080) + passive_open(SEC, SERVER_SK, 8080, 40000)
            + [state(SEC + MS, SERVER_SK, S.ESTABLISHED, S.CLOSE_WAIT, lport=8080, rport=40000),
               lost(SEC + 2 * MS, 2)]
            + active_open(SEC + 3 * MS, CLIENT_SK, 40001, 9090)
            + active_close(SEC + 4 * MS, CLIENT_SK, 40001, 9090))


SCENARIOS = {"loopback": loopback_connection, "refused": refused, "timeout": timeout,
             "icmp_unreachable": icmp_unreachable, "slow_handshake": slow_handshake,
             "remote_reset": remote_reset, "close_wait_stuck": lambda: close_wait(5 * SEC),
             "close_wait_short": lambda: close_wait(SEC // 2), "reuse": reuse,
             "with_loss": with_loss}


def findings(recs, transitions=True):
    """Run with the clock ticking every 100 ms, as live; the records as JSON, sorted."""
    tr = Tracker(stuck_after_ns=2 * SEC, transitions=transitions)
    out = []
    for r in sorted(recs, key=lambda r: r.ts_ns):
        while tr.now_ns and tr.now_ns + 100 * MS < r.ts_ns:
            tr.tick(tr.now_ns + 100 * MS)
        tr.process(r)
    tr.tick(tr.now_ns + 10 * SEC)
    tr.finish()
    out = tr.take()
    return sorted(json.dumps(f.to_record(0), sort_keys=True) for f in out)


# Held opens (bpf/hold.c): off; sent early at the very next hit, so every held socket's
# steps come twice; after 1 ms, so some do; never early, so every connection is one record per
# socket.
HOLDS = {"no_hold": None, "hold_0": 0, "hold_1ms": MS, "hold_long": 100 * SEC}


@pytest.mark.parametrize("name", sorted(set(SCENARIOS) - {"close_wait_stuck"}))
@pytest.mark.parametrize("max_steps", [6, 2])
@pytest.mark.parametrize("transitions", [True, False], ids=["transitions", "findings"])
@pytest.mark.parametrize("hold", HOLDS)
def test_grouped_stream_gives_the_same_findings(name, max_steps, transitions, hold):
    # (not close_wait_stuck: with no scan, a socket resting in CLOSE_WAIT is not seen there
    # until it leaves; the scan test below covers it). Whole records of the common shapes
    # take lifecycle/fast.py's paths, with --transitions or without.
    recs = SCENARIOS[name]()
    want = findings(recs, transitions)
    assert want                                   # the scenario concludes something
    got = grouped(recs, max_steps=max_steps, hold_ns=HOLDS[hold])
    assert len(got) < len(recs) or name == "with_loss"
    assert findings(got, transitions) == want


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_held_steps_that_come_twice_are_taken_once(name):
    """Sent early and carried again (hold_0): both copies reach the tracker; with scans, as
    live, so that a socket resting in CLOSE_WAIT is seen there."""
    recs = SCENARIOS[name]()
    t0 = min(r.ts_ns for r in recs)
    t1 = max(r.ts_ns for r in recs)
    got = grouped(recs, hold_ns=0, scan_at=range(t0 + 50 * MS, t1, 100 * MS))
    early = [r for r in got if not isinstance(r, Lost) and r.flags & F_HELD]
    if any(r.kind == Kind.STATE and r.newstate == S.ESTABLISHED for r in recs):
        assert early
    assert findings(got) == findings(recs)


def test_an_early_copy_arriving_after_the_record_that_carries_its_steps_again_is_skipped():
    """tt_flush may copy a held socket while its next transition carries the steps into a record
    that is sent at once (ESTABLISHED -> CLOSE on a reset): in time order, either comes first."""
    recs = (active_open(SEC, CLIENT_SK, 40000, 8080)
            + [state(SEC + MS, CLIENT_SK, S.ESTABLISHED, S.CLOSE, lport=40000, rport=8080)])
    whole = grouped(recs, hold_ns=10 * SEC)
    assert len(whole) == 1 and whole[0].nsteps == 3
    copy = grouped(recs[:2], hold_ns=0)
    copy = [r for r in copy if r.flags & F_HELD][0]._replace(ts_ns=SEC + MS + 500)
    want = findings(recs)
    assert findings(whole + [copy]) == want
    assert findings([copy._replace(ts_ns=SEC + MS - 500)] + whole) == want


def spy_fast_paths(monkeypatch):
    """The list each fast path taken is appended to, as records are processed."""
    from tcptrace.lifecycle import fast
    taken = []
    for k, (n, fn) in list(fast.REGIONS.items()):
        monkeypatch.setitem(fast.REGIONS, k,
                            (n, lambda tr, ev, s, fn=fn: taken.append(fn) or fn(tr, ev, s)))
    return taken


@pytest.mark.parametrize("transitions", [True, False], ids=["transitions", "findings"])
def test_fast_paths_are_taken_and_agree_with_the_steps(monkeypatch, transitions):
    from tcptrace.lifecycle import fast
    recs = grouped(loopback_connection())
    monkeypatch.setattr(fast, "REGIONS", {})
    want = findings(recs, transitions)
    steps = sum(len(list(iter_steps(r))) for r in recs if r.kind == Kind.STATE)
    assert sum('"transition"' in f and '"inferred"' not in f for f in want) == \
        (steps if transitions else 0)
    # and the client's step into TIME_WAIT, which no tracepoint shows
    assert sum(json.loads(f).get("newstate") == "TIME_WAIT" for f in want) == \
        (1 if transitions else 0)
    monkeypatch.undo()
    taken = spy_fast_paths(monkeypatch)
    assert findings(recs, transitions) == want
    assert len(taken) == 4 and len(set(taken)) == 4     # every shape, every record


@pytest.mark.parametrize("transitions", [True, False], ids=["transitions", "findings"])
def test_whole_life_fast_paths_are_taken_and_agree_with_the_steps(monkeypatch, transitions):
    """Held opens: a connection's sockets are one record each, opening and close together."""
    from tcptrace.lifecycle import fast
    recs = grouped(loopback_connection(), hold_ns=100 * SEC)
    whole = [r for r in recs if r.kind == Kind.STATE and r.nsteps == 5]
    assert len(whole) == 2
    monkeypatch.setattr(fast, "REGIONS", {})
    want = findings(recs, transitions)
    assert want == findings(loopback_connection(), transitions)
    monkeypatch.undo()
    taken = spy_fast_paths(monkeypatch)
    assert findings(recs, transitions) == want
    assert len(taken) == 2 and len(set(taken)) == 2     # both whole-life records


@pytest.mark.parametrize("hold", HOLDS)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "steps"])
def test_each_transition_shows_the_owner_and_tuple_known_at_its_step(monkeypatch, hold, fast):
    """--transitions shares one Ends between a connection's transitions until its owner or tuple
    changes: connect()'s step has no local port yet, and an accepted socket whose listener was
    not seen has no owner until the process makes its own step (close() after the peer's FIN)."""
    from tcptrace.lifecycle import fast
    if not fast:
        monkeypatch.setattr(fast, "REGIONS", {})
    recs = grouped(active_open(SEC, CLIENT_SK, 40000, 8080)
                   + passive_open(SEC + 100, SERVER_SK, 8080, 40000)
                   + active_close(SEC + 5 * MS, CLIENT_SK, 40000, 8080)
                   + passive_close(SEC + 5 * MS + 500, SERVER_SK, 8080, 40000, pid=321,
                                   comm="worker"),
                   hold_ns=HOLDS[hold])
    got = [json.loads(f) for f in findings(recs)]
    shown = sorted((t["time"], t["lport"], t["oldstate"], t["pid"], t["comm"])
                   for t in got if t["type"] == "transition" and not t.get("inferred"))
    inferred = [(t["lport"], t["oldstate"], t["newstate"], t["pid"], t["comm"])
                for t in got if t.get("inferred")]
    assert inferred == [(40000, "FIN_WAIT2", "TIME_WAIT", 100, "client")]
    # (local port, old state, pid, comm) in time order
    assert [s[1:] for s in shown] == [
        (0, "CLOSE", 100, "client"), (8080, "LISTEN", None, None),
        (8080, "SYN_RECV", None, None), (40000, "SYN_SENT", 100, "client"),
        (8080, "ESTABLISHED", None, None), (40000, "ESTABLISHED", 100, "client"),
        (8080, "CLOSE_WAIT", 321, "worker"), (40000, "FIN_WAIT1", 100, "client"),
        (8080, "LAST_ACK", 321, "worker"), (40000, "FIN_WAIT2", 100, "client")]


@pytest.mark.parametrize("active", [True, False], ids=["connect", "accept"])
@pytest.mark.parametrize("closed_by", ["local", "remote"])
def test_every_whole_life_shape_agrees_with_the_steps(monkeypatch, active, closed_by):
    sk = CLIENT_SK if active else SERVER_SK
    opening = (active_open(SEC, sk, 40000, 8080) if active
               else listen(SEC - MS, LISTEN_SK, 8080) + passive_open(SEC, sk, 8080, 40000))
    lport, rport = (40000, 8080) if active else (8080, 40000)
    owner = dict(pid=100, comm="client") if active else {}      # who connected, or accepted
    closing = (active_close(SEC + MS, sk, lport, rport, **owner) if closed_by == "local"
               else passive_close(SEC + MS, sk, lport, rport, **owner))
    recs = grouped(opening + closing, hold_ns=100 * SEC)
    assert [r.nsteps for r in recs if r.kind == Kind.STATE][-1] == 5
    want = findings(opening + closing)
    taken = spy_fast_paths(monkeypatch)
    assert findings(recs) == want
    assert len(taken) == 1


def test_a_record_whose_step_count_disagrees_with_its_arrays_takes_the_steps(monkeypatch):
    """The fast paths are found by the state arrays alone; nsteps must agree with them."""
    from tcptrace.wire import pack_steps
    opens = [r for r in grouped(loopback_connection()) if r.nsteps == 2]
    assert opens
    r = opens[0]
    bad = r._replace(steps=pack_steps(list(iter_steps(r)) + [(0, 0, 0, 0)] * 4), nsteps=3)
    taken = spy_fast_paths(monkeypatch)
    Tracker().process(bad)
    assert not taken
    Tracker().process(r)
    assert len(taken) == 1


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_steps_taken_early_from_a_scan_are_not_taken_twice(name):
    recs = SCENARIOS[name]()
    t0 = min(r.ts_ns for r in recs)
    t1 = max(r.ts_ns for r in recs)
    scans = range(t0 + 50 * MS, t1, 100 * MS)
    got = grouped(recs, scan_at=scans)
    assert findings(got) == findings(recs)


def test_scan_lets_a_socket_resting_in_close_wait_be_reported_stuck_before_it_closes():
    recs = close_wait(5 * SEC)
    enter_cw = SEC + MS
    got = grouped(recs, scan_at=[SEC + 100 * MS])
    scanned = [r for r in got if r.flags & F_SCAN]
    assert [list(iter_steps(r))[-1][2:] for r in scanned] == [(S.ESTABLISHED, S.CLOSE_WAIT)]
    tr = Tracker(stuck_after_ns=2 * SEC, transitions=True)
    for r in sorted(got, key=lambda r: r.ts_ns):
        if r.ts_ns > enter_cw + 3 * SEC:
            break
        tr.process(r)
    tr.tick(enter_cw + 3 * SEC)
    out = tr.take()
    stuck = [f for f in out if f.type == "stuck"]
    assert len(stuck) == 1 and stuck[0].state == "CLOSE_WAIT"
    assert [(f.oldstate, f.newstate) for f in out if f.type == "transition"][-1] == \
        ("ESTABLISHED", "CLOSE_WAIT")


def test_reset_and_retransmissions_ride_in_the_record():
    got = grouped(refused())
    assert [r.kind for r in got] == [Kind.STATE, Kind.SOCK_ERROR]
    assert got[0].rst_ns == SEC + MS and got[0].nsteps == 2
    got = grouped(timeout())
    assert got[0].retrans == 2
