"""tcptrace/host against the kernel's own tools: sock_diag dumps against `ss`, a namespace's
counters against /proc/net/netstat read inside it, its sysctls against `sysctl`. In a lab
namespace, so the readings are of that namespace and nothing else."""
import os
import re
import socket
import time

import pytest

from lab import SERVER4, SERVER6, Lab, run, settle, ss_count
from tcptrace.host import counters, netns
from tcptrace.host.diag import Diag

pytestmark = pytest.mark.kernel


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


def test_dumps_counters_and_settings_are_the_namespaces_own(lab):
    lab.sysctl(lab.server, "net.core.somaxconn", "4096")
    lab.sysctl(lab.server, "net.ipv4.tcp_max_syn_backlog", "77")
    srv, cli = lab.agent(lab.server), lab.agent(lab.client)
    port = srv.call("listen", addr=SERVER4, backlog=4)["port"]    # never accepts
    base = f"/proc/{srv.pid}"
    clients = [cli.call("connect", addr=SERVER4, port=port, nonblock=True) for _ in range(8)]
    assert len(clients) == 8
    # the accept queue fills to backlog + 1, as ss shows it
    deadline = time.monotonic() + 10
    while True:
        ss = run(["ss", "-ltnH", f"( sport = :{port} )"], lab.server).split()
        if int(ss[1]) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.01)      # polling the kernel's own table: the signal itself
    diag = netns.run_in(base, Diag)
    try:
        listeners = diag.dump(["LISTEN"], ports=[port])
        assert [(d.lport, d.rqueue, d.wqueue) for d in listeners] == \
            [(port, int(ss[1]), int(ss[2]))] == [(port, 5, 4)]
        assert diag.dump(["LISTEN"], ports=[port + 1]) == []       # filtered in the kernel
        est = diag.dump(["ESTABLISHED", "SYN_RECV"], ports=[port])
        want = run(["ss", "-tanH", "state", "established", "state", "syn-recv",
                    f"( sport = :{port} or dport = :{port} )"], lab.server)
        assert len(est) == len(want.splitlines())
    finally:
        diag.close()
    got = counters.tcp_counters(base)
    text = run(["cat", "/proc/net/netstat"], lab.server).splitlines()
    names, values = text[0].split()[1:], map(int, text[1].split()[1:])
    ext = dict(zip(names, values))
    for k in ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "SyncookiesSent"):
        assert abs(got[k] - ext[k]) <= 2 * 8, k       # SYNs of the 8 clients may still arrive
    assert got["ListenOverflows"] >= 1
    assert counters.sockstat(base)["inuse"] == 1 + 5     # the listener and its queue
    s = counters.sysctls(base)
    assert s["somaxconn"] == 4096 and s["tcp_max_syn_backlog"] == 77
    assert s["tcp_max_syn_backlog"] != counters.sysctls()["tcp_max_syn_backlog"] or \
        run(["sysctl", "-n", "net.ipv4.tcp_max_syn_backlog"]).strip() == "77"
    ino = int(re.search(r"\[(\d+)\]", run(["readlink", f"{base}/ns/net"])).group(1))
    assert ino in netns.namespaces() and ino != netns.own()


def test_one_walk_dumps_both_families_as_the_per_family_dumps_do(lab):
    """Diag asks for both families with one TCPDIAG_GETSOCK request (one walk of the kernel's
    table): on this kernel it is taken, and it returns what a SOCK_DIAG_BY_FAMILY request per
    family does, with and without a port filter, for listeners, connections and TIME_WAIT."""
    srv, cli = lab.agent(lab.server), lab.agent(lab.client)
    ports = []
    for addr in (SERVER4, SERVER6):
        lsn = srv.call("listen", addr=addr, backlog=64)
        ports.append(lsn["port"])
        srv.send("serve", fd=lsn["fd"], n=20, close_first=False)
        assert cli.call("churn", addr=addr, port=lsn["port"], n=20) == {"done": 20}
        assert srv.answer() == {"served": 20}
    settle(lab.client)      # a state change between two dumps would differ them
    waiting = ss_count(lab.client, "time-wait")
    assert 0 < waiting <= 40
    held = [cli.call("connect", addr=addr, port=p) for addr, p in zip((SERVER4, SERVER6), ports)]
    assert all("fd" in h for h in held)
    _until(lambda: ss_count(lab.server, "established") == 2)    # the client's ACKs arrived
    for agent in (srv, cli):        # listeners there, TIME_WAIT here, connected in both
        one, per = (netns.run_in(f"/proc/{agent.pid}", Diag) for _ in range(2))
        per.both = False
        try:
            for states in (["LISTEN"], ["ESTABLISHED", "SYN_SENT", "TIME_WAIT"]):
                for flt in ((), ports[:1]):
                    got, want = ([(s.family, s.state, s.lport, s.rport)
                                  for s in d.dump(states, ports=flt)] for d in (one, per))
                    assert sorted(got) == sorted(want), (states, flt)
                    assert got or (agent is cli and states == ["LISTEN"])
            if agent is cli:
                tw = one.dump(["TIME_WAIT"])
                assert {s.family for s in tw} == {socket.AF_INET, socket.AF_INET6}
                assert len(tw) == ss_count(lab.client, "time-wait") == waiting
            assert one.both is True     # taken: else the test compared per-family twice
        finally:
            one.close()
            per.close()


def _ss_listen(ns, port):
    """(Recv-Q, Send-Q) of the listener on `port`, as `ss -ltn` shows them."""
    out = run(["ss", "-ltnH", f"( sport = :{port} )"], ns).split()
    return int(out[1]), int(out[2])


def _until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "the kernel's table never showed it"
        time.sleep(0.01)      # polling the kernel's own table: the signal itself


def test_listen_sampler_reads_each_listener_as_ss_does(lab):
    """host/samplers.py: Listeners, in a lab namespace: the accept queue and backlog as
    `ss -ltn`, half-open as `ss -tan state syn-recv`, the counters as /proc/net/netstat, the
    settings as sysctl, the owner as `ss -p`; two listeners on one port and address of
    another family are two entries."""
    from tcptrace.host.samplers import LISTEN_COUNTERS, Listeners, Namespaces
    lab.sysctl(lab.server, "net.ipv4.tcp_synack_retries", "3")
    # the client never answers a SYN-ACK: its connects stay half-open at the server
    lab.nft(lab.client, "tcp flags & (syn|ack) == syn|ack drop")
    srv, cli = lab.agent(lab.server), lab.agent(lab.client)
    port = srv.call("listen", addr=SERVER4, backlog=4)["port"]
    other = srv.call("listen", addr=SERVER6, port=port, backlog=7)["port"]
    assert other == port
    for _ in range(3):
        assert cli.call("connect", addr=SERVER4, port=port, nonblock=True)["errno"] == \
            "EINPROGRESS"
    syn_recv = lambda: run(["ss", "-tanH", "state", "syn-recv", f"( sport = :{port} )"],
                           lab.server).count("\n")
    _until(lambda: syn_recv() == 3)
    base = f"/proc/{srv.pid}"
    ino = os.stat(f"{base}/ns/net").st_ino
    sampler = Listeners(namespaces=Namespaces(root="/proc"))
    got = {s.netns: s for s in sampler.sample(time.monotonic_ns())}
    data = got[ino].data
    mine = {(d["family"], d["laddr"], d["lport"]): d for d in data["listeners"]}
    v4, v6 = mine[(socket.AF_INET, SERVER4, port)], mine[(socket.AF_INET6, SERVER6, port)]
    assert (v4["accept_queue"], v4["backlog"]) == _ss_listen(lab.server, port) == (0, 4)
    assert (v4["half_open"], v6["half_open"]) == (syn_recv(), 0) == (3, 0)
    assert v4["backlog"] == 4 and v6["backlog"] == 7
    assert (v4["pid"], v6["pid"]) == (srv.pid, srv.pid) and v4["comm"].startswith("python")
    text = run(["cat", "/proc/net/netstat"], lab.server).splitlines()
    ext = dict(zip(text[0].split()[1:], map(int, text[1].split()[1:])))
    assert data["counters"] == {k: ext[k] for k in LISTEN_COUNTERS}
    assert data["settings"]["tcp_synack_retries"] == 3
    assert data["settings"]["somaxconn"] == \
        int(run(["sysctl", "-n", "net.core.somaxconn"], lab.server))
    # the namespace's second reading: counters again, settings not before refresh_every
    again = {s.netns: s for s in sampler.sample(time.monotonic_ns())}[ino].data
    sampler.close()
    assert "settings" not in again and set(again["counters"]) == set(LISTEN_COUNTERS)
