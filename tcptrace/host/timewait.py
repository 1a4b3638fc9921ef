"""The TIME_WAIT sampler: per network namespace, what the kernel holds in TIME_WAIT and how
much of the local port range it and the connected sockets use, one sock_diag dump per sample.

Per namespace and sample (a wire.Sample, what="time_wait"; detect/timewait.py reads it):
  tw             sockstat's count of timewait socks now
  counters       TcpExt TW (entries), TWRecycled (taken over by a new connect: tcp_tw_reuse),
                 TWKilled (timewait socks given a short life), TCPTimeWaitOverflow (none made:
                 tcp_max_tw_buckets reached): absolute, the detector takes deltas
  port_range     ip_local_port_range; tw_reuse, max_tw_buckets: the namespace's settings
  dests          [laddr, raddr, rport, in TIME_WAIT, connected]: sockets whose local port is in
                 the range, per destination and local address (what a connect() to that
                 destination competes with), largest first, at most MAX_ROWS
  locals         [laddr, in TIME_WAIT, connected]: the same per local address (what bind() to
                 port 0 competes with)
  services       [laddr, lport, in TIME_WAIT]: TIME_WAIT of sockets whose local port is a
                 listener's or outside the range (a server that closed first), per local port
  entered, left  [laddr, lport, raddr, rport(, expires_ms)]: 4-tuples in TIME_WAIT now and not at
                 the previous dump, and the reverse: how the detector tells a sock's exit
A namespace that is gone gets one last sample, {"gone": true, "left": [...]}. With --port or
-4/-6 the dump keeps to those ports and families (filtered in the kernel, as the events are);
tw and counters are the namespace's whole.

"In TIME_WAIT" is sock_diag's state TIME_WAIT, as `ss state time-wait` counts it; a timewait
sock still waiting for the peer's FIN (the kernel's FIN_WAIT2 substate) is reported as
FIN_WAIT2 and counted as connected. One dump per namespace and sample, of every state that
holds a 4-tuple and of the listeners, filtered by state in the kernel. A sample costs about
0.7-1.4 us per socket, by host (30,000 TIME_WAIT sockets in 0.021-0.041 s: docs/man/overhead.md),
so the period stretches to keep sampling under 5% of a CPU.
"""
import os
import socket
import struct
import time

from tcptrace.host import counters, netns
from tcptrace.host.diag import ADDR, RAW_EXPIRES, RAW_EXPIRES_AT, RAW_HEAD, STATES, Diag
from tcptrace.host.samplers import Namespaces, Sampler
from tcptrace.wire import Sample

CONNECTED = ("SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK",
             "CLOSING", "TIME_WAIT")
TW = STATES["TIME_WAIT"]
SETTINGS = ("ip_local_port_range", "tcp_tw_reuse", "tcp_max_tw_buckets")
MAX_ROWS = 256
BUDGET = 0.05          # at most this share of a CPU spent sampling: the period stretches


class _Namespace:
    """What is kept open in one namespace: a sock_diag socket and its settings' files (both
    belong to the namespace they were opened in, so they are opened there once and read from
    here after), and the 4-tuples its last dump had in TIME_WAIT ({family: {tuple: ms}}, see
    aggregate)."""

    def __init__(self, base):
        self.base = base
        self.diag, self.fds = netns.run_in(base, self._open)
        self.tw = {}
        self.in_use = {}            # (laddr, raddr, rport) -> sockets, at the last dump
        self.in_use_ns = None

    @staticmethod
    def _open():
        fds = {n: os.open(f"/proc/sys/net/ipv4/{n}", os.O_RDONLY) for n in SETTINGS}
        return Diag(), fds

    def settings(self):
        out = {}
        for n, fd in self.fds.items():
            v = [int(x) for x in os.pread(fd, 64, 0).split()]
            out[n] = v if len(v) > 1 else v[0]
        return out

    def close(self):
        self.diag.close()
        for fd in self.fds.values():
            os.close(fd)


def _largest(rows):
    return sorted(rows, key=lambda kv: -sum(kv[1]))[:MAX_ROWS]


_HEAD, _EXPIRES = RAW_HEAD.unpack_from, RAW_EXPIRES.unpack_from
# A timewait sock's 4-tuple as one bytes object: the ports and addresses of inet_diag_sockid.
# Bytes keys and int values keep a dump's dict of 100,000 socks out of the cyclic garbage
# collector, which walked tuple keys again and again as they were made: 3x the dump's cost.
_TUPLE = struct.Struct("4x36s").unpack_from


def _text(fam, key, at):
    """The address at key[at:at+16] (a raw key: remote port, local, remote address) as text."""
    return ADDR[(fam, key[at:at + 16])]


def tuples_text(fam, tuples):
    """[laddr, lport, raddr, rport] of each of a family's raw 4-tuples (aggregate's keys)."""
    return [[_text(fam, t, 4), t[0] << 8 | t[1], _text(fam, t, 20), t[2] << 8 | t[3]]
            for t in tuples]


def tuple_diff(now, prev):
    """([laddr, lport, raddr, rport, ms left] of each 4-tuple in `now` and not in `prev`,
    [laddr, lport, raddr, rport] of each in `prev` and not in `now`): two dumps' TIME_WAIT
    ({family: {tuple: ms}})."""
    entered, left = [], []
    for fam in sorted(now.keys() | prev.keys()):        # in dump order: output is repeatable
        n, p = now.get(fam, {}), prev.get(fam, {})
        new = [t for t in n if t not in p]
        rows = tuples_text(fam, new)
        for row, t in zip(rows, new):
            row.append(n[t])
        entered += rows
        left += tuples_text(fam, [t for t in p if t not in n])
    return entered, left


def aggregate(listening, chunks, lo, hi, follow=True):
    """(dests, locals, services, {family: {raw 4-tuple in TIME_WAIT: ms left}}, or None
    unless `follow`) of a dump (Diag.raw chunks) of the connected states: see the module's
    docstring. A socket whose local port is a listener's (`listening`) was accepted: it took
    no port of the range (a listener bound to port 0 gets one from it), and its TIME_WAIT is
    a service's. Runs per socket of every dump (tens of thousands, 5,000 more a second under
    a 5k conn/s storm): one unpack and plain dict operations on raw bytes per socket; text
    only for what is returned."""
    dests, services, tw = {}, {}, {} if follow else None
    for fam, buf, offsets in chunks:
        fd, fs = dests.setdefault(fam, {}), services.setdefault(fam, {})
        ft = tw.setdefault(fam, {}) if follow else None
        for o in offsets:
            st, lport, key = _HEAD(buf, o)
            in_tw = st == TW
            if in_tw and follow:
                ft[_TUPLE(buf, o)[0]] = _EXPIRES(buf, o + RAW_EXPIRES_AT)[0]
            if lo <= lport <= hi and lport not in listening:
                row = fd.get(key)
                if row is None:
                    row = fd[key] = [0, 0]
                row[0 if in_tw else 1] += 1
            elif in_tw:
                k = (lport, key[2:18])
                fs[k] = fs.get(k, 0) + 1
    # a local address's sockets are its destinations': summed per destination, not per socket
    locs = {}
    for fam, fd in dests.items():
        fl = locs.setdefault(fam, {})
        for key, (n_tw, n_other) in fd.items():
            row = fl.get(key[2:18])
            if row is None:
                row = fl[key[2:18]] = [0, 0]
            row[0] += n_tw
            row[1] += n_other
    rows = (
        [([_text(f, k, 2), _text(f, k, 18), k[0] << 8 | k[1]], v)
         for f, d in dests.items() for k, v in d.items()],
        [([ADDR[(f, k)]], v) for f, d in locs.items() for k, v in d.items()],
        [([ADDR[(f, k[1])], k[0]], [n]) for f, d in services.items() for k, n in d.items()])
    return tuple([k + v for k, v in _largest(r)] for r in rows) + (tw,)


def near(before, now, dt_s, ports, threshold, ahead_s):
    """Is a destination near port_pressure's threshold: using half of it now, or, growing as
    it did since the last dump (`before`, dt_s ago), at it ahead_s from now? ({(laddr, raddr,
    rport): sockets in use} of two dumps; ports in the range; dt_s 0: no dump before.) A
    destination the last dump did not show grows from none."""
    for k, n in now.items():
        if n >= threshold / 2 * ports:
            return True
        grown = n - before.get(k, 0)
        if grown > 0 and dt_s > 0 and n + grown / dt_s * ahead_s >= threshold * ports:
            return True
    return False


class TimeWaitSampler(Sampler):
    name = "time_wait"

    def __init__(self, namespaces=None, ports=(), families=(), follow=True,
                 period_ns=Sampler.period_ns, calm_period_ns=None, threshold=None):
        self.namespaces = namespaces or Namespaces()
        self.ports = tuple(ports)           # only sockets with one of these ports (--port)
        self.families = tuple(families) or (socket.AF_INET, socket.AF_INET6)
        # Say which 4-tuples entered and left TIME_WAIT: only for a detector that follows each
        # timewait sock to its exit (detect/timewait.py); else no sample carries them
        self.follow = follow
        self.min_period_ns = self.period_ns = period_ns
        # With a port_pressure threshold: every calm_period_ns, but every period_ns while a
        # destination is near it (see near())
        self.calm_period_ns = calm_period_ns or period_ns
        self.threshold = threshold
        self.near = False       # the last sample found a destination near the threshold
        self.open = {}          # netns inode -> _Namespace
        self.dumps = 0          # namespace readings (each two dumps: listeners, then the rest)
        self.samples = 0
        self.spent_ns = 0       # CPU time spent sampling
        self.failed = {}        # why a namespace could not be read -> times

    def sample(self, now_ns):
        t0 = time.thread_time_ns()
        out = []
        self.near = False
        known = self.namespaces.get(now_ns)
        for ino in [i for i in self.open if i not in known]:
            ns = self.open.pop(ino)
            out.append(Sample(now_ns, self.name, ino,
                              {"gone": True, "left": tuple_diff({}, ns.tw)[1]}))
            ns.close()
        for ino, base in known.items():
            try:
                got = self._one(ino, base, now_ns)
            except OSError as e:
                # Mostly a namespace that went away between the walk and the read (its last
                # task exited: the next walk drops it); anything else is said at exit
                self.failed[e.strerror or str(e)] = self.failed.get(e.strerror or str(e), 0) + 1
                continue
            out.append(got)
        spent = time.thread_time_ns() - t0
        self.spent_ns += spent
        self.samples += 1
        self.period_ns = self.next_period_ns(spent)
        return out

    def next_period_ns(self, spent_ns):
        """The period after a sample that took spent_ns of CPU: see __init__, stretched to
        keep sampling under BUDGET of a CPU."""
        base = self.min_period_ns if self.near else self.calm_period_ns
        return max(base, int(spent_ns / BUDGET))

    def _one(self, ino, base, now_ns):
        ns = self.open.get(ino)
        if ns is None:
            ns = self.open[ino] = _Namespace(base)
        st = ns.settings()
        lo, hi = st["ip_local_port_range"]
        # The listeners first: whether a socket took a port of the range depends on them, and
        # a dump of both families would bring an IPv6 wildcard listener after the IPv4 sockets
        listening = {s.lport for s in ns.diag.dump(["LISTEN"], self.families, self.ports)}
        dests, locs, services, tw = aggregate(
            listening, ns.diag.raw(CONNECTED, self.families, self.ports), lo, hi, self.follow)
        self.dumps += 1
        if self.threshold is not None:
            in_use = {(r[0], r[1], r[2]): r[3] + r[4] for r in dests}
            since = (now_ns - ns.in_use_ns) / 1e9 if ns.in_use_ns is not None else 0
            if near(ns.in_use, in_use, since, hi - lo + 1, self.threshold,
                    self.calm_period_ns / 1e9):
                self.near = True
            ns.in_use, ns.in_use_ns = in_use, now_ns
        c = counters.tcp_counters(base)
        data = {
            "tw": counters.sockstat(base).get("tw", 0),
            "counters": {k: c.get(k, 0) for k in ("TW", "TWRecycled", "TWKilled",
                                                  "TCPTimeWaitOverflow")},
            "port_range": [lo, hi], "tw_reuse": st["tcp_tw_reuse"],
            "max_tw_buckets": st["tcp_max_tw_buckets"],
            "dests": dests, "locals": locs, "services": services}
        if self.follow:
            data["entered"], data["left"] = tuple_diff(tw, ns.tw)
            ns.tw = tw
        return Sample(now_ns, self.name, ino, data)

    def close(self):
        for ns in self.open.values():
            ns.close()
        self.open = {}

    def describe(self):
        failed = "".join(f"; {n} namespace readings failed: {why}"
                         for why, n in sorted(self.failed.items()))
        # its CPU is said by samplers.Background, as every sampler's is
        return f"TIME_WAIT sampler: {self.dumps} namespace readings{failed}"
