"""tcptrace/host against the kernel's own tools: sock_diag dumps against `ss`, a namespace's
counters against /proc/net/netstat read inside it, its sysctls against `sysctl`. In a lab
namespace, so the readings are of that namespace and nothing else."""
import re
import time

import pytest

from lab import SERVER4, Lab, run
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
