#!/usr/bin/env python3
"""A loopback connection storm: successful, refused and half-closed TCP connections at a target
rate (or flat out) for a fixed time, with the kernel's own count of what it did.

    sudo python3 bench/storm.py --rate 20000 --duration 5          # JSON result on stdout
    sudo python3 bench/storm.py --rate 0 --duration 5               # flat out
    sudo python3 bench/storm.py --mix ok=8,refused=1,half=1

Why it looks like this:
  - It runs in a fresh, anonymous network namespace (unshare(CLONE_NEWNET), lo up), so the
    /proc/net/snmp deltas it reports (ActiveOpens, PassiveOpens, AttemptFails) are caused by the
    storm alone: they are the ground truth a tracer's transition count is checked against. The
    namespace dies with the last worker; nothing to clean up. Tracepoints see every namespace, so
    tracers in the root namespace still trace it.
  - Every server address is 127.O.W.D (O a second octet drawn at random per run, W the worker,
    D one of --dests), and the client side is 127.0.0.1 (the route's source address), so every
    transition of the storm's connections carries exactly one "127.O." string (the result's
    `marker`) in a tracer's output line; bench/run.py counts those and ignores other traffic on
    the box (other test suites, which may use fixed 127.x addresses of their own).
  - One process per core (--workers), each a single epoll loop holding both the client and the
    server ends of its connections: no threads, no GIL, no cross-process hand-off. Connects are
    blocking: on loopback the handshake completes inside connect() (the SYN-ACK is processed in
    the sender's softirq), so a blocking connect costs one syscall and never waits, as long as
    the accept queue has room (backlog 65535, drained between batches).

Connection kinds (all end in CLOSE on both sides, so each makes a fixed number of transitions):
  ok       connect, close at once (client closes first); the server accepts and closes.
           10 transitions.
  refused  connect to a port nobody listens on: RST, ECONNREFUSED. 2 transitions.
  half     connect, shutdown(SHUT_WR) (the client half-closes, the server sits in CLOSE_WAIT),
           the server sees EOF, writes a reply into the half-open connection and closes; the
           client reads the reply and EOF, then closes. 10 transitions.

Expected transitions = 10 * PassiveOpens + 2 * AttemptFails (PERFORMANCE-NOTES.md: the snmp
counters matched the client's outcomes exactly over 270 runs). Listener sockets are bound to
0.0.0.0, so their own CLOSE transitions carry no 127.O address and are neither expected nor
counted.
"""
import argparse
import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time

CLONE_NEWNET = 0x40000000
RESERVED_OCTETS = {0, 77}   # 127.0.0.1 is everyone's; tests/kernel uses 127.77.0.1
KINDS = ("ok", "refused", "half")
BASE_PORT = 20000          # worker w listens on BASE_PORT + 10*w (ok) and +1 (half); +2 is refused
REPLY = b"r" * 64


def snmp_tcp():
    """The Tcp: counters of this process's network namespace, and the TcpExt ones that count
    what its listeners dropped (a storm that overran them was not the storm it meant to be)."""
    out = {}
    for path, prefix in (("/proc/net/snmp", "Tcp:"), ("/proc/net/netstat", "TcpExt:")):
        with open(path) as f:
            lines = [l.split() for l in f if l.startswith(prefix)]
        out.update({k: int(v) for k, v in zip(lines[0][1:], lines[1][1:])})
    return out


def enter_fresh_netns():
    """unshare(CLONE_NEWNET), bring lo up, widen the limits that a storm hits first."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare(CLONE_NEWNET): {os.strerror(e)} (run as root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # net sysctls are per namespace: these touch only the new one.
    for path, value in (("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"),
                        ("/proc/sys/net/core/somaxconn", "65535"),
                        ("/proc/sys/net/ipv4/tcp_max_syn_backlog", "65535")):
        with open(path, "w") as f:
            f.write(value)


def fork_child(run):
    """Fork a process that calls run() and exits: 0, or 1 after printing the traceback. It never
    returns into the parent's code (os._exit), so no cleanup of the parent's runs twice."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            run()
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def raise_nofile(n):
    """Raise the soft limit towards n; the hard limit only if we may (CAP_SYS_RESOURCE, which a
    container's root may lack). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(hard, n)))
        return n
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard


def parse_mix(text):
    mix = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {k!r} (one of {', '.join(KINDS)})")
        mix[k] = int(v)
    if not sum(mix.values()):
        raise argparse.ArgumentTypeError("the mix is empty")
    return mix


def pattern(mix):
    """Interleave the kinds by weight (ok=8,refused=1,half=1 -> 8 ok spread among the others)."""
    total = sum(mix.values())
    out, acc = [], {k: 0.0 for k in mix}
    for _ in range(total):
        for k in mix:
            acc[k] += mix[k] / total
        k = max(acc, key=acc.get)
        acc[k] -= 1
        out.append(k)
    return out


def pick_octet():
    while True:
        o = os.urandom(1)[0]
        if 16 <= o <= 254 and o not in RESERVED_OCTETS:
            return o


def worker(w, rate, duration, mix, ndests, octet, go_r, out_w):
    """One epoll loop: clients connect at `rate` per second, servers accept on the same loop."""
    ep = select.epoll()
    ports = {"ok": BASE_PORT + 10 * w, "half": BASE_PORT + 10 * w + 1,
             "refused": BASE_PORT + 10 * w + 2}
    listeners = {}
    for kind in ("ok", "half"):
        l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        l.bind(("0.0.0.0", ports[kind]))
        l.listen(65535)
        l.setblocking(False)
        listeners[l.fileno()] = (kind, l)
        ep.register(l.fileno(), select.EPOLLIN)
    dests = {k: [(f"127.{octet}.{w}.{d + 1}", p) for d in range(ndests)] for k, p in ports.items()}
    seq = pattern(mix)
    nseq = len(seq)
    plan = [(k, dests[k]) for k in seq]

    counts = {k: 0 for k in KINDS}
    errors = {}
    accepted = {"ok": 0, "half": 0}
    half_client = set()       # fds of client ends waiting for the server's reply + EOF
    half_server = set()       # fds of server ends waiting for the client's FIN
    started = 0
    sock = socket.socket
    AF, ST = socket.AF_INET, socket.SOCK_STREAM
    EPOLLIN = select.EPOLLIN
    SHUT_WR = socket.SHUT_WR

    def drain(timeout):
        for fd, _ev in ep.poll(timeout):
            entry = listeners.get(fd)
            if entry is not None:
                kind, l = entry
                acc = l._accept
                while True:
                    try:
                        cfd, _ = acc()
                    except BlockingIOError:
                        break
                    accepted[kind] += 1
                    if kind == "ok":
                        os.close(cfd)
                    else:
                        half_server.add(cfd)
                        ep.register(cfd, EPOLLIN)
                continue
            if fd in half_server:
                if os.read(fd, 4096) == b"":           # the client's FIN: we are in CLOSE_WAIT
                    os.write(fd, REPLY)                 # still allowed: our direction is open
                    ep.unregister(fd)
                    half_server.discard(fd)
                    os.close(fd)                        # CLOSE_WAIT -> LAST_ACK
            elif fd in half_client:
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                if data == b"":                         # reply read, then EOF
                    ep.unregister(fd)
                    half_client.discard(fd)
                    os.close(fd)
                    counts["half"] += 1

    os.read(go_r, 1)              # all workers start together
    t0 = time.monotonic()
    end = t0 + duration
    per_s = rate
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if per_s:
            n = int((now - t0) * per_s) - started
            if n <= 0:
                drain(max(0.0, min((started + 1) / per_s - (now - t0), 0.005)))
                continue
            n = min(n, 64)
        else:
            n = 64
        for _ in range(n):
            kind, ds = plan[started % nseq]
            addr = ds[(started // nseq) % len(ds)]
            started += 1
            s = sock(AF, ST)
            if kind == "ok":
                try:
                    s.connect(addr)
                except OSError as e:
                    name = errno.errorcode.get(e.errno, str(e.errno))
                    errors[name] = errors.get(name, 0) + 1
                else:
                    counts["ok"] += 1
                s.close()
            elif kind == "refused":
                r = s.connect_ex(addr)
                if r == errno.ECONNREFUSED:
                    counts["refused"] += 1
                else:
                    name = errno.errorcode.get(r, str(r))
                    errors[name] = errors.get(name, 0) + 1
                s.close()
            else:
                try:
                    s.connect(addr)
                    s.shutdown(SHUT_WR)                 # ESTABLISHED -> FIN_WAIT1 -> FIN_WAIT2
                except OSError as e:
                    name = errno.errorcode.get(e.errno, str(e.errno))
                    errors[name] = errors.get(name, 0) + 1
                    s.close()
                    continue
                s.setblocking(False)
                fd = s.detach()
                half_client.add(fd)
                ep.register(fd, EPOLLIN)
        drain(0)
    elapsed = time.monotonic() - t0
    # Let every started connection finish on both ends, so the snmp counters and the tracers'
    # transitions describe complete connections.
    give_up = time.monotonic() + 10
    while (half_client or half_server or accepted["ok"] < counts["ok"]
           or accepted["half"] < counts["half"] + len(half_client)) and time.monotonic() < give_up:
        drain(0.01)
    unfinished = len(half_client) + len(half_server) + max(0, counts["ok"] - accepted["ok"])
    for _fd, (_k, l) in listeners.items():
        l.close()
    res = {"worker": w, "started": started, "counts": counts, "errors": errors,
           "accepted": accepted, "elapsed_s": elapsed, "unfinished": unfinished}
    os.write(out_w, (json.dumps(res) + "\n").encode())


def run(rate=0, duration=5.0, mix=None, workers=None, ndests=8, netns=True, octet=None):
    """Run a storm (in this process's children) and return the result dict. With netns=True this
    process itself moves into a fresh namespace: call it from a process of its own."""
    mix = mix or {"ok": 8, "refused": 1, "half": 1}
    workers = workers or os.cpu_count() or 1
    octet = octet or pick_octet()
    if netns:
        enter_fresh_netns()
    raise_nofile(65536)
    before = snmp_tcp()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pids = []
    for w in range(workers):
        def child(w=w):
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.close(go_w)
            os.close(out_r)
            worker(w, rate / workers if rate else 0, duration, mix, ndests, octet, go_r, out_w)
        pids.append(fork_child(child))
    os.close(go_r)
    os.close(out_w)
    time.sleep(0.2)                   # listeners up (they only need to be before the first connect)
    cpu0 = os.times()
    t0 = time.monotonic()
    os.write(go_w, b"g" * workers)
    data = b""
    while True:
        chunk = os.read(out_r, 65536)
        if not chunk:
            break
        data += chunk
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    wall = time.monotonic() - t0
    cpu1 = os.times()
    after = snmp_tcp()
    results = [json.loads(l) for l in data.decode().splitlines() if l.strip()]
    counts = {k: sum(r["counts"][k] for r in results) for k in KINDS}
    errors = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    elapsed = max((r["elapsed_s"] for r in results), default=duration)
    total = sum(counts.values())
    delta = {k: after[k] - before[k] for k in ("ActiveOpens", "PassiveOpens", "AttemptFails",
                                                "EstabResets", "OutRsts", "RetransSegs",
                                                "ListenDrops", "ListenOverflows")}
    return {
        "offered_rate": rate or None,
        "duration_s": duration,
        "elapsed_s": round(elapsed, 4),
        "wall_s": round(wall, 4),
        "workers": workers,
        "worker_failures": failed,
        "netns": netns,
        "mix": mix,
        "counts": counts,
        "errors": errors,
        "unfinished": sum(r["unfinished"] for r in results),
        "connections": total,
        "achieved_rate": round(total / elapsed, 1) if elapsed else None,
        "snmp": delta,
        "expected_transitions": 10 * delta["PassiveOpens"] + 2 * delta["AttemptFails"],
        "marker": f"127.{octet}.",
        "cpu_s": round((cpu1.children_user + cpu1.children_system)
                       - (cpu0.children_user + cpu0.children_system), 3),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=0,
                    help="target connections/s over all workers; 0 = flat out (default)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    ap.add_argument("--mix", type=parse_mix, default="ok=8,refused=1,half=1",
                    help="weights of the kinds (default ok=8,refused=1,half=1)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(),
                    help="worker processes (default: one per CPU)")
    ap.add_argument("--dests", type=int, default=8,
                    help="server addresses per worker, to spread the ephemeral port space")
    ap.add_argument("--octet", type=int, help="second octet of the server addresses "
                    "(default: random per run)")
    ap.add_argument("--no-netns", action="store_true",
                    help="run in the current namespace (snmp deltas then include other traffic)")
    a = ap.parse_args(argv)
    if isinstance(a.mix, str):
        a.mix = parse_mix(a.mix)
    res = run(a.rate, a.duration, a.mix, a.workers, a.dests, netns=not a.no_netns, octet=a.octet)
    print(json.dumps(res))
    return 0 if not res["worker_failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
