"""Lifecycle findings against the real kernel, on loopback (127.0.0.1 and ::1).

Every socket belongs to an agent process (tests/kernel/lab.py), so each finding's pid and fd can be
checked against the process that really made the call, and against `ss -tanp`. Readiness comes
from the agents' answers (an answer is sent only once the call returned) and from the tracer's
records (wait_for), never from sleeping.
"""
import pytest

from conftest import STUCK_AFTER, Tracer
from lab import Agent, expect, fresh, ss_users, wall_ns, where

pytestmark = pytest.mark.kernel

LOOPBACK = {"ipv4": "127.0.0.1", "ipv6": "::1"}


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request):
    return request.param


@pytest.fixture
def agents():
    """Factory for agent processes in our own namespace; all killed at the end of the test."""
    made = []

    def make():
        a = Agent()
        made.append(a)
        return a
    yield make
    for a in made:
        a.close()


def _comm(pid):
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _established(agents, addr):
    """A loopback connection: (server agent, client agent, port, server fd, client fd, client
    port), both ends ESTABLISHED and accepted."""
    srv, cli = agents(), agents()
    lsn = srv.call("listen", addr=addr)
    assert lsn["listening"]
    con = cli.call("connect", addr=addr, port=lsn["port"])
    assert "errno" not in con, con
    acc = srv.call("accept", fd=lsn["fd"])
    assert acc["peer"][1] == con["lport"]
    return srv, cli, lsn["port"], acc["fd"], con["fd"], con["lport"]


def test_connect_and_accept(tracer, agents, family):
    addr = LOOPBACK[family]
    new = fresh(tracer)
    srv, cli, port, sfd, cfd, cport = _established(agents, addr)

    [con] = expect(tracer, where(new, "connect", rport=port, lport=cport))
    assert con["pid"] == cli.pid
    assert con["comm"] == _comm(cli.pid)
    assert con["family"] == family
    assert (con["laddr"], con["raddr"]) == (addr, addr)
    assert con["role"] == "active"
    assert con["syn_retransmits"] == 0
    # A plausible handshake, not a step's time mixed up: microseconds on loopback, but the
    # emulated CI guest (Debian 6.1) once took 61 ms; every wrong pairing is off by far more.
    assert 0 < con["handshake_ns"] < 1_000_000_000

    # The child socket is created in softirq: the accept is the listener owner's.
    [acc] = expect(tracer, where(new, "accept", lport=port, rport=cport))
    assert acc["pid"] == srv.pid
    assert acc["role"] == "passive"
    assert acc["family"] == family


def test_refused_closed_port(tracer, agents, family):
    addr = LOOPBACK[family]
    holder, cli = agents(), agents()
    # Bound but never listening: the port stays ours, and a SYN to it gets a RST.
    port = holder.call("bind", addr=addr)["port"]
    new = fresh(tracer)
    got = cli.call("connect", addr=addr, port=port)
    assert got["errno"] == "ECONNREFUSED"

    [ref] = expect(tracer, where(new, "refused", rport=port))
    assert ref["pid"] == cli.pid
    assert ref["family"] == family
    assert ref["raddr"] == addr
    assert ref["reason"] == "refused"
    assert ref["errno"] == "ECONNREFUSED"
    assert ref["syn_retransmits"] == 0
    assert ref["role"] == "active"
    assert ref.get("before_syn") is None          # the SYN went out: a RST answered it
    # Exactly one conclusion for that connect attempt.
    assert len(tracer.matching(lambda r: new(r) and r.get("rport") == port
                               and r["type"] in ("refused", "failed", "connect"))) == 1


def test_close_wait_stuck_then_unstuck(tracer, agents, family):
    addr = LOOPBACK[family]
    new = fresh(tracer)
    srv, cli, port, sfd, cfd, cport = _established(agents, addr)
    cli.call("close", fd=cfd)
    # The server reads EOF: the peer's FIN has arrived, the socket is in CLOSE_WAIT now.
    assert srv.call("recv", fd=sfd) == {"data": ""}

    # The bound on when the tracer decided is asserted on the record's own clock below (age and
    # time since the transition); the wait itself leaves room for a slow machine's pipe.
    [st] = expect(tracer, where(new, "stuck", lport=port, rport=cport), timeout=STUCK_AFTER + 5)
    assert st["state"] == "CLOSE_WAIT"
    assert st["pid"] == srv.pid
    assert st["fd"] == sfd
    assert st["comm"] == _comm(srv.pid)
    assert st["role"] == "passive"
    assert STUCK_AFTER * 1e9 <= st["age_ns"] < (STUCK_AFTER + 1) * 1e9
    assert st["age_is_lower_bound"] is False
    # The age runs from the transition the tracer saw.
    [tr] = tracer.matching(where(new, "transition", lport=port, rport=cport,
                                 oldstate="ESTABLISHED", newstate="CLOSE_WAIT"))
    assert STUCK_AFTER * 1e9 <= wall_ns(st["time"]) - wall_ns(tr["time"]) < (STUCK_AFTER + 1) * 1e9
    # The kernel's own view: that socket, that owner, that descriptor.
    assert ss_users("close-wait", port) == [(srv.pid, sfd)]

    srv.call("close", fd=sfd)
    [un] = expect(tracer, where(new, "unstuck", lport=port, rport=cport))
    assert un["state"] == "CLOSE_WAIT"
    assert un["newstate"] == "LAST_ACK"
    assert un["pid"] == srv.pid
    assert un["duration_ns"] >= STUCK_AFTER * 1e9
    [cl] = expect(tracer, where(new, "close", lport=port, rport=cport))
    assert cl["closed_by"] == "remote"
    assert cl["pid"] == srv.pid
    assert cl["path"] == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]


def test_fin_wait2_stuck(tracer, agents):
    addr = LOOPBACK["ipv4"]
    new = fresh(tracer)
    srv, cli, port, sfd, cfd, cport = _established(agents, addr)
    # Half-close: our FIN goes out, the peer acknowledges it and never sends its own.
    cli.call("shutdown", fd=cfd, how="wr")
    assert srv.call("recv", fd=sfd) == {"data": ""}

    [st] = expect(tracer, where(new, "stuck", lport=cport, rport=port), timeout=STUCK_AFTER + 5)
    assert st["state"] == "FIN_WAIT2"
    assert st["pid"] == cli.pid
    assert st["fd"] == cfd
    assert st["role"] == "active"
    assert STUCK_AFTER * 1e9 <= st["age_ns"] < (STUCK_AFTER + 1) * 1e9
    assert ss_users("fin-wait-2", cport) == [(cli.pid, cfd)]
    # The peer is stuck too, in CLOSE_WAIT: its application never closes.
    [peer] = expect(tracer, where(new, "stuck", lport=port, rport=cport), timeout=10)
    assert (peer["state"], peer["pid"], peer["fd"]) == ("CLOSE_WAIT", srv.pid, sfd)


def test_linger0_close_resets(tracer, agents, family):
    addr = LOOPBACK[family]
    new = fresh(tracer)
    srv, cli, port, sfd, cfd, cport = _established(agents, addr)
    cli.call("linger0", fd=cfd)
    cli.call("close", fd=cfd)
    assert srv.call("recv", fd=sfd)["errno"] == "ECONNRESET"

    [mine] = expect(tracer, where(new, "reset", lport=cport, rport=port))
    assert mine["reset_by"] == "local"
    assert mine["pid"] == cli.pid
    assert mine["state"] == "ESTABLISHED"
    assert mine["role"] == "active"
    assert mine["path"] == ["SYN_SENT", "ESTABLISHED", "CLOSE"]
    [theirs] = expect(tracer, where(new, "reset", lport=port, rport=cport))
    assert theirs["reset_by"] == "remote"
    assert theirs["pid"] == srv.pid
    assert theirs["state"] == "ESTABLISHED"
    assert theirs["role"] == "passive"
    # A reset connection is not also reported closed.
    assert not tracer.matching(lambda r: new(r) and r["type"] == "close"
                               and {r.get("lport"), r.get("rport")} == {port, cport})


def test_preexisting_close_wait(agents, tmp_path):
    """A socket stuck before the tracer started is found from the kernel's table at start-up."""
    addr = LOOPBACK["ipv4"]
    srv, cli, port, sfd, cfd, cport = _established(agents, addr)
    cli.call("close", fd=cfd)
    assert srv.call("recv", fd=sfd) == {"data": ""}
    assert ss_users("close-wait", port) == [(srv.pid, sfd)]

    t = Tracer(["--stuck-after", "1"], tmp_path)
    try:
        new = lambda r: True          # noqa: E731  (a tracer of its own: every record is fresh)
        [st] = expect(t, where(new, "stuck", lport=port, rport=cport), timeout=10)
        assert st["state"] == "CLOSE_WAIT"
        assert st["pid"] == srv.pid
        assert st["fd"] == sfd
        assert st["age_is_lower_bound"] is True
        assert st["partial"] is True
        assert 1e9 <= st["age_ns"] < 2e9

        srv.call("close", fd=sfd)
        [un] = expect(t, where(new, "unstuck", lport=port, rport=cport))
        assert (un["state"], un["newstate"], un["pid"]) == ("CLOSE_WAIT", "LAST_ACK", srv.pid)
    finally:
        rc = t.stop()
    assert rc == 0, t.stderr_path.read_text()


def test_connect_called_again_after_refusal(tracer, agents):
    """Some event loops call connect() a second time to learn a non-blocking connect's outcome.
    The second call sends no SYN and returns the stored error: it is not a second refusal."""
    addr = LOOPBACK["ipv4"]
    holder, cli = agents(), agents()
    port = holder.call("bind", addr=addr)["port"]
    new = fresh(tracer)
    got = cli.call("connect", addr=addr, port=port, nonblock=True)
    # Even on loopback the RST is handled only after connect() releases the socket lock, so the
    # answer is EINPROGRESS (measured); anything else and this test would prove nothing.
    assert got["errno"] == "EINPROGRESS"
    cli.call("writable", fd=got["fd"], so_error=False)
    again = cli.call("connect_again", fd=got["fd"], addr=addr, port=port)
    assert again["errno"] == "ECONNREFUSED"

    expect(tracer, where(new, "refused", rport=port, pid=cli.pid))
    # A marker after it: once its record is out, any record of the second call would be too.
    mark = holder.call("bind", addr=addr)["port"]
    assert cli.call("connect", addr=addr, port=mark)["errno"] == "ECONNREFUSED"
    expect(tracer, where(new, "refused", rport=mark, pid=cli.pid))
    assert [r["type"] for r in tracer.matching(lambda r: new(r) and r.get("rport") == port
                                               and r["type"] != "transition")] == ["refused"]


def test_connect_called_again_after_success(tracer, agents):
    """The same idiom on success: the second connect() returns 0, later ones EISCONN; neither
    is a connect of its own, nor a failure."""
    addr = LOOPBACK["ipv4"]
    srv, cli = agents(), agents()
    lsn = srv.call("listen", addr=addr)
    port = lsn["port"]
    new = fresh(tracer)
    got = cli.call("connect", addr=addr, port=port, nonblock=True)
    assert got["errno"] == "EINPROGRESS"
    assert cli.call("writable", fd=got["fd"]) == {"so_error": None}
    assert cli.call("connect_again", fd=got["fd"], addr=addr, port=port) == {}
    assert cli.call("connect_again", fd=got["fd"], addr=addr, port=port)["errno"] == "EISCONN"
    srv.call("accept", fd=lsn["fd"])

    expect(tracer, where(new, "connect", rport=port, pid=cli.pid))
    mark = srv.call("bind", addr=addr)["port"]
    assert cli.call("connect", addr=addr, port=mark)["errno"] == "ECONNREFUSED"
    expect(tracer, where(new, "refused", rport=mark, pid=cli.pid))
    assert [r["type"] for r in tracer.matching(lambda r: new(r) and r.get("rport") == port
                                               and r["pid"] == cli.pid
                                               and r["type"] != "transition")] == ["connect"]


def test_close_wait_stuck_on_dual_stack_listener(tracer, agents):
    """A server listening on :: that accepted an IPv4 client: the kernel keeps that socket as
    AF_INET6 with v4-mapped addresses (and lists it in /proc/net/tcp6), the client's as AF_INET.
    The stuck finding must still find its owner and descriptor."""
    srv, cli = agents(), agents()
    lsn = srv.call("listen", addr="::")
    port = lsn["port"]
    new = fresh(tracer)
    con = cli.call("connect", addr="127.0.0.1", port=port)
    acc = srv.call("accept", fd=lsn["fd"])
    assert acc["peer"] == ["::ffff:127.0.0.1", con["lport"]]
    cli.call("close", fd=con["fd"])
    assert srv.call("recv", fd=acc["fd"]) == {"data": ""}

    [st] = expect(tracer, where(new, "stuck", lport=port, rport=con["lport"]),
                  timeout=STUCK_AFTER + 5)
    assert (st["state"], st["pid"], st["fd"]) == ("CLOSE_WAIT", srv.pid, acc["fd"])
    assert (st["family"], st["laddr"], st["raddr"]) == ("ipv6", "::ffff:127.0.0.1",
                                                        "::ffff:127.0.0.1")
    assert ss_users("close-wait", port) == [(srv.pid, acc["fd"])]
