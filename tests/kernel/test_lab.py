"""Lifecycle findings against real network behaviour, in the namespace lab (tests/kernel/lab.py).

Client namespace 10.77.0.1 / fd77::1, server namespace 10.77.0.2 / fd77::2, joined by veth.
nftables in a namespace's input chain shapes what arrives there: a dropped SYN, a firewall RST,
an ICMP error, a lost final ACK. The client agent runs inside the client namespace, so each
finding's pid must be that agent's.
"""
import errno
import itertools
import json
import os
import socket
import time

import pytest

from conftest import STUCK_AFTER, delivery_loss
from lab import (CLIENT4, CLIENT6, SERVER4, SERVER6, Lab, expect, fresh, run, snmp_tcp,
                 ss_users, where)
from tcptrace import states as S
from tcptrace.wire import EARLY

pytestmark = [pytest.mark.kernel, pytest.mark.lab]

ADDRS = {"ipv4": (CLIENT4, SERVER4, "ip"), "ipv6": (CLIENT6, SERVER6, "ip6")}
PORT = 5070
SYN_SENT, CLOSE = S.SYN_SENT, S.CLOSE


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request):
    return request.param


def test_lab_builds_and_cleans_up():
    with Lab() as lab:
        names = run(["ip", "netns", "list"])
        assert lab.client in names and lab.server in names
        addrs = run(["ip", "-brief", "addr"], lab.server)
        assert f"{SERVER4}/24" in addrs and f"{SERVER6}/64" in addrs
        # Nothing of the lab leaks into the namespace the tests run in.
        assert SERVER4 not in run(["ip", "-brief", "addr"])
        srv, cli = lab.agent(lab.server), lab.agent(lab.client)
        assert srv.call("listen", addr="::", port=PORT)["listening"]
        for addr in (SERVER4, SERVER6):
            got = cli.call("connect", addr=addr, port=PORT)
            assert "errno" not in got and got["elapsed_s"] < 0.5, got
        ns = (lab.client, lab.server)
    names = run(["ip", "netns", "list"])
    assert ns[0] not in names and ns[1] not in names


def test_handshake_with_one_dropped_syn(tracer, lab, family):
    caddr, saddr, ipver = ADDRS[family]
    lab.nft(lab.server, f"tcp dport {PORT} tcp flags & (syn|ack) == syn "
                        f"numgen inc mod 2 == 0 counter drop comment \"syn\"")
    srv, cli = lab.agent(lab.server), lab.agent(lab.client)
    assert srv.call("listen", addr=saddr, port=PORT)["listening"]
    new = fresh(tracer)
    got = cli.call("connect", addr=saddr, port=PORT)
    assert "errno" not in got, got
    assert lab.nft_counter(lab.server, "syn") == 1      # exactly the first SYN was dropped

    [con] = expect(tracer, where(new, "connect", rport=PORT, lport=got["lport"], raddr=saddr))
    assert con["pid"] == cli.pid
    assert con["laddr"] == caddr
    assert con["family"] == family
    assert con["syn_retransmits"] == 1
    # The initial RTO is 1 s (TCP_TIMEOUT_INIT): one retransmission costs a second.
    assert 0.9e9 <= con["handshake_ns"] <= 1.5e9, con["handshake_ns"]
    [acc] = expect(tracer, where(new, "accept", lport=PORT, rport=got["lport"], laddr=saddr))
    assert acc["pid"] == srv.pid


def test_refused_by_firewall_reset(tracer, lab, family):
    caddr, saddr, ipver = ADDRS[family]
    lab.nft(lab.server, f"tcp dport {PORT} reject with tcp reset")
    srv, cli = lab.agent(lab.server), lab.agent(lab.client)
    # A listener is there: the refusal is the firewall's, not the stack's.
    assert srv.call("listen", addr=saddr, port=PORT)["listening"]
    new = fresh(tracer)
    since = time.monotonic_ns()
    got = cli.call("connect", addr=saddr, port=PORT)
    assert got["errno"] == "ECONNREFUSED"

    [ref] = expect(tracer, where(new, "refused", rport=PORT, raddr=saddr, pid=cli.pid))
    assert ref["pid"] == cli.pid
    assert ref["laddr"] == caddr
    assert (ref["reason"], ref["errno"], ref["syn_retransmits"]) == ("refused", "ECONNREFUSED", 0)
    assert snmp_tcp(lab.client)["AttemptFails"] == 1
    assert close_errno(tracer, since, cli.pid, saddr) in (errno.ECONNREFUSED, None)


def test_timeout(tracer, lab):
    lab.nft(lab.server, f"tcp dport {PORT} tcp flags & (syn|ack) == syn "
                        f"counter drop comment \"syn\"")
    lab.sysctl(lab.client, "net.ipv4.tcp_syn_retries", 2)
    # 6.5+ retransmits the first tcp_syn_linear_timeouts (default 4) SYNs after a flat 1 s,
    # within the same 7 s budget: 5 retransmissions here instead of 2. Turn that off where it
    # exists, so every kernel gives the classic exponential backoff this test pins down.
    if os.path.exists("/proc/sys/net/ipv4/tcp_syn_linear_timeouts"):
        lab.sysctl(lab.client, "net.ipv4.tcp_syn_linear_timeouts", 0)
    cli = lab.agent(lab.client)
    new = fresh(tracer)
    since = time.monotonic_ns()
    with RetransHits(PORT) as hits:
        got = cli.call("connect", addr=SERVER4, port=PORT, timeout=20)
    assert got["errno"] == "ETIMEDOUT"
    # The SYN and its two retransmissions (at 1 s and 3 s); the timer at 7 s gives up.
    assert lab.nft_counter(lab.server, "syn") == 3
    assert snmp_tcp(lab.client)["RetransSegs"] == 2

    # pid in the predicate: failures carry no local port to tell this attempt from another
    # run's in its own lab; the attribution itself is checked on loopback, by port.
    [f] = expect(tracer, where(new, "failed", rport=PORT, raddr=SERVER4, pid=cli.pid))
    assert close_errno(tracer, since, cli.pid, SERVER4) in (errno.ETIMEDOUT, None)
    unseen = tracer.matching(lambda r: new(r) and r["type"] == "lost"
                             and r["where"] == "unseen:tcp_retransmit_skb")
    if f["syn_retransmits"] < 2 and unseen:
        # The kernel ran no BPF program for a retransmission (this guest: a softirq on top of
        # a pid-1 thread, docs/bench.md), and tcptrace said so: no verdict on the count
        pytest.skip(f"{sum(r['count'] for r in unseen)} tcp_retransmit_skb hits ran no BPF "
                    f"program (counted unseen): {f['syn_retransmits']} of 2 counted")
    assert (f["reason"], f["errno"], f["syn_retransmits"]) == ("timeout", "ETIMEDOUT", 2), \
        f"{f}\nthe recording of its socket, and losses:\n" \
        f"{socket_evidence(tracer, since, cli.pid, SERVER4, PORT)}\n" \
        f"the kernel's own tcp_retransmit_skb hits (ftrace, no BPF):\n{hits.seen}"
    # (2 << retries) - 1 initial RTOs: 7 s (tcp_write_timeout -> retransmits_timed_out).
    assert 6.9e9 <= f["duration_ns"] <= 7.6e9, f["duration_ns"]
    assert abs(f["duration_ns"] / 1e9 - got["elapsed_s"]) < 0.1


class RetransHits:
    """The kernel's own account of the retransmissions to a port, for a failure message:
    tcp:tcp_retransmit_skb in a tracefs instance of the test's own, no BPF involved. A line per
    hit, with its time (CLOCK_MONOTONIC, the records' clock), CPU, and the task and process
    (TGID) it ran on: a softirq's bystander, which matters, because on the 6.18 development
    guest BPF never runs in a softirq on top of a thread of pid 1 and nothing counts that
    (docs/bench.md): tcptrace counts those (kernel/tally.py), and this shows which they were. In `seen` after the block; a witness that cannot be set up says why
    there instead of failing the test."""
    EVENT = "events/tcp/tcp_retransmit_skb"

    def __init__(self, dport):
        self.dport = dport
        self.dir = None
        self.seen = "(not read)"

    def _write(self, rel, value):
        with open(os.path.join(self.dir, rel), "w") as f:
            f.write(value)

    def __enter__(self):
        from tcptrace.kernel import probes
        tracefs, note = probes.ensure_tracefs()
        if tracefs is None:
            self.seen = f"(no ftrace witness: {note or 'no tracefs'})"
            return self
        try:
            self.dir = os.path.join(tracefs, "instances", f"lab-retrans-{os.getpid()}")
            os.mkdir(self.dir)
            self._write("trace_clock", "mono")
            self._write("options/record-tgid", "1")
            self._write(f"{self.EVENT}/filter", f"dport == {self.dport}")
            self._write(f"{self.EVENT}/enable", "1")
        except OSError as e:
            self.seen = f"(no ftrace witness: {e})"
            self._remove()
        return self

    def _remove(self):
        if self.dir is None or not os.path.isdir(self.dir):
            return
        for rel, value in ((f"{self.EVENT}/enable", "0"), ("options/record-tgid", "0")):
            try:
                self._write(rel, value)
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass

    def __exit__(self, *exc):
        if self.dir is not None and os.path.isdir(self.dir):
            try:
                with open(os.path.join(self.dir, "trace")) as f:
                    self.seen = "".join(l for l in f if not l.startswith("#")).rstrip() \
                        or "(no hits)"
            except OSError as e:
                self.seen = f"(no ftrace witness: {e})"
        self._remove()


def close_errno(tracer, since_ns, pid, raddr):
    """The errno the SYN_SENT -> CLOSE record of pid's one connect to raddr:PORT since since_ns
    carries (bpf/state.c: tt_close_err): the one the finding needs without waiting for the
    error report. None where the plan has no BTF offsets to read it with."""
    if "recursion rescue on" not in tracer.ready["plan"]:
        return None
    recent = tracer.raw(lambda r: r["kind"] == "state" and r["ts_ns"] >= since_ns)
    sks = {r["skaddr"] for r in recent
           if r["pid"] == pid and r["daddr"] == raddr and r["dport"] == PORT}
    # Not the early copies (a scan of `socks`, a held socket's copy): a scan that reads the
    # entry between the CLOSE step's write and the record's send copies that step too, and the
    # tracker takes such steps once (wire.EARLY). Seen under a host loaded by other storms.
    closes = [r for r in recent if r["skaddr"] in sks and not r["flags"] & EARLY
              and (r["oldstate"], r["newstate"]) == (SYN_SENT, CLOSE)]
    assert len(closes) == 1, socket_evidence(tracer, since_ns, pid, raddr, PORT)
    return closes[0]["err"]


def socket_evidence(tracer, since_ns, pid, raddr, rport):
    """What the session tracer's recording holds of one connect since since_ns (CLOCK_MONOTONIC,
    the records' clock), as JSON lines for a failure message: its socket's records (STATE
    records of `pid` to raddr:rport name the socket address; every record at that address
    follows, scan copies included, and any RETRANS or error report to raddr:rport, whose task is
    a softirq bystander) and the recording's `lost` records since then, then every `lost` record
    the session tracer has output. Repeats of a line (a scan copies a resting socket's record
    every scan) are shown once, with their count."""
    def to(r):
        return r.get("daddr") == raddr and r.get("dport") == rport

    recent = tracer.raw(lambda r: r.get("ts_ns", 0) >= since_ns and r["kind"] != "tick")
    sks = {r["skaddr"] for r in recent if r["kind"] == "state" and r["pid"] == pid and to(r)}
    lines = [json.dumps(r) for r in recent
             if r.get("skaddr") in sks or r["kind"] == "lost"
             or (r["kind"] in ("retrans", "sock_error") and to(r))]
    lines += [json.dumps(r) for r in tracer.matching(lambda r: r["type"] == "lost")]
    lines = [line + (f"  (x{n})" if n > 1 else "")
             for line, n in ((k, len(list(g))) for k, g in itertools.groupby(lines))]
    return "\n".join(lines) or "(nothing recorded)"


UNREACH = {"ipv4": "reject with icmp type host-unreachable",
           "ipv6": "reject with icmpv6 type addr-unreachable"}


def test_unreachable(tracer, lab, family):
    caddr, saddr, ipver = ADDRS[family]
    lab.nft(lab.server, f"{ipver} daddr {saddr} tcp dport {PORT} counter {UNREACH[family]} "
                        f"comment \"unreach\"")
    cli = lab.agent(lab.client)
    new = fresh(tracer)
    since = time.monotonic_ns()
    got = cli.call("connect", addr=saddr, port=PORT)
    assert got["errno"] == "EHOSTUNREACH"
    # Measured, 6.18: over veth the ICMP error comes back while connect() still holds the socket
    # lock (the reply is processed in the softirq run at the end of the SYN's transmit), so
    # tcp_v4_err/tcp_v6_err can only note a soft error. The retransmitted SYN, sent from the
    # timer with the socket unlocked, draws the error that ends the attempt, 1 s later.
    assert lab.nft_counter(lab.server, "unreach") == 2
    assert snmp_tcp(lab.client)["RetransSegs"] == 1
    assert 0.9 <= got["elapsed_s"] <= 1.5

    [f] = expect(tracer, where(new, "failed", rport=PORT, raddr=saddr, pid=cli.pid))
    assert f["pid"] == cli.pid
    assert f["laddr"] == caddr
    assert (f["reason"], f["errno"], f["syn_retransmits"]) == ("unreachable", "EHOSTUNREACH", 1)
    assert close_errno(tracer, since, cli.pid, saddr) in (errno.EHOSTUNREACH, None)
    assert not tracer.matching(lambda r: new(r) and r["pid"] == cli.pid
                               and r["type"] in ("refused", "connect"))


def test_cancelled(tracer, lab):
    lab.nft(lab.server, f"tcp dport {PORT} tcp flags & (syn|ack) == syn drop")
    cli = lab.agent(lab.client)
    new = fresh(tracer)
    since = time.monotonic_ns()
    got = cli.call("connect", addr=SERVER4, port=PORT, nonblock=True)
    # EINPROGRESS: tcp_v4_connect set SYN_SENT and sent the SYN before returning. Nothing waits on
    # the tracer here: the close must come well before the 1 s retransmission.
    assert got["errno"] == "EINPROGRESS"
    # Asking again while the SYN is unanswered: "already in progress", not a failure.
    again = cli.call("connect_again", fd=got["fd"], addr=SERVER4, port=PORT)
    assert again == {"errno": "EALREADY"}
    cli.call("close", fd=got["fd"])

    [f] = expect(tracer, where(new, "failed", rport=PORT, raddr=SERVER4, pid=cli.pid))
    assert f["pid"] == cli.pid
    assert f["lport"] == got["lport"]
    assert (f["reason"], f["errno"], f["syn_retransmits"]) == ("cancelled", None, 0)
    assert close_errno(tracer, since, cli.pid, SERVER4) in (0, None)
    # The EALREADY was reported before the close: had it become a finding, it would be out.
    assert [r["type"] for r in tracer.matching(lambda r: new(r) and r["pid"] == cli.pid
                                               and r["type"] != "transition")] == ["failed"]


def test_last_ack_lingers_when_final_ack_is_lost(tracer, lab):
    """The server closes after the client's FIN; the client's ACK of the server's FIN never
    arrives, so the server's orphaned socket sits in LAST_ACK retransmitting its FIN until
    tcp_orphan_retries runs out."""
    # Few retries, so the kernel gives up soon after the 2 s stuck threshold. Measured, 6.18:
    # with 3, the FIN is retransmitted 5 times and LAST_ACK ends 6.7 s after close(); with 2,
    # 4 times and 3.3 s, too close to the threshold for a slow (TCG) machine's tracer.
    lab.sysctl(lab.server, "net.ipv4.tcp_orphan_retries", 3)
    srv, cli = lab.agent(lab.server), lab.agent(lab.client)
    lsn = srv.call("listen", addr=SERVER4, port=PORT)
    new = fresh(tracer)
    con = cli.call("connect", addr=SERVER4, port=PORT)
    acc = srv.call("accept", fd=lsn["fd"])
    cport = con["lport"]
    cli.call("close", fd=con["fd"])
    assert srv.call("recv", fd=acc["fd"]) == {"data": ""}       # CLOSE_WAIT now
    # From here on the client's pure ACKs do not arrive.
    lab.nft(lab.server, f"ip saddr {CLIENT4} tcp sport {cport} "
                        f"tcp flags & (syn|ack|fin|rst) == ack counter drop comment \"ack\"")
    srv.call("close", fd=acc["fd"])
    closed_at = time.monotonic()

    [st] = expect(tracer, where(new, "stuck", lport=PORT, rport=cport, laddr=SERVER4),
                  timeout=STUCK_AFTER + 4)
    assert st["state"] == "LAST_ACK"
    assert STUCK_AFTER * 1e9 <= st["age_ns"] < (STUCK_AFTER + 1) * 1e9
    # An orphan: closed by its process, kept by the kernel. The kernel's table names no holder,
    # and neither does the finding (owners.KernelView.resolve maps an orphan to no process).
    assert (st["pid"], st["fd"]) == (None, None)
    assert ss_users("last-ack", PORT, lab.server) == []
    assert run(["ss", "-tanH", "state", "last-ack"], lab.server).count(f":{cport}") == 1

    # How long the kernel keeps retrying differs between versions (6.18: 5 FIN retransmissions,
    # 6.7 s; 6.1: ~3.4 s), so the yardstick is the kernel's own table: the time from close()
    # until ss no longer lists the socket in LAST_ACK.
    while run(["ss", "-tanH", "state", "last-ack"], lab.server).count(f":{cport}"):
        assert time.monotonic() - closed_at < 15, "LAST_ACK never ended"
        time.sleep(0.02)       # polling the kernel's table: the signal itself
    gone_after = time.monotonic() - closed_at
    [un] = expect(tracer, where(new, "unstuck", lport=PORT, rport=cport, laddr=SERVER4), timeout=10)
    assert (un["state"], un["newstate"]) == ("LAST_ACK", "CLOSE")
    assert un["duration_ns"] > STUCK_AFTER * 1e9
    assert abs(un["duration_ns"] / 1e9 - gone_after) < 0.3, (un["duration_ns"], gone_after)
    # Every FIN (the first and each retransmission) drew an ACK that was dropped.
    retrans = snmp_tcp(lab.server)["RetransSegs"]
    assert retrans >= 1
    assert lab.nft_counter(lab.server, "ack") == 1 + retrans
    [cl] = expect(tracer, where(new, "close", lport=PORT, rport=cport, laddr=SERVER4))
    assert cl["path"] == ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]
    assert cl["closed_by"] == "remote"
    assert "reset_by" not in cl


N_OK, N_REFUSED = 500, 100


def test_accepts_are_owned_by_the_listener_of_their_namespace(tracer, lab):
    """Containers all listen on one port, each in its own namespace: an accepted connection
    belongs to the listener of its namespace (and address), whichever listened last."""
    root = socket.socket()
    root.bind(("127.0.0.1", 0))
    root.listen()
    port = root.getsockname()[1]        # free here; the lab's namespaces are new: free there
    try:
        agents = [lab.agent(lab.client), lab.agent(lab.server)]
        for a in agents:                # listening after this process: the newest listeners
            assert a.call("listen", addr="0.0.0.0", port=port)["listening"]
        new = fresh(tracer)
        cli = socket.create_connection(("127.0.0.1", port))
        mine = cli.getsockname()[1]
        theirs = []
        for a, src in zip(agents, ("127.0.0.2", "127.0.0.3")):   # ports may repeat: sources not
            got = a.call("connect", addr="127.0.0.1", port=port, src=src)
            assert "errno" not in got, got
            theirs.append((src, got["lport"]))
        [acc] = expect(tracer, where(new, "accept", lport=port, raddr="127.0.0.1", rport=mine))
        assert (acc["pid"], acc["comm"]) == (os.getpid(), open("/proc/self/comm").read().strip())
        for a, (src, cport) in zip(agents, theirs):
            [acc] = expect(tracer, where(new, "accept", lport=port, raddr=src, rport=cport))
            assert acc["pid"] == a.pid, (acc, [x.pid for x in agents])
        cli.close()
    finally:
        root.close()


def test_counts_match_snmp(tracer):
    """Every connect, accept and refusal of a burst is one finding: the counts equal the deltas
    of the kernel's own counters, read in a namespace where nothing else runs."""
    with Lab(veth=False) as lab:
        a = lab.agent(lab.client)
        hold = a.call("bind", addr="127.0.0.1", port=5072)      # reserved, never listening
        new = fresh(tracer)
        got = a.call("burst", addr="127.0.0.1", port=5071, closed_port=hold["port"],
                     n_ok=N_OK, n_refused=N_REFUSED, timeout=60)
        assert got["refused"] == N_REFUSED
        d = {k: got["after"][k] - got["before"][k]
             for k in ("ActiveOpens", "PassiveOpens", "AttemptFails", "EstabResets")}
        assert d == {"ActiveOpens": N_OK + N_REFUSED, "PassiveOpens": N_OK,
                     "AttemptFails": N_REFUSED, "EstabResets": 0}
        # A sentinel after the burst: findings come out in event order, so once its refusal is
        # out every finding of the burst is out too, and the counts below are final.
        sentinel = a.call("connect", addr="127.0.0.1", port=5073)
        assert sentinel["errno"] == "ECONNREFUSED"
        expect(tracer, where(new, "refused", rport=5073, pid=a.pid), timeout=30)

    def count(type_, **kw):
        return len(tracer.matching(where(new, type_, pid=a.pid, **kw)))
    assert not tracer.matching(lambda r: new(r) and delivery_loss(r))
    connects = count("connect", rport=5071)
    accepts = count("accept", lport=5071)
    refused = count("refused", rport=hold["port"])
    assert (connects, accepts, refused) == (N_OK, N_OK, N_REFUSED)
    assert connects + refused == d["ActiveOpens"]
    assert accepts == d["PassiveOpens"]
    assert refused == d["AttemptFails"]
    # No failure and no reset among the burst's connections, told by their ports: the pid alone
    # can also name a socket of an earlier process that had this pid number (pids wrap in the
    # VM's long session), concluded in the same window
    ports = {5071, hold["port"], 5073}
    odd = tracer.matching(lambda r: new(r) and r["type"] in ("failed", "reset")
                          and r.get("pid") == a.pid)
    assert not [r for r in odd if {r.get("lport"), r.get("rport")} & ports], odd


def test_preexisting_close_wait_in_another_namespace(tmp_path):
    """A socket stuck before the tracer started, inside another network namespace (a container):
    no transition is left to reveal it, so only start-up seeding of every namespace finds it."""
    from conftest import Tracer
    with Lab(veth=False) as lab:
        srv, cli = lab.agent(lab.server), lab.agent(lab.server)
        lsn = srv.call("listen", addr="127.0.0.1", port=PORT)
        con = cli.call("connect", addr="127.0.0.1", port=PORT)
        acc = srv.call("accept", fd=lsn["fd"])
        cli.call("close", fd=con["fd"])
        assert srv.call("recv", fd=acc["fd"]) == {"data": ""}
        assert ss_users("close-wait", PORT, lab.server) == [(srv.pid, acc["fd"])]
        t = Tracer(["--stuck-after", "1"], tmp_path)
        try:
            [st] = expect(t, lambda r: r["type"] == "stuck" and r["lport"] == PORT
                          and r["rport"] == con["lport"], timeout=30)  # due in 1 s
            assert (st["state"], st["pid"], st["fd"]) == ("CLOSE_WAIT", srv.pid, acc["fd"])
        finally:
            t.stop()


def test_listeners_from_before_start_own_their_accepts_in_each_namespace(tmp_path):
    """Listeners that predate the tracer are seeded from every namespace's socket table, each
    with its namespace: two containers' servers on one port keep their own accepts."""
    from conftest import Tracer
    with Lab(veth=False) as lab:
        agents = [lab.agent(lab.client), lab.agent(lab.server)]
        for a in agents:
            assert a.call("listen", addr="0.0.0.0", port=PORT)["listening"]
        t = Tracer([], tmp_path)
        try:
            for a, src in zip(agents, ("127.0.0.2", "127.0.0.3")):
                got = a.call("connect", addr="127.0.0.1", port=PORT, src=src)
                assert "errno" not in got, got
                [acc] = expect(t, lambda r: r["type"] == "accept" and r["lport"] == PORT
                               and r["raddr"] == src and r["rport"] == got["lport"])
                assert acc["pid"] == a.pid, (acc, [x.pid for x in agents])
        finally:
            t.stop()
