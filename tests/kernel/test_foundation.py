"""Foundation, on the real kernel: the transition stream itself, the facts that explain a
refused connect, completeness against /proc/net/snmp, and how the tool refuses to run."""
import collections
import ctypes
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import Tracer, delivery_loss
from lab import fresh
from tcptrace.wire import Kind


pytestmark = pytest.mark.kernel

CLIENT_SEQ = [("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
              ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]
# Observed on 6.1 and 6.18: the accepted child socket is created at the final ACK (its first
# transition is LISTEN -> SYN_RECV), and after the client's FIN it takes the passive-close path.
# TIME_WAIT never appears: the kernel hands the client to a timewait sock and reports
# FIN_WAIT2 -> CLOSE.
SERVER_SEQ = [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED"), ("ESTABLISHED", "CLOSE_WAIT"),
              ("CLOSE_WAIT", "LAST_ACK"), ("LAST_ACK", "CLOSE")]
# A kernel transition; not a step tcptrace infers (into or out of TIME_WAIT), which the kernel
# never makes as a transition of the socket
TRANSITION = lambda r: r["type"] == "transition" and not r.get("inferred")


def lifecycle(tracer, first, lport, rport, new):
    """The transitions of one socket generation: find the record `first` (old, new) with these
    ports among the `new` ones (lab.fresh: the session tracer has earlier tests' records, and
    ports repeat), then follow its skaddr from that generation's start to its CLOSE."""
    anchor = tracer.wait_for(lambda r: TRANSITION(r) and (r["oldstate"], r["newstate"]) == first
                             and r["lport"] == lport and r["rport"] == rport and new(r))[0]
    sk = anchor["skaddr"]
    same = tracer.wait_for(lambda r: TRANSITION(r) and r["skaddr"] == sk and r["newstate"] == "CLOSE"
                           and r["time"] >= anchor["time"])
    recs = tracer.matching(lambda r: TRANSITION(r) and r["skaddr"] == sk)
    i = recs.index(anchor)
    while i > 0 and recs[i]["oldstate"] not in ("CLOSE", "LISTEN"):
        i -= 1
    out = []
    for r in recs[i:]:
        out.append(r)
        if r["newstate"] == "CLOSE":
            break
    assert same
    return out


# Each test below runs twice: through the programs (on raw tracepoints, where the kernel has BTF),
# and through their twins alone (bpf/raw.c), which take the hits the programs are skipped for.
BOTH_PATHS = pytest.mark.parametrize("path", ["tracer", "rescue_tracer"],
                                     ids=["programs", "twins"])


def tracer_for(request, path):
    t = request.getfixturevalue(path)
    if path == "rescue_tracer":
        assert "recursion rescue on" in t.stderr_path.read_text(), "no rescue on this kernel"
    return t


@BOTH_PATHS
@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["ipv4", "ipv6"])
def test_loopback_connection_exact_transitions(request, path, family, host):
    tracer = tracer_for(request, path)
    new = fresh(tracer)
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.socket(family)
    cli.connect((host, port))
    acc, _ = srv.accept()
    cport = cli.getsockname()[1]
    cli.close()                      # client closes first: the active-close path
    acc.recv(1)                      # EOF: the FIN has arrived, the server is in CLOSE_WAIT
    acc.close()
    srv.close()
    client = lifecycle(tracer, ("SYN_SENT", "ESTABLISHED"), cport, port, new)
    # anchored on SYN_RECV -> ESTABLISHED: on 6.1 the child's first record still carries the
    # listener's tuple (inet_csk_clone_lock sets the state before copying the peer's)
    server = lifecycle(tracer, ("SYN_RECV", "ESTABLISHED"), port, cport, new)
    assert [(r["oldstate"], r["newstate"]) for r in client] == CLIENT_SEQ
    assert [(r["oldstate"], r["newstate"]) for r in server] == SERVER_SEQ
    # the local port is not yet bound when the SYN_SENT transition fires
    assert client[0]["lport"] == 0 and client[0]["rport"] == port
    # connect() runs in the caller's context: that transition names this process
    assert client[0]["pid"] == os.getpid()
    fam = "ipv4" if family == socket.AF_INET else "ipv6"
    assert {r["family"] for r in client + server} == {fam}
    assert client[1]["laddr"] == host and client[1]["raddr"] == host
    conn = tracer.wait_for(lambda r: r["type"] == "connect" and r["lport"] == cport
                           and r["rport"] == port and new(r))[0]
    # A plausible handshake, not a step's time mixed up: microseconds on loopback, but the
    # emulated CI guest (Debian 6.1) once took 61 ms; every wrong pairing is off by far more.
    assert conn["pid"] == os.getpid() and 0 < conn["handshake_ns"] < 1_000_000_000
    acc_f = tracer.wait_for(lambda r: r["type"] == "accept" and r["lport"] == port
                            and r["rport"] == cport and new(r))[0]
    assert acc_f["pid"] == os.getpid()


@BOTH_PATHS
def test_refused_connect_transitions_and_facts_tied_to_one_socket(request, path):
    tracer = tracer_for(request, path)
    new = fresh(tracer)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]          # bound, never listening: a closed port
    c = socket.socket()
    with pytest.raises(ConnectionRefusedError):
        c.connect(("127.0.0.1", port))
    cport = c.getsockname()[1]
    c.close()
    probe.close()
    f = tracer.wait_for(lambda r: r["type"] == "refused" and r["rport"] == port and new(r))[0]
    assert (f["errno"], f["pid"], f["lport"]) == ("ECONNREFUSED", os.getpid(), cport)
    seq = lifecycle(tracer, ("SYN_SENT", "CLOSE"), cport, port, new)
    assert [(r["oldstate"], r["newstate"]) for r in seq] == [("CLOSE", "SYN_SENT"),
                                                            ("SYN_SENT", "CLOSE")]
    sk = seq[0]["skaddr"]
    # The raw facts, from the recording: the reset on that very socket, and the error report
    # (which carries no socket pointer) by its local port.
    tracer.wait_for(lambda r: r["type"] == "refused" and r["rport"] == port and new(r))
    # (an skaddr spans many generations on a busy host: the ports pin this one)
    # The reset came while the socket's steps were pending in the kernel, so it is told in the
    # record that carries them (rst_ns), between its SYN and its CLOSE.
    closes = tracer.raw(lambda r: r["kind"] == "state" and r["skaddr"] == sk
                        and r["sport"] == cport and r["dport"] == port and r["newstate"] == 7)
    assert len(closes) == 1
    steps = closes[0]["steps"]
    assert [(s[2], s[3]) for s in steps] == [(7, 2), (2, 7)]      # CLOSE->SYN_SENT->CLOSE
    assert steps[0][0] < closes[0]["rst_ns"] <= steps[1][0]
    # The CLOSE carries the errno the kernel set before it (bpf/state.c: tt_close_err).
    rescue = "recursion rescue on" in tracer.ready["plan"]
    assert closes[0]["err"] == (111 if rescue else 0)
    assert not tracer.raw(lambda r: r["kind"] == "recv_reset" and r["skaddr"] == sk
                          and r["sport"] == cport)
    # Its error report says the same, and is sent only where the CLOSE could not carry it; the
    # "no error" report of the socket's teardown (tcp_disconnect) is never sent.
    errs = tracer.raw(lambda r: r["kind"] == "sock_error" and r["sport"] == cport)
    assert [e["err"] for e in errs] == ([] if rescue else [111])      # ECONNREFUSED


def wait_past_marker(tracer, timeout=30):
    """Make a connection on 127.0.0.1 and wait for its client's CLOSE: records leave the tracer
    in time order, so once it is out, every record of what happened before it is."""
    new = fresh(tracer)
    m = socket.socket()
    m.bind(("127.0.0.1", 0))
    m.listen()
    socket.create_connection(m.getsockname()).close()
    mport = m.getsockname()[1]
    m.close()
    tracer.wait_for(lambda r: TRANSITION(r) and r["rport"] == mport and r["newstate"] == "CLOSE"
                    and new(r), timeout=timeout)


BURST = r"""
import socket, sys, threading
n, addr = int(sys.argv[1]), sys.argv[2]
srv = socket.socket(); srv.bind((addr, 0)); srv.listen(4096); port = srv.getsockname()[1]
print(port, flush=True); sys.stdin.readline()          # the test reads snmp, then says go
def serve():
    for _ in range(n):
        a, _ = srv.accept(); a.close()
t = threading.Thread(target=serve); t.start()
for _ in range(n):
    c = socket.create_connection((addr, port)); c.close()
t.join(); print("done", flush=True)
"""


@pytest.fixture
def netns():
    name = f"tt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns_snmp(ns):
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=True,
                         capture_output=True, text=True).stdout
    lines = [l.split() for l in out.splitlines() if l.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def test_burst_of_1000_matches_active_opens_with_zero_loss(tracer, netns):
    n, addr = 1000, "127.77.0.1"     # an address only this namespace's loopback uses
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", BURST, str(n), addr],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    before = ns_snmp(netns)
    lost_before = tracer.matching(delivery_loss)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "done"
    assert p.wait(60) == 0
    after = ns_snmp(netns)
    wait_past_marker(tracer)
    syn_sent = tracer.matching(lambda r: TRANSITION(r) and r["newstate"] == "SYN_SENT"
                               and r["oldstate"] == "CLOSE" and r["raddr"] == addr
                               and r["rport"] == port)
    active = after["ActiveOpens"] - before["ActiveOpens"]
    assert active == n
    assert len(syn_sent) == active
    connects = tracer.matching(lambda r: r["type"] == "connect" and r["raddr"] == addr
                               and r["rport"] == port)
    accepts = tracer.matching(lambda r: r["type"] == "accept" and r["laddr"] == addr
                              and r["lport"] == port)
    assert len(connects) == active
    assert len(accepts) == after["PassiveOpens"] - before["PassiveOpens"] == n
    # No loss during the burst (loss counters are machine-wide, so an earlier test's recursion
    # miss on other traffic is not this burst's: only records since it started count).
    assert tracer.matching(delivery_loss)[len(lost_before):] == []


CHURN = r"""
import os, socket, sys
n, addr, cpu = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
os.sched_setaffinity(0, {cpu})
srv = socket.socket(); srv.bind((addr, 0)); srv.listen(512); port = srv.getsockname()[1]
print(port, flush=True)
while sys.stdin.readline().strip() == "go":          # a round of n connections per "go"
    for _ in range(n):
        c = socket.create_connection((addr, port)); a, _ = srv.accept(); c.close(); a.close()
    print("done", flush=True)
"""


class _MapAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 108)]



# A regular tracepoint program of the test's own on the hook tcptrace traces: it counts the
# transitions of connections to ADDR, an IPv4 address as a u32 in network byte order (not the
# listener's own transitions), so the test knows how many hits
# the kernel let a regular tracepoint program see.
TP_COUNTER = r"""
BPF_ARRAY(seen, u64, 1);
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    u32 s = 0, d = 0, k = 0;
    if (args->protocol != 6 || args->family != 2)
        return 0;
    if ((args->oldstate == 7 && args->newstate == 10) ||
        (args->oldstate == 10 && args->newstate == 7))
        return 0;
    __builtin_memcpy(&s, args->saddr, 4);
    __builtin_memcpy(&d, args->daddr, 4);
    if (s != ADDR && d != ADDR)
        return 0;
    u64 *v = seen.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_transitions_in_softirqs_that_blind_tracepoint_programs_are_seen(tracer, pace, netns):
    """Where the kernel skips every regular tracepoint program, tcptrace still sees every
    transition. A thread on CPU 0 keeps walking an empty hash map of 4M buckets with
    BPF_MAP_LOOKUP_BATCH: the kernel holds bpf_prog_active for the walk
    (bpf_disable_instrumentation), as it does for tcptrace's own reads of its map. RPS steers the
    namespace's loopback receive work to CPU 0, where it runs in softirq over the walk, while
    the connections are made from CPU 1. trace_call_bpf() skips every tracepoint program hit
    in that softirq (a counting program of the test's own shows it); tcptrace's programs, on
    raw tracepoints, are not subject to that check (bpf/raw.c). Without BTF it runs tracepoint
    programs, and this test does not apply. The session tracer is the one under test: one of
    its own would cost a compile (~20 s in the TCG VM) and trace the churn a third time."""
    import bcc
    from tcptrace.kernel.bpfsys import MapScanner
    from tcptrace.kernel.bpfsys import bpf
    t = tracer
    if "recursion rescue on" not in t.ready["plan"]:
        pytest.skip("no BTF offsets: tcptrace runs regular tracepoint programs here")
    addr = "127.78.0.1"
    counter = bcc.BPF(text=TP_COUNTER.replace(
        "ADDR", f"{int.from_bytes(socket.inet_aton(addr), 'little')}U").encode())
    seen_by_tp = counter[b"seen"]
    subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                    "echo 1 > /sys/class/net/lo/queues/rx-0/rps_cpus"], check=True)
    fd, err = bpf(0, _MapAttr(1, 8, 8, 1 << 22, 1))        # BPF_MAP_CREATE, hash, no prealloc
    assert fd >= 0, os.strerror(err)
    scanner = MapScanner(fd, 8, 8)
    stop = threading.Event()

    def walk():
        os.sched_setaffinity(0, {0})                      # this thread only
        while not stop.is_set():
            scanner.values()
    # A round is as many connections as this machine makes and traces in about 5 s: 1000 on the
    # development host, fewer in emulation, where a thousand take minutes to trace (and every
    # tracer alive traces them).
    n = pace.conns_for(5.0, lo=200, hi=1000)
    lost_before = len(t.matching(delivery_loss))
    walker = threading.Thread(target=walk)
    try:
        p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", CHURN, str(n),
                              addr, "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = int(p.stdout.readline())
        walker.start()
        # Rounds until the kernel has skipped the test's tracepoint program (the walk and the
        # softirq must meet on CPU 0, which a busy machine can delay), at most 10.
        rounds = 0
        while rounds < 10:
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "done"
            rounds += 1
            if seen_by_tp[ctypes.c_int(0)].value < 10 * n * rounds:
                break
        p.stdin.close()
        assert p.wait(60) == 0
        stop.set()
        walker.join()
        churned = time.monotonic()
        n *= rounds
        skipped = 10 * n - seen_by_tp[ctypes.c_int(0)].value
        mine = lambda r: TRANSITION(r) and addr in (r["laddr"], r["raddr"]) and port in (
            r["lport"], r["rport"])
        # The tracer reads its loss counters every 100 ms (tcptrace/kernel/live.py) and stamps a
        # loss with the time of that read: a marker made 0.5 s after the churn comes after the
        # read that would count a loss of it.
        time.sleep(max(0.0, churned + 0.5 - time.monotonic()))
        wait_past_marker(t, timeout=pace.deadline(n))
    finally:
        stop.set()
        if walker.is_alive():
            walker.join()
        os.close(fd)
        counter.cleanup()
    err_text = t.stderr_path.read_text()
    assert skipped > 0, "the kernel never skipped a tracepoint program: the setup failed"
    assert t.matching(delivery_loss)[lost_before:] == [], err_text
    # Each socket's transitions, exactly once: a chain from its first state to CLOSE in which
    # every step starts where the last one ended (a lost or doubled step breaks it). Which
    # close path a connection takes varies (both ends close at once, over two CPUs).
    listener = {("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")}
    starts = (("CLOSE", "SYN_SENT"), ("LISTEN", "SYN_RECV"))
    open_, done, broken = {}, 0, []
    for r in t.matching(mine):
        step = (r["oldstate"], r["newstate"])
        if step in listener:
            continue
        sk = r["skaddr"]
        if (open_.get(sk) if sk in open_ else "start") != (step[0] if sk in open_ else "start") \
                or (sk not in open_ and step not in starts):
            broken.append((sk, open_.get(sk), step))
            open_.pop(sk, None)
            if step not in starts:
                continue
        open_[sk] = step[1]
        if step[1] == "CLOSE":
            del open_[sk]
            done += 1
    # Known residue: in about one run in three the kernel runs no BPF program at all for some of
    # these hits (149 and 339 of 10,000 in two runs here; the tally counts them, below, as it
    # did for the regular tracepoint programs before). Breaks came only in those runs (80
    # sockets with 149 hits unseen): a missed step cuts a chain, and can leave a socket's
    # pending steps in the kernel's maps to be told with a later socket at that address (its
    # steps with the earlier socket's ports). Regular
    # tracepoint programs miss most of these hits (see `skipped`: each socket makes about 6
    # transitions in the steered softirq), so nearly every socket would break: a bound of 10%
    # (of breaks, each a socket generation's chain cut or a step after it) still fails a tracer
    # blinded here.
    assert len(broken) + len(open_) <= 2 * n // 10, (skipped, len(broken), broken[:20])
    assert done >= 2 * n - 2 * n // 10, (done, n, skipped, err_text)
    # Steps no program of ours ran for are counted by the tally (`unseen:`, machine-wide, so
    # other traffic can only add; raw tracepoint programs leave some too): every transition of
    # the churn, 10 per connection, is shown or counted.
    seen = [r for r in t.matching(mine) if (r["oldstate"], r["newstate"]) not in listener]
    unseen = sum(r["count"] for r in t.matching(lambda r: r["type"] == "lost"
                                                 and r["where"].startswith("unseen:")))
    assert len(seen) + unseen >= 10 * n, (len(seen), unseen, n, skipped, err_text)


def test_records_the_ring_refuses_go_through_the_spill_buffer(netns, tmp_path):
    """A ring of one page (19 records) overflows under a burst: what it refuses goes through the
    per-CPU spill buffer, and what that cannot take either is counted. Every transition of the
    burst is shown or counted lost, and the spilled ones decode like any other."""
    t = Tracer(["--transitions"], tmp_path, {"TCPTRACE_TEST_RING_PAGES": "1"})
    n, addr = 300, "127.79.0.1"
    try:
        if t.ready["plan"].split(";")[0] != "transport ringbuf":
            pytest.skip("no BPF ring buffer on this kernel: nothing to spill from")
        p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", BURST, str(n),
                              addr], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = int(p.stdout.readline())
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done"
        assert p.wait(60) == 0
        wait_past_marker(t)
    finally:
        assert t.stop() == 0
    err = t.stderr_path.read_text()
    spilled = re.search(r"(\d+) records the ring buffer refused went through the spill", err)
    assert spilled and int(spilled.group(1)) > 0, err
    # every kind of loss: the refused records (bpf:state), and the hits other tracers on the
    # machine made the kernel skip (recursion:, unseen:), which no tracer can show
    lost = sum(r["count"] for r in t.matching(lambda r: r["type"] == "lost"))
    seen = t.matching(lambda r: TRANSITION(r) and port in (r["lport"], r["rport"])
                      and addr in (r["laddr"], r["raddr"])
                      and (r["oldstate"], r["newstate"]) not in (("CLOSE", "LISTEN"),
                                                                 ("LISTEN", "CLOSE")))
    # Both ends of every connection: 10 transitions each, all shown or counted (the count is
    # machine-wide, so other traffic can only add to it).
    assert len(seen) <= 10 * n <= len(seen) + lost
    assert all(r["family"] == "ipv4" and r["oldstate"] != r["newstate"] for r in seen)


def test_transitions_no_bpf_program_ran_for_are_counted_lost(netns):
    """Hits of inet_sock_set_state that ran no BPF program and counted no miss either are
    found against a tracefs instance counting the same tracepoint (kernel/tally.py). A burst's
    transitions all reach BPF and none is reported unseen; then k hits are taken out of the
    BPF program's own count, as if the kernel had not run it for them, and exactly k are
    reported unseen. The instance is gone afterwards."""
    from tcptrace.kernel import probes, source as kernel
    # What a tcptrace killed with SIGKILL leaves: an instance named after a pid now gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    tracefs, _ = probes.ensure_tracefs()
    stale = os.path.join(tracefs, "instances", f"tcptrace-{dead.pid}")
    try:
        os.mkdir(stale)
    except OSError as e:
        pytest.skip(f"no tracefs instances here: {e}")
    src = kernel.KernelSource(probes.plan())
    inst = None
    try:
        tally = next((t.tally for t in src._losses.tallied if t.kind == Kind.STATE), None)
        if tally is None:
            pytest.skip("; ".join(src.notes))
        assert not os.path.exists(stale)
        inst = tally.dir
        assert os.path.isdir(inst)
        n, addr = 200, "127.80.0.1"
        t0 = tally.count()
        p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", BURST, str(n),
                              addr], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        p.stdout.readline()
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "done"
        assert p.wait(60) == 0
        assert tally.count() - t0 >= 10 * n         # machine-wide: other traffic adds
        def unseen():
            got = collections.Counter()
            for rec in src.losses(0):
                if rec.where.startswith("unseen:"):
                    got[rec.where] += rec.count
            return got
        assert unseen() == {}
        # SYN retransmissions are tallied too: a failed connect's count has nothing else
        retrans = [t for t in src._losses.tallied if t.where == "unseen:tcp_retransmit_skb"]
        assert len(retrans) == 1 and os.path.isdir(retrans[0].tally.dir)
        inst = [t.tally.dir for t in src._losses.tallied]
        hits, key = src.progs.table("hits"), ctypes.c_int(Kind.STATE)
        vals = list(hits.getvalue(key))
        cpu = max(range(len(vals)), key=vals.__getitem__)
        vals[cpu] -= 37
        hits[key] = hits.Leaf(*vals)
        # (no retransmission happened to take some from: 5 more in its tally's count instead)
        retrans[0].base -= 5
        assert unseen() == {"unseen:inet_sock_set_state": 37, "unseen:tcp_retransmit_skb": 5}
        assert unseen() == {}                   # reported once
    finally:
        src.close()
    assert inst is None or not any(os.path.exists(d) for d in inst)


def test_connect_failing_before_any_syn_is_reported(tracer, netns):
    """No route at all (a namespace with only lo): connect() fails with ENETUNREACH inside
    tcp_v4_connect, before any state change. Seen through the tcp_v4_connect kretprobe where
    the kernel has kprobes, through syscalls:sys_exit_connect where it does not."""
    script = ("import socket,sys\ns=socket.socket()\n"
              "try: s.connect(('10.200.0.1', 4242))\n"
              "except OSError as e: print(e.errno, flush=True)\n"
              "sys.stdin.readline()\n")
    new = fresh(tracer)
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert int(p.stdout.readline()) == 101          # ENETUNREACH
        f = tracer.wait_for(lambda r: r["type"] == "failed" and r["raddr"] == "10.200.0.1"
                            and r["rport"] == 4242 and new(r))[0]
    finally:
        p.stdin.write("\n")
        p.stdin.close()
        p.wait(10)
    assert (f["reason"], f["errno"], f["before_syn"]) == ("unreachable", "ENETUNREACH", True)
    assert f["pid"] == p.pid or f["comm"] == "python3"
    plan = tracer.ready["plan"]
    assert f["source"] == ("kprobe" if "kprobes on tcp_v4_connect" in plan else "syscall")


def _kernel_has_kprobes():
    """Independent of tcptrace's own probe: CONFIG_KPROBES puts register_kprobe in kallsyms."""
    with open("/proc/kallsyms") as f:
        return any(line.rstrip().endswith(" register_kprobe") for line in f)


def test_doctor_reports_hooks_and_plan():
    r = subprocess.run([sys.executable, "-m", "tcptrace", "doctor", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    checks = {c["name"]: c for c in d["checks"]}
    assert d["ready"] is True
    assert checks["sock:inet_sock_set_state"]["status"] == "supported"
    assert checks["sock:inet_sock_set_state"]["min_kernel"] == "4.16"
    if os.environ.get("TCPTRACE_IN_VM") == "1":
        assert checks["kprobes"]["status"] == "supported"
    has = _kernel_has_kprobes()
    assert checks["kprobes"]["status"] == ("supported" if has else "unsupported")
    if has:
        assert d["plan"]["connect_hook"] == "kprobe"
        assert "kprobes on tcp_v4_connect/tcp_v6_connect" in d["plan_summary"]
    else:
        assert d["plan"]["connect_hook"] == "syscall"
        assert any("kprobes unsupported" in n for n in d["plan"]["notes"])
    assert "sock:inet_sock_set_state" in d["plan"]["tracepoints"]
    tracefs = [c["detail"] for c in d["checks"] if c["name"] == "tracefs"][0]
    assert checks["transition tally"]["status"] == (
        "supported" if os.path.isdir(os.path.join(tracefs, "instances")) else "unsupported")


@pytest.mark.parametrize("cmd", [["watch", "--duration", "1"], ["report"], ["doctor"]])
def test_unprivileged_user_gets_exit_77_and_one_line(cmd):
    r = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all",
                        sys.executable, "-m", "tcptrace"] + cmd,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 77, r.stderr
    assert "Traceback" not in r.stderr
    if cmd[0] != "doctor":
        # where perf_event_paranoid is 3 (Debian's kernels), CAP_SYS_ADMIN is needed besides
        with open("/proc/sys/kernel/perf_event_paranoid") as f:
            level = int(f.read())
        extra = (f", CAP_SYS_ADMIN (kernel.perf_event_paranoid is {level}: this kernel opens "
                 "perf events for it only; or set it to 2)") if level >= 3 else ""
        assert r.stderr.strip().splitlines() == [
            "tcptrace: tracing needs root, or CAP_BPF, CAP_PERFMON, CAP_DAC_OVERRIDE (not root; "
            f"lacking CAP_BPF, CAP_PERFMON, CAP_DAC_OVERRIDE{extra}); try: sudo tcptrace ..."]
        assert r.stdout == ""


def test_map_scanner_reads_every_entry_of_a_large_hash_map():
    """The pending-steps map is read with BPF_MAP_LOOKUP_BATCH in chunks; across chunk edges no
    entry may be missed or doubled. Checked against BCC's own iteration of the same map."""
    import ctypes
    import bcc
    from tcptrace.kernel.bpfsys import MapScanner
    b = bcc.BPF(text=b'BPF_F_TABLE("hash", u64, u64, m, 8192, BPF_F_NO_PREALLOC);')
    try:
        m = b[b"m"]
        for i in range(3000):
            m[ctypes.c_ulonglong(0xffff888100000000 + i * 192)] = ctypes.c_ulonglong(i * 7)
        chunks = MapScanner(m.map_fd, 8, 8, chunk=256).values()
        assert chunks is not None, "BPF_MAP_LOOKUP_BATCH unsupported"
        got = sorted(int.from_bytes(c[i:i + 8], "little")
                     for c in chunks for i in range(0, len(c), 8))
        assert len(chunks) > 1
        assert got == sorted(v.value for v in m.values()) == [i * 7 for i in range(3000)]
        # One entry per call: the first bucket holding two makes the kernel answer ENOSPC, the
        # scanner grows its buffers mid-walk and must go on from where it was, not start over.
        small = MapScanner(m.map_fd, 8, 8, chunk=1)
        chunks = small.values()
        assert small.chunk > 1
        assert sorted(int.from_bytes(c[i:i + 8], "little")
                      for c in chunks for i in range(0, len(c), 8)) == got
        m.clear()
        assert MapScanner(m.map_fd, 8, 8).values() == []
    finally:
        b.cleanup()
