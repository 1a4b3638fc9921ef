"""Every plan the planner can choose compiles, loads, attaches, delivers, and detaches.

The planner's switches (probes.SWITCHES: transport, each optional tracepoint, the rescue, held
opens, the connect hook) make hundreds of programs; compiling one costs 1-2 s here and about
40 s in the emulated CI VM. So the plans built are a pairwise covering set of the switches'
options (tests/pairwise.py): every option, and every pair of options of any two switches, is
compiled together at least once. The set is derived from SWITCHES, so a switch added there is
built here without editing this file. Each plan is reached through probes.plan() itself, given
the check results that make it choose that plan.

Options this kernel cannot have (kprobes on the development microVM) are left out of the set;
test_every_option_can_be_built_here says which, and why.

Each attached plan traces a few loopback connections, and every switch is checked by what it
must show (or must not): a connection's ten transitions in order, the held opening carried into
the close, the reset and error report of a refused connect, the reset a linger-0 close sends,
a SYN retransmission, a connect that fails before its SYN, the rescue's twins, a listener's
SYN-ACK retransmit and accept-queue overflow, and the listener's network namespace in both.
"""
import dataclasses
import errno
import functools
import os
import socket
import struct
import time

import pytest

from pairwise import covering
from tcptrace import states as S
from tcptrace import wire
from tcptrace.kernel import loader, probes
from tcptrace.wire import EARLY, F_KPROBE, F_REASON, F_SYSCALL, Kind

pytestmark = pytest.mark.kernel

# How long a plan's records may take to show what the traffic made. Waits end as soon as they
# show it, so this bounds only a failure, and is what the slowest machine here needs (the
# emulated guest), not the fastest.
TIMEOUT = 60
ADDR, UNROUTABLE = "127.0.0.1", "224.0.0.1"    # connect() to a multicast address: ENETUNREACH
                                               # in tcp_v4_connect, before any state change
CLIENT = [(S.CLOSE, S.SYN_SENT), (S.SYN_SENT, S.ESTABLISHED), (S.ESTABLISHED, S.FIN_WAIT1),
          (S.FIN_WAIT1, S.FIN_WAIT2), (S.FIN_WAIT2, S.CLOSE)]
SERVER = [(S.LISTEN, S.SYN_RECV), (S.SYN_RECV, S.ESTABLISHED), (S.ESTABLISHED, S.CLOSE_WAIT),
          (S.CLOSE_WAIT, S.LAST_ACK), (S.LAST_ACK, S.CLOSE)]


@functools.lru_cache(maxsize=1)
def machine():
    """(this machine's checks by name, {switch: the options it can have}, [what it cannot
    have, and why])."""
    checks = {c.name: c for c in probes.checks()}
    options, missing = {}, []
    for sw in probes.SWITCHES:
        options[sw.name] = []
        for o in sw.options:
            c = checks.get(o.needs)
            if not o.needs or (c and c.status == probes.SUPPORTED):
                options[sw.name].append(o.value)
            else:
                missing.append(f"{sw.name}={o.value}: {o.needs} "
                               f"{c.status if c else 'not checked'}"
                               f"{': ' + c.detail if c else ''}")
    return checks, options, missing


def plans():
    return covering(machine()[1])


def plan_id(row):
    return ",".join(f"{k.split(':')[-1]}={v}" for k, v in row.items())


def pytest_generate_tests(metafunc):
    if "row" in metafunc.fixturenames:
        rows = plans()
        metafunc.parametrize("row", rows, ids=[plan_id(r) for r in rows])


def checks_for(row):
    """The checks as the planner must see them to take `row`: every option better than the one
    taken fails its check."""
    checks = dict(machine()[0])
    for sw in probes.SWITCHES:
        for o in sw.options:
            if o.value == row[sw.name]:
                break
            if o.needs:
                checks[o.needs] = dataclasses.replace(checks[o.needs], status=probes.UNSUPPORTED,
                                                      detail="failed for the test")
    return list(checks.values())


def test_every_option_can_be_built_here():
    missing = machine()[2]
    if missing:
        pytest.skip("not built on this kernel: " + "; ".join(missing))


def bpf_prog_fds():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf-prog"
        except OSError:
            pass
    return n


# BCC warns of map names given as str, and means to stop taking them: a warning here is an error
@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_plan_compiles_attaches_delivers_and_detaches(row):
    from tcptrace.kernel.source import KernelSource
    plan = probes.plan("auto", checks_for(row))
    assert probes_row(plan) == row
    progs_before = bpf_prog_fds()
    traffic = traffic_for(row)
    try:
        src = KernelSource(plan, ports=traffic.ports)
        try:
            assert not [n for n in src.notes if "rescue off" in n], src.notes
            twins = first_programs(plan) if plan.rescue else set()
            assert set(src.progs.twins) == twins
            # typed tracepoints where the plan has them, refused by no verifier here
            assert not [n for n in src.notes if "typed tracepoints refused" in n], src.notes
            typed = twins | {p.replace("tt_prog_", "tt_rescue_") for p in twins}
            assert set(src.progs.typed) == (typed if plan.typed else set())
            # connect()'s entry is traced only where its return cannot find the arguments: a
            # program there sends every system call through the slow path
            syscalls = {tp.decode() for tp in src.progs.b.tracepoint_fds
                        if tp.startswith(b"syscalls:")}
            assert syscalls == ({"syscalls:sys_exit_connect"} | (
                set() if plan.connect_regs else {"syscalls:sys_enter_connect"})
                if plan.connect_hook == "syscall" else set())
            assert bpf_prog_fds() > progs_before
            traffic.run()
            evs, seen = collect(src, traffic, expect(row))
            losses = src.losses(time.monotonic_ns())
        finally:
            src.close()
    finally:
        traffic.close()
    assert bpf_prog_fds() == progs_before, "programs still loaded after close()"
    if seen != expect(row) and [l for l in losses if not l.where.startswith("bpf:")]:
        pytest.skip(f"the kernel skipped hits meanwhile ({losses}): no verdict")
    assert [l for l in losses if l.where.startswith("bpf:")] == []
    assert seen == expect(row), "records:\n" + "\n".join(
        brief(e) if type(e) is wire.Event else repr(e) for e in evs)


def test_a_refused_typed_program_falls_back_to_raw_tracepoints(monkeypatch):
    """Where the verifier refuses a typed tracepoint program (BTF promised what the kernel does
    not allow), the loader compiles again without it, attaches raw tracepoint programs, says
    why, and the transitions still come."""
    plan = probes.plan("auto")
    if not (plan.rescue and plan.typed):
        pytest.skip("no typed tracepoints on this kernel: " + "; ".join(plan.notes))
    from tcptrace.kernel import bpfsys
    from tcptrace.kernel.source import KernelSource

    def refuse(insns, name, btf_id):
        raise OSError(errno.EACCES, "Permission denied: refused for the test")
    monkeypatch.setattr(bpfsys, "load_typed_tracepoint", refuse)
    row = probes_row(plan)
    progs_before = bpf_prog_fds()
    traffic = traffic_for(row)
    try:
        src = KernelSource(plan, ports=traffic.ports)
        try:
            assert [n for n in src.notes if n.startswith("typed tracepoints refused (tt_prog_state"
                                                         ": Permission denied")], src.notes
            assert not plan.typed and src.progs.typed == {}
            assert set(src.progs.twins) == first_programs(plan)
            traffic.run()
            evs, seen = collect(src, traffic, expect(row))
        finally:
            src.close()
    finally:
        traffic.close()
    assert bpf_prog_fds() == progs_before, "programs still loaded after close()"
    assert seen == expect(row), "records:\n" + "\n".join(
        brief(e) if type(e) is wire.Event else repr(e) for e in evs)


def probes_row(plan):
    """The option the plan took of each switch."""
    return {sw.name: plan.choice(sw) for sw in probes.SWITCHES}


def traffic_for(row):
    """The traffic that shows every option of the row."""
    return Traffic(retrans=row["tcp:tcp_retransmit_skb"],
                   listener=row["tcp:tcp_retransmit_synack"] or row["overflow"])


def first_programs(plan):
    """The first program of each hook the plan traces on raw.c's programs (each with a twin)."""
    return {f"tt_prog_{h}" for h, _raw, _tp, _k, hook in loader.HOOKS
            if hook is None or hook in plan.tracepoints}


def expect(row):
    """What each switch's option must show."""
    return {
        "tcp:tcp_retransmit_synack": row["tcp:tcp_retransmit_synack"],
        "overflow": row["overflow"],
        "sock_id": row["sock_id"],
        "rst_reason": row["rst_reason"] if row["raw:tcp_send_reset"] else None,
        "client steps": CLIENT,
        "server steps": SERVER,
        "hold": row["hold"],
        "tcp:tcp_receive_reset": row["tcp:tcp_receive_reset"],
        "sock:inet_sk_error_report": row["sock:inet_sk_error_report"],
        "raw:tcp_send_reset": row["raw:tcp_send_reset"],
        "tcp:tcp_retransmit_skb": row["tcp:tcp_retransmit_skb"],
        "connect_hook": row["connect_hook"],
    }


def collect(src, traffic, want):
    """Poll until the records show `want`, or TIMEOUT. Returns (events, what they show)."""
    evs = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        evs += src.poll(10)
        evs += src.overflows(time.monotonic_ns())       # Samples, when the map changed
        seen = show(evs, traffic)
        if seen == want or time.monotonic() > deadline:
            return evs, seen


def show(evs, t):
    """What the records show, in expect()'s terms."""
    samples = [r for r in evs if type(r) is wire.Sample]
    evs = [e for e in evs if type(e) is wire.Event]
    state = [e for e in evs if e.kind == Kind.STATE]
    of = lambda port, peer: [e for e in state if (e.sport, e.dport) == (port, peer)]
    client = of(t.client, t.port)
    refused = [e for e in state if e.dport == t.closed]     # its local port is gone by now
    linger = {e.skaddr for e in of(t.linger, t.port)}
    kinds = {(e.kind, e.dport) for e in evs}
    failed = [e for e in evs if e.kind == Kind.CONNECT_RET and e.dport == t.closed
              and e.err == -errno.ENETUNREACH]
    synacks = [e for e in evs if e.kind == Kind.SYNACK and e.sport == t.deferring]
    # The overflows map is keyed by listener; without the namespace reads (sock_id) an entry
    # has no port: any is then the deferring listener's (the port filter let only it in).
    overflows = [row for s in samples for row in s.data["listeners"]
                 if row[3] in (t.deferring, 0) and row[4] > 0]
    # an accepted connection's opening names its namespace too (bpf/state.c), or 0
    opening = [e for e in of(t.port, t.client) if next(wire.iter_steps(e))[2] == S.LISTEN]
    ids = {e.aux for e in synacks + opening} | {row[1] for row in overflows}
    resets = [e for e in evs if e.kind == Kind.SEND_RESET and e.skaddr in linger]
    reasons = probes.reset_reasons()[2]     # the running kernel's numbers
    return {
        # the linger-0 close's reset, with a reason the kernel has a name for
        "rst_reason": all(e.flags & F_REASON and e.aux in reasons for e in resets)
        if resets else None,
        "tcp:tcp_retransmit_synack": bool(synacks),
        "overflow": bool(overflows),
        "sock_id": ids == {os.stat("/proc/self/ns/net").st_ino} if ids else None,
        "client steps": steps(client),
        "server steps": steps(of(t.port, t.client)),
        # The opening carried into the close: one record (not an early copy) past ESTABLISHED
        "hold": any(carried(e) for e in client if not e.flags & EARLY),
        "tcp:tcp_receive_reset": any(e.rst_ns for e in refused)
        or (Kind.RECV_RESET, t.closed) in kinds,
        # the linger-0 close's peer learns of the reset (a refused connect's report is not sent
        # where its CLOSE record carries the errno: bpf/facts.c)
        "sock:inet_sk_error_report": any(e.kind == Kind.SOCK_ERROR and e.err == errno.ECONNRESET
                                         and (e.sport, e.dport) == (t.port, t.linger)
                                         for e in evs),
        "raw:tcp_send_reset": any(e.kind == Kind.SEND_RESET and e.skaddr in linger for e in evs),
        "tcp:tcp_retransmit_skb": t.waiting is not None
        and any(e.retrans for e in of(t.waiting, t.full_port)),
        "connect_hook": ("kprobe" if failed[0].flags & F_KPROBE else
                         "syscall" if failed[0].flags & F_SYSCALL else "?") if failed else "none",
    }


def brief(e):
    steps = " ".join(f"{S.name(o)}>{S.name(n)}" for _t, _p, o, n in wire.iter_steps(e)
                     if e.kind == Kind.STATE)
    return (f"{Kind.NAMES[e.kind]} {e.sport}->{e.dport} flags={e.flags:#x} err={e.err} "
            f"retrans={e.retrans} rst={bool(e.rst_ns)} {steps}")


def steps(records):
    """A socket's transitions, each once (an early copy repeats steps), in time order."""
    by_ts = {}
    for e in records:
        for ts, _pid, old, new in wire.iter_steps(e):
            by_ts[ts] = (old, new)
    return [by_ts[ts] for ts in sorted(by_ts)]


def carried(e):
    news = [new for _ts, _pid, _old, new in wire.iter_steps(e)]
    return S.ESTABLISHED in news[:-1]


class Traffic:
    """Loopback sockets for each switch to show itself on, on ports of their own (the port
    filter keeps everything else out): a connection closed normally, one closed with SO_LINGER
    0 (a reset), a connect refused, a connect to an unroutable address, and, when `retrans`,
    a connect whose SYN a full accept queue drops (retransmitted after 1 s)."""

    def __init__(self, retrans, listener=False):
        self.srv = self._listener(16)
        self.port = self.srv.getsockname()[1]
        self.full = self._listener(0)       # backlog 0: one queued connection fills it
        self.full_port = self.full.getsockname()[1]
        probe = socket.socket()
        probe.bind((ADDR, 0))
        self.closed = probe.getsockname()[1]    # a port nothing listens on
        probe.close()
        self.ports = [self.port, self.full_port, self.closed]
        self.retrans = retrans
        # A listener that keeps a handshake open until data comes (TCP_DEFER_ACCEPT: the bare
        # final ACK is ignored, the SYN-ACK retransmitted after 1 s) with room for one: two
        # clients complete their handshakes, both send, the second finds the accept queue
        # full at its final ACK (TCP_LISTEN_OVERFLOW). All on loopback, no firewall.
        self.deferring = None
        self._deferred = []
        if listener:
            self.defer = socket.socket()
            self.defer.bind((ADDR, 0))
            self.defer.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
            self.defer.listen(0)
            self.deferring = self.defer.getsockname()[1]
            self.ports.append(self.deferring)
        self.client = self.linger = self.waiting = None
        self._open = []

    @staticmethod
    def _listener(backlog):
        s = socket.socket()
        s.bind((ADDR, 0))
        s.listen(backlog)
        return s

    def run(self):
        if self.deferring:
            a = socket.create_connection((ADDR, self.deferring))
            b = socket.create_connection((ADDR, self.deferring))
            a.send(b"a")
            b.send(b"b")
            self._deferred = [a, b]
        if self.retrans:
            queued = socket.create_connection((ADDR, self.full_port))
            waiting = socket.socket()
            waiting.setblocking(False)
            assert waiting.connect_ex((ADDR, self.full_port)) == errno.EINPROGRESS
            self._open += [queued, waiting]
            self.waiting = waiting.getsockname()[1]
        c = socket.create_connection((ADDR, self.port))
        a, _ = self.srv.accept()
        self.client = c.getsockname()[1]
        c.close()
        assert a.recv(1) == b""
        a.close()
        c = socket.create_connection((ADDR, self.port))
        a, _ = self.srv.accept()
        self.linger = c.getsockname()[1]
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        a.close()
        with socket.socket() as r:
            assert r.connect_ex((ADDR, self.closed)) == errno.ECONNREFUSED
        with socket.socket() as u:
            assert u.connect_ex((UNROUTABLE, self.closed)) == errno.ENETUNREACH
        if self.retrans:
            self._await_syn_retransmit(self._open[1])
            self._open.pop().close()

    @staticmethod
    def _await_syn_retransmit(s):
        """Until the kernel has retransmitted the SYN: tcp_info.tcpi_retransmits (byte 2)."""
        deadline = time.monotonic() + 3 * TIMEOUT
        while s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[2] == 0:
            assert time.monotonic() < deadline, "the SYN was never retransmitted"
            time.sleep(0.05)

    def close(self):
        for s in self._open + self._deferred + [self.srv, self.full] + \
                ([self.defer] if self.deferring else []):
            s.close()
