"""The network lab for kernel tests: namespaces, veth, nftables, and socket agents.

Two network namespaces joined by a veth pair are two hosts with their own addresses; nftables
rules inside a namespace decide what crosses (there is no netem here, /work/shared/ENVIRONMENT.md).
Everything the lab creates lives inside namespaces it created and is removed when it is closed:
addresses are only ever assigned inside those namespaces.

The sockets under test belong to *agents*: small Python processes (this file, run as a script)
that execute one socket operation per JSON line on stdin and answer one JSON line on stdout. An
agent is its own process, so the tracer has to name the right pid and fd, and every answer is a
readiness signal ("listening" is the answer to `listen`), so tests never sleep to let a peer get
ready. Run inside a namespace with `ip netns exec`, which execs (no fork): the agent's pid is the
pid Popen reports.
"""
import errno
import itertools
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

CLIENT4, SERVER4 = "10.77.0.1", "10.77.0.2"
CLIENT6, SERVER6 = "fd77::1", "fd77::2"

_seq = itertools.count()
_swept = False


def run(cmd, ns=None, check=True, input=None):
    """Run a command (inside namespace `ns` if given); returns stdout."""
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns] + list(cmd)
    p = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def snmp_tcp(ns=None):
    """The Tcp: counters of /proc/net/snmp of namespace `ns` (the caller's if None)."""
    lines = [l.split() for l in run(["cat", "/proc/net/snmp"], ns).splitlines()
             if l.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def tcp_ext(ns=None):
    """The TcpExt: counters of /proc/net/netstat of namespace `ns` (the caller's if None)."""
    lines = [l.split() for l in run(["cat", "/proc/net/netstat"], ns).splitlines()
             if l.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def ss_count(ns, state, *flt):
    """How many sockets `ss -tanH state STATE [FILTER]` lists in namespace ns."""
    return len(run(["ss", "-tanH", "state", state, *flt], ns).splitlines())


def settle(ns, *flt, timeout=90.0):
    """Wait until namespace ns has no socket (matching the ss filter) in FIN_WAIT1, FIN_WAIT2 or
    CLOSING. A close's FIN, and the peer's, cross the veth after close() returns, and until they
    have, a socket still moves on into TIME_WAIT: a count read before then can change under a
    test (in a TCG guest, 2 of 40 sockets stayed in FIN_WAIT2 past 10 s; an orphan there expires
    within tcp_fin_timeout, 60 s)."""
    deadline = time.monotonic() + timeout
    while any(ss_count(ns, st, *flt) for st in ("fin-wait-1", "fin-wait-2", "closing")):
        assert time.monotonic() < deadline, f"sockets of {ns} still closing after {timeout} s"
        time.sleep(0.05)      # polling the kernel's own table: the signal itself


def netns_inode(pid):
    """The network namespace of a process, as tcptrace names it (the inode of its ns/net)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def ss_users(state, port, ns=None):
    """[(pid, fd)] of the sockets in `state` with local port `port`, as `ss -tanp` sees them."""
    import re
    out = run(["ss", "-tanpH", "state", state, f"( sport = :{port} )"], ns)
    return [(int(p), int(f)) for p, f in re.findall(r"pid=(\d+),fd=(\d+)", out)]


# -- reading the tracer's records -----------------------------------------------------------------

def fresh(tracer):
    """Predicate: records that arrive after this call. The session tracer runs from test to
    test, and ports and lab addresses are reused, so each test looks only at its own."""
    start = tracer.next_seq
    return lambda r: r.seq >= start


def where(fresh_pred, type_, **fields):
    """Predicate: a fresh record of this type whose fields have exactly these values."""
    return lambda r: (r["type"] == type_ and fresh_pred(r)
                      and all(r.get(k) == v for k, v in fields.items()))


def expect(tracer, pred, timeout=10.0, count=1):
    """tracer.wait_for (which skips the test when the kernel withheld hits meanwhile), and on a
    timeout say whether the tracer lost events: on a busy host (another storm on the same
    kernel) a missing record is then no verdict on the logic."""
    try:
        return tracer.wait_for(pred, timeout=timeout, count=count)
    except AssertionError as e:
        lost = tracer.matching(lambda r: r["type"] == "lost")
        if lost:
            kinds = sorted({r["where"] for r in lost})
            raise AssertionError(f"{e}; the tracer has reported {sum(r['count'] for r in lost)} "
                                 f"events lost ({', '.join(kinds)}), the last at "
                                 f"{lost[-1]['time']}") from None
        raise


def wall_ns(rfc3339):
    """A record's `time` as integer nanoseconds since the epoch (microsecond resolution)."""
    import datetime
    dt = datetime.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ")
    dt = dt.replace(tzinfo=datetime.timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


class Agent:
    """A socket-holding process. `call(op, **args)` returns the answer dict; an answer with
    "errno" set is a failed operation (not an exception: failures are what tests look at)."""

    def __init__(self, ns=None, timeout=10.0):
        cmd = [sys.executable, "-u", os.path.abspath(__file__)]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns] + cmd
        self.ns = ns
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.pid = self.proc.pid
        hello = self._read(timeout)
        if hello.get("pid") != self.pid:
            raise RuntimeError(f"agent reports pid {hello.get('pid')}, started as {self.pid}")

    def _read(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"agent {self.pid} did not answer within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent {self.pid} exited ({self.proc.wait()})")
        return json.loads(line)

    def send(self, op, **args):
        """Start an operation without waiting for its answer (see `answer`)."""
        self.proc.stdin.write(json.dumps(dict(args, op=op)) + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout=10.0):
        got = self._read(timeout)
        if "fatal" in got:
            raise RuntimeError(f"agent {self.pid}: {got['fatal']}")
        return got

    def call(self, op, timeout=10.0, **args):
        self.send(op, **args)
        return self.answer(timeout)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _sweep_stale():
    """Remove namespaces an earlier, killed test run left behind (SIGKILL or SIGTERM skip the
    fixtures' cleanup). Only names this module makes, whose creating process is gone."""
    global _swept
    if _swept:
        return
    _swept = True
    import re
    for line in run(["ip", "netns", "list"]).splitlines():
        m = re.match(r"(ttlab-(\d+)x\d+-[cs])\b", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            run(["ip", "netns", "del", m.group(1)], check=False)


class Lab:
    """Namespaces `client` and `server`, joined by a veth pair:
    client 10.77.0.1/24 fd77::1/64 <-> server 10.77.0.2/24 fd77::2/64.
    Each namespace has an nftables table `inet lab` with empty input/output chains to add rules
    to. close() removes the namespaces (and with them the veth pair and every rule)."""

    def __init__(self, veth=True):
        _sweep_stale()
        tag = f"{os.getpid()}x{next(_seq)}"
        self.client = f"ttlab-{tag}-c"
        self.server = f"ttlab-{tag}-s"
        self.namespaces = []
        self.agents = []
        try:
            for ns in (self.client, self.server):
                run(["ip", "netns", "add", ns])
                self.namespaces.append(ns)
                run(["ip", "link", "set", "lo", "up"], ns)
                run(["nft", "-f", "-"], ns, input=(
                    "table inet lab {\n"
                    " chain input { type filter hook input priority 0; policy accept; }\n"
                    " chain output { type filter hook output priority 0; policy accept; }\n"
                    "}\n"))
            if veth:
                # Created straight inside the namespaces: the names clash with nothing outside.
                a, b = "lab-c", "lab-s"
                run(["ip", "link", "add", a, "netns", self.client, "type", "veth",
                     "peer", "name", b, "netns", self.server])
                for ns, dev, v4, v6 in ((self.client, a, CLIENT4, CLIENT6),
                                        (self.server, b, SERVER4, SERVER6)):
                    run(["ip", "addr", "add", f"{v4}/24", "dev", dev], ns)
                    # nodad: usable at once, no tentative period before the tests may connect
                    run(["ip", "addr", "add", f"{v6}/64", "dev", dev, "nodad"], ns)
                    run(["ip", "link", "set", dev, "up"], ns)
                self._wait_carrier(((self.client, a), (self.server, b)))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _wait_carrier(devs, timeout=5.0):
        """Both ends report carrier only after linkwatch runs (up to ~1 s later); a packet sent
        before that can be lost and cost a neighbour-discovery retry of a second, which would
        masquerade as a SYN retransmission. There is no event to block on short of `ip monitor`,
        so poll the operstate the kernel reports."""
        deadline = time.monotonic() + timeout
        for ns, dev in devs:
            while json.loads(run(["ip", "-j", "link", "show", "dev", dev], ns))[0]["operstate"] \
                    != "UP":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dev} in {ns} has no carrier after {timeout}s")
                time.sleep(0.01)

    def nft(self, ns, rule, chain="input"):
        """Append one rule to a chain of the namespace's `inet lab` table."""
        run(["nft", "add", "rule", "inet", "lab", chain] + rule.split(), ns)

    def nft_counter(self, ns, comment):
        """Packets matched by the rule carrying `comment "..."` (add `counter comment "x"`)."""
        out = json.loads(run(["nft", "-j", "list", "chain", "inet", "lab", "input"], ns))
        for item in out["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment") == comment:
                for e in rule["expr"]:
                    if "counter" in e:
                        return e["counter"]["packets"]
        raise KeyError(comment)

    def sysctl(self, ns, key, value):
        run(["sysctl", "-q", "-w", f"{key}={value}"], ns)

    def agent(self, ns):
        a = Agent(ns)
        self.agents.append(a)
        return a

    def close(self):
        for a in self.agents:
            a.close()
        self.agents = []
        for ns in self.namespaces:
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the agent itself (runs as a script) ----------------------------------------------------------

def _family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _errname(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e, OSError) else str(e)


class _Agent:
    def __init__(self):
        self.socks = {}          # fd -> socket, kept so nothing closes behind the test's back

    def _sock(self, addr):
        s = socket.socket(_family(addr), socket.SOCK_STREAM)
        self.socks[s.fileno()] = s
        return s

    def op_listen(self, addr, port=0, backlog=128, defer_accept=0):
        """defer_accept: TCP_DEFER_ACCEPT seconds: the final bare ACK is ignored, the
        handshake completes with the client's first data."""
        s = self._sock(addr)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if defer_accept:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
        s.bind((addr, port))
        s.listen(backlog)
        return {"fd": s.fileno(), "port": s.getsockname()[1], "listening": True}

    def op_bind(self, addr, port=0):
        """A bound socket that never listens: its port stays reserved and refuses connects."""
        s = self._sock(addr)
        s.bind((addr, port))
        return {"fd": s.fileno(), "port": s.getsockname()[1]}

    def op_connect(self, addr, port, nonblock=False, src=None):
        s = self._sock(addr)
        fd = s.fileno()
        if src:
            s.bind((src, 0))
        if nonblock:
            s.setblocking(False)
        t0 = time.monotonic()
        try:
            s.connect((addr, port))
        except OSError as e:
            dt = time.monotonic() - t0
            if e.errno == errno.EINPROGRESS:
                return {"fd": fd, "lport": s.getsockname()[1], "errno": "EINPROGRESS"}
            s.close()
            del self.socks[fd]
            return {"fd": fd, "errno": _errname(e), "elapsed_s": dt}
        return {"fd": fd, "lport": s.getsockname()[1], "elapsed_s": time.monotonic() - t0}

    def op_writable(self, fd, timeout=10.0, so_error=True):
        """Wait until a non-blocking connect has an outcome; with so_error, read (and so clear)
        the pending error the way most event loops do, and return its name."""
        select.select([], [self.socks[fd]], [], timeout)
        if not so_error:
            return {}
        err = self.socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return {"so_error": errno.errorcode.get(err) if err else None}

    def op_connect_again(self, fd, addr, port):
        """connect() once more on the same socket, the way some event loops learn a non-blocking
        connect's outcome (Ruby's connect_nonblock). Through libc: Python's own connect hides
        EISCONN, the answer that means success."""
        import ctypes
        if _family(addr) == socket.AF_INET:
            sa = struct.pack("=H", socket.AF_INET) + struct.pack(">H", port) \
                + socket.inet_pton(socket.AF_INET, addr) + bytes(8)
        else:
            sa = struct.pack("=H", socket.AF_INET6) + struct.pack(">HI", port, 0) \
                + socket.inet_pton(socket.AF_INET6, addr) + bytes(4)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.connect(fd, sa, len(sa)) == 0:
            return {}
        return {"errno": errno.errorcode.get(ctypes.get_errno())}

    def op_accept(self, fd):
        c, peer = self.socks[fd].accept()
        self.socks[c.fileno()] = c
        return {"fd": c.fileno(), "peer": list(peer[:2])}

    def op_shutdown(self, fd, how="wr"):
        self.socks[fd].shutdown({"rd": socket.SHUT_RD, "wr": socket.SHUT_WR,
                                 "rdwr": socket.SHUT_RDWR}[how])
        return {}

    def op_recv(self, fd):
        """Block until data or EOF; returns what came (b"" = the peer's FIN)."""
        try:
            return {"data": self.socks[fd].recv(65536).decode()}
        except OSError as e:
            return {"errno": _errname(e)}

    def op_linger0(self, fd):
        self.socks[fd].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return {}

    def op_send(self, fd, data="x"):
        self.socks[fd].send(data.encode())
        return {}

    def op_close(self, fd):
        self.socks.pop(fd).close()
        return {}

    def op_serve(self, fd, n, close_first=False):
        """Accept n connections on listener fd, one at a time: close each at once
        (close_first), or after the peer's FIN. The peer's side is op_churn."""
        lsn = self.socks[fd]
        for _ in range(n):
            c, _ = lsn.accept()
            if not close_first:
                while c.recv(65536):
                    pass
            c.close()
        return {"served": n}

    def op_churn(self, addr, port, n, close_first=True):
        """n connections to addr:port, one after another: each closed at once (close_first:
        this side ends in TIME_WAIT) or after the peer's FIN (the peer does)."""
        done = 0
        for _ in range(n):
            c = socket.create_connection((addr, port))
            if not close_first:
                while c.recv(65536):
                    pass
            c.close()
            done += 1
        return {"done": done}

    def op_netstat(self):
        """TcpExt: counters of this namespace's /proc/net/netstat."""
        with open("/proc/net/netstat") as f:
            lines = [l.split() for l in f if l.startswith("TcpExt:")]
        return {"netstat": dict(zip(lines[0][1:], map(int, lines[1][1:])))}

    def op_snmp(self):
        with open("/proc/net/snmp") as f:
            lines = [l.split() for l in f if l.startswith("Tcp:")]
        return {"snmp": dict(zip(lines[0][1:], map(int, lines[1][1:])))}

    def op_burst(self, addr, port, closed_port, n_ok, n_refused):
        """n_ok connect/accept/close round trips to `port` and n_refused connects to
        `closed_port`, with the namespace's Tcp: counters read just before and just after."""
        before = self.op_snmp()["snmp"]
        lsn = socket.socket(_family(addr), socket.SOCK_STREAM)
        lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsn.bind((addr, port))
        lsn.listen(1024)
        refused = 0
        for _ in range(n_ok):
            c = socket.create_connection((addr, port))
            s, _ = lsn.accept()
            c.close()
            s.close()
        for _ in range(n_refused):
            c = socket.socket(_family(addr), socket.SOCK_STREAM)
            try:
                c.connect((addr, closed_port))
            except ConnectionRefusedError:
                refused += 1
            finally:
                c.close()
        lsn.close()
        return {"before": before, "after": self.op_snmp()["snmp"], "refused": refused}

    def main(self):
        print(json.dumps({"pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            req = json.loads(line)
            op = req.pop("op")
            if op == "exit":
                return
            try:
                out = getattr(self, "op_" + op)(**req)
            except OSError as e:
                out = {"errno": _errname(e), "error": str(e)}
            except Exception as e:      # a broken request is the test's bug: say so loudly
                out = {"fatal": f"{op}: {type(e).__name__}: {e}"}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _Agent().main()
