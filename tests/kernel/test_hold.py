"""Held opens on the real kernel (bpf/hold.c): a socket's steps up to ESTABLISHED wait
for its next transition, which carries them; a socket still held after the hold time is sent
early, by a later hit (tt_flush) or, on a quiet host, by user space; and a record still names
the one task that made its owner's steps."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from lab import fresh
from tcptrace.wire import EARLY, F_HELD, F_OWNER

pytestmark = pytest.mark.kernel

HELD = lambda tracer: "held opens on" in tracer.stderr_path.read_text()
STRESS = os.environ.get("TCPTRACE_STRESS") == "1"
# TCPTRACE_STRESS=1: the long-lived connection's test 50 times in a row, under load (`load`)
RUNS = 50 if STRESS else 1
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module", autouse=True)
def load():
    """TCPTRACE_STRESS=1: this module's tests under the load that made the long-lived
    connection's close finding miss its 10 s wait in CI, 1 run in 3 to 8 here: bench/storm.py
    paced at 300 connections a second per CPU (its workers in a session of their own, ended
    with the module), and 2,000 connections held open. Otherwise none."""
    if not STRESS:
        yield
        return
    cpus = os.cpu_count() or 1
    storm = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "storm.py"),
                              "--rate", str(300 * cpus), "--workers", str(cpus),
                              "--mix", "ok=1", "--duration", "3600"],
                             stdout=subprocess.DEVNULL, start_new_session=True)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    holder = subprocess.Popen([sys.executable, os.path.join(HERE, "holders.py"),
                               "127.0.0.1", str(port), "2000", "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(holder.stdout.readline()) == {"listening": port}
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert json.loads(holder.stdout.readline())["open"] == 2000
        assert storm.poll() is None, "bench/storm.py ended early"
        yield
    finally:
        os.killpg(storm.pid, signal.SIGTERM)
        storm.wait(60)
        holder.stdin.close()
        holder.wait(60)


def pair():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    return srv, cli, acc


def states(r):
    return [(s[2], s[3]) for s in r["steps"]]


class Since:
    """What arrived since the test began: findings (lab.fresh) and recorded records (by time):
    an earlier test's connection may have had the same two ports."""

    def __init__(self, tracer):
        self.tracer = tracer
        self.new = fresh(tracer)
        self.ns = time.monotonic_ns()


def raw_of(since, lport, rport):
    """The recorded STATE records of the socket with these ports, in arrival order."""
    return since.tracer.raw(lambda r: r.get("kind") == "state" and r["ts_ns"] >= since.ns
                            and r["sport"] == lport and r["dport"] == rport)


def of(since, kind, lport, rport):
    """Findings of this type about the socket with these ports (the ephemeral port alone may
    be reused by other connections meanwhile)."""
    return lambda r: r["type"] == kind and r["lport"] == lport and r["rport"] == rport \
        and since.new(r)


def connect_finding(since, lport, rport, timeout=10.0):
    return since.tracer.wait_for(of(since, "connect", lport, rport), timeout)[0]


def wait_closed(since, lport, rport):
    """The close finding of this socket. If it never comes, the failure shows what the kernel
    sent for the socket and what the tracer counted lost (as read, from the recording: its
    findings can be further behind), to tell a missed transition from one the tracker did not
    conclude."""
    tracer = since.tracer
    try:
        return tracer.wait_for(of(since, "close", lport, rport))
    except AssertionError as e:
        lost = tracer.raw(lambda r: r.get("kind") == "lost")
        seen = tracer.matching(lambda r: r["type"] != "lost" and lport in (r["lport"], r["rport"])
                               and rport in (r["lport"], r["rport"]))
        raise AssertionError(f"{e}; records: {raw_of(since, lport, rport)}; findings: {seen}; "
                             f"lost: {lost[-5:]}") from None


def test_a_short_connection_is_one_record_per_socket(tracer):
    assert HELD(tracer), "no queue maps on this kernel"
    since = Since(tracer)
    srv, cli, acc = pair()
    cport, port = cli.getsockname()[1], srv.getsockname()[1]
    cli.close()
    acc.recv(1)                       # EOF: the server is in CLOSE_WAIT
    acc.close()
    srv.close()
    for lport, rport in ((cport, port), (port, cport)):
        wait_closed(since, lport, rport)
    client = raw_of(since, cport, port)
    # The record that closes it carries the opening steps too, whether or not a copy of them
    # went out early (the next transition always carries them).
    last = [r for r in client if not r["flags"] & EARLY]
    assert states(last[-1]) == [(7, 2), (2, 1), (1, 4), (4, 5), (5, 7)], client
    server = [r for r in raw_of(since, port, cport) if not r["flags"] & EARLY]
    assert states(server[-1]) == [(10, 3), (3, 1), (1, 8), (8, 9), (9, 7)], server
    # Taken once: one connect, one accept, one close each.
    for kind, lport in (("connect", cport), ("accept", port), ("close", cport), ("close", port)):
        rport = port if lport == cport else cport
        assert len(tracer.matching(of(since, kind, lport, rport))) == 1, kind


def _traffic(stop):
    """Other connections, each making hits of inet_sock_set_state (what runs tt_flush): one
    every 2 ms, about 5,000 hits a second, where one after the hold time would do. Not flat
    out: that put the session tracer (--transitions, every transition a line) more than the
    10 s wait behind the kernel on a slow host, and the close finding, still in the ring,
    looked missing (issue 17)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    while not stop.wait(0.002):
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        c.close()
        a.close()
    srv.close()


@pytest.mark.parametrize("run", range(RUNS))
def test_a_long_lived_connection_is_reported_while_open_by_a_later_hit(tracer, run):
    assert HELD(tracer), "no queue maps on this kernel"
    since = Since(tracer)
    srv, cli, acc = pair()
    cport, port = cli.getsockname()[1], srv.getsockname()[1]
    stop = threading.Event()
    t = threading.Thread(target=_traffic, args=(stop,), daemon=True)
    t.start()
    try:
        conn = connect_finding(since, cport, port)
    finally:
        stop.set()
        t.join(10)
    assert conn["pid"] == os.getpid()
    # It is still open, and its steps came as an early copy sent by a hit in the kernel.
    assert cli.fileno() >= 0
    early = [r for r in raw_of(since, cport, port) if r["flags"] & EARLY]
    assert any(r["flags"] & F_HELD and states(r) == [(7, 2), (2, 1)] for r in early), early
    cli.close()
    acc.recv(1)
    acc.close()
    srv.close()
    wait_closed(since, cport, port)
    # The close record carries the opening steps again; they are taken once.
    assert states([r for r in raw_of(since, cport, port) if not r["flags"] & EARLY][-1]
                  )[:2] == [(7, 2), (2, 1)]
    assert len(tracer.matching(of(since, "connect", cport, port))) == 1
    opened = tracer.matching(lambda r: of(since, "transition", cport, port)(r)
                             and r["newstate"] == "ESTABLISHED")
    assert len(opened) == 1


def test_a_long_lived_connection_on_a_quiet_host_is_reported_while_open(tracer):
    """No hit comes after it (as far as this test makes any): user space takes it from the
    queue. Another process's hits may send it first; either way it is reported while open,
    once."""
    assert HELD(tracer), "no queue maps on this kernel"
    since = Since(tracer)
    srv, cli, acc = pair()
    cport, port = cli.getsockname()[1], srv.getsockname()[1]
    conn = connect_finding(since, cport, port)
    assert conn["pid"] == os.getpid() and conn["handshake_ns"] > 0
    tracer.wait_for(of(since, "accept", port, cport))
    cli.close()
    acc.recv(1)
    acc.close()
    srv.close()
    wait_closed(since, port, cport)
    assert len(tracer.matching(of(since, "connect", cport, port))) == 1
    assert len(tracer.matching(of(since, "accept", port, cport))) == 1


def test_a_connection_another_process_closes_keeps_its_connect_owner(tracer):
    """connect() here, close() in a forked child: one record cannot name both, so the held
    opening steps go out on their own, naming this process."""
    assert HELD(tracer), "no queue maps on this kernel"
    since = Since(tracer)
    srv, cli, acc = pair()
    cport, port = cli.getsockname()[1], srv.getsockname()[1]
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:                    # the child: close the socket once the parent has let go
        try:
            os.read(go_r, 1)
            cli.close()
        finally:
            os._exit(0)
    cli.close()                       # the child still holds it: no FIN yet
    os.write(go_w, b"x")
    assert os.waitpid(child, 0)[1] == 0
    os.close(go_r)
    os.close(go_w)
    acc.recv(1)
    acc.close()
    srv.close()
    wait_closed(since, cport, port)
    conn = connect_finding(since, cport, port)
    assert conn["pid"] == os.getpid()
    fin = [r for r in raw_of(since, cport, port) if (1, 4) in states(r)]
    assert fin and fin[-1]["pid"] == child and fin[-1]["flags"] & F_OWNER
    assert (7, 2) not in states(fin[-1])      # not carried: it would have named the child
    assert len(tracer.matching(of(since, "connect", cport, port))) == 1
