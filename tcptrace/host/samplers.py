"""Samplers: readings of the kernel's own tables and counters, taken on the tick and handed to
the pipeline as wire.Sample records (so they are recorded, and replayed as they were).

A sampler has a `name`, a `period_ns`, and `sample(now_ns)` returning Samples; it reads only
what its detector needs, per network namespace (tcptrace/host/netns.py), with the filtering
done in the kernel where the kernel can (sock_diag state masks and port bytecode).
"""
import socket
import threading
import time

from tcptrace.host import counters, netns, owners
from tcptrace.host.diag import Diag
from tcptrace.states import owning_listener
from tcptrace.wire import Sample


class Namespaces:
    """The host's network namespaces, looked up at most every `refresh_ns` (a walk of
    /proc/*/ns/net costs a stat per process)."""

    def __init__(self, refresh_ns=5_000_000_000, root="/proc"):
        self.refresh_ns = refresh_ns
        self.root = root
        self._at = None
        self._members = {}

    def get(self, now_ns=None):
        """{netns inode: /proc/<pid> of a task in it}."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        if self._at is None or now - self._at >= self.refresh_ns:
            self._members = netns.members(self.root)
            self._at = now
        return {ino: tasks[0] for ino, tasks in self._members.items()}

    def pids(self, ino):
        """The pids of the tasks in namespace `ino` at the last look."""
        return [int(t.rsplit("/", 1)[1]) for t in self._members.get(ino, ())
                if t.rsplit("/", 1)[1].isdigit()]


class Sampler:
    """Base of every sampler. A detector names the samplers it needs in its SAMPLERS; the live
    source runs each one the detectors ask for, every period_ns. Made with the kernel-side
    filters' scope (`ports`, `families`: empty = all), which what it dumps keeps to."""
    name = None
    period_ns = 1_000_000_000
    next_ns = 0

    def sample(self, now_ns):
        """[wire.Sample] of what the kernel says now."""
        raise NotImplementedError

    def close(self):
        """Let go of what it keeps open (sockets, files in other namespaces)."""

    def known_owners(self, found):
        """Socket owners the live source looked up anyway ({inode: (pid, comm, fd) or None}),
        for a sampler that names owners to keep."""

    def describe(self):
        """What it cost, for the run's closing diagnostics (None: nothing to say)."""
        return None


class Background:
    """Runs each sampler on a thread of its own, so that a dump of tens of thousands of sockets
    (0.1 s on the development machine, far more in an emulated guest) never holds up the poll
    loop: the kernel's buffers are still drained, and findings written, on time. With them in
    the poll loop, a stuck finding in the 6.1 guest of CI came too late for its test to see the
    socket still stuck. One thread per sampler, not one for all: a reading of the TIME_WAIT
    table after a storm can take seconds there, and the listeners' queues must still be read
    every second meanwhile (a SYN flood is told by them). A reading is stamped when its dump is
    done (under the lock that hands it over), and handed over by the first poll that read the
    clock after that: in time order with the events, never behind what the pipeline has
    already released."""

    def __init__(self, samplers):
        self.samplers = list(samplers)
        self.errors = {}              # sampler name -> what stopped its thread
        self.spent = {}               # sampler name -> [CPU seconds, readings]
        self._ready = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []

    def start(self):
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True,
                                              name=f"tcptrace-sampler-{s.name}")
                             for s in self.samplers]
            for t in self._threads:
                t.start()

    def _run(self, s):
        spent = self.spent.setdefault(s.name, [0.0, 0])
        try:
            while not self._stop.is_set():
                now = time.monotonic_ns()
                if now >= s.next_ns:
                    # This thread's CPU: the sampling's own share of the tracer's cost, said at
                    # exit (bench/run.py reads it). A sampler's helper threads (entering a
                    # namespace once, to open a socket there) are not counted.
                    cpu = time.thread_time()
                    got = s.sample(now)
                    spent[0] += time.thread_time() - cpu
                    spent[1] += 1
                    s.next_ns = now + s.period_ns
                    with self._lock:
                        done = time.monotonic_ns()
                        self._ready.extend(r._replace(ts_ns=done) for r in got)
                self._stop.wait(max(s.next_ns - time.monotonic_ns(), 1_000_000) / 1e9)
        except Exception as e:        # said at exit; tracing and the other samplers go on
            self.errors[s.name] = f"{type(e).__name__}: {e}"

    def take(self, now_ns):
        """The readings finished by now_ns (the clock read before this poll's drain): a later
        one waits for the next poll, so none is older than what the pipeline released."""
        with self._lock:
            ready = self._ready
            if not ready or ready[-1].ts_ns <= now_ns:
                self._ready = []
                return ready
            self._ready = [r for r in ready if r.ts_ns > now_ns]
            return [r for r in ready if r.ts_ns <= now_ns]

    def finish(self):
        """Stop the thread once its reading in progress is done; the readings not taken yet
        (the run's last ones: a short run's only one)."""
        self._stop.set()
        for t in self._threads:
            t.join(10)
        with self._lock:
            ready, self._ready = self._ready, []
        return ready

    def close(self):
        """Stop the thread, let go of what the samplers hold; what is worth saying about them."""
        self.finish()
        notes = []
        for s in self.samplers:
            s.close()
            if s.describe():
                notes.append(s.describe())
        for name, (cpu, n) in sorted(self.spent.items()):
            notes.append(f"sampler {name}: {n} readings, {cpu * 1000:.0f} ms CPU")
        for name, why in sorted(self.errors.items()):
            notes.append(f"sampler {name} stopped: {why}")
        return notes


# What bounds and counts a listener's queues, per network namespace (/proc/net/netstat TcpExt):
# SYNs and final ACKs a listener dropped (all causes), of them those dropped with the accept queue
# full, SYNs dropped with the request queue full and no cookies, and the SYN cookies.
LISTEN_COUNTERS = ("ListenDrops", "ListenOverflows", "TCPReqQFullDrop", "TCPReqQFullDoCookies",
                   "SyncookiesSent", "SyncookiesRecv", "SyncookiesFailed")
LISTEN_SETTINGS = ("net/core/somaxconn", "net/ipv4/tcp_max_syn_backlog",
                   "net/ipv4/tcp_syncookies", "net/ipv4/tcp_synack_retries")


def requests_moved(last, now):
    """Did counters that tell of request queues move between two readings: SYNs dropped or
    answered with cookies because a request queue was full, cookies, or drops neither queue
    full explains (the last quarter of tcp_max_syn_backlog)? Not drops with the accept queue
    full, which its own length (the LISTEN dump) shows."""
    d = {k: now.get(k, 0) - last.get(k, 0) for k in LISTEN_COUNTERS}
    return any(d[k] for k in ("TCPReqQFullDrop", "TCPReqQFullDoCookies", "SyncookiesSent",
                              "SyncookiesRecv", "SyncookiesFailed")) or \
        d["ListenDrops"] - d["ListenOverflows"] - d["TCPReqQFullDrop"] > 0


def _dumps(diag, families, ports, requests):
    """(LISTEN sockets, their request socks or None) of the namespace `diag` was opened in.
    Listeners are in a small table of their own. Request socks are in the host's one table of
    connections, which the kernel walks whole for a dump, every namespace's sockets and every
    empty bucket (4.6 ms empty, 28.5 ms with 30,000 sockets on the development guest; the
    port filter only spares their transfer and parsing), once per family asked: so only when
    `requests`, and only for the families a listener there can take (an IPv6 wildcard
    listener takes IPv4 too)."""
    listeners = diag.dump(["LISTEN"], families, ports=ports, local=True)
    if not listeners or not requests:
        return listeners, None
    fams = {socket.AF_INET} if any(s.family == socket.AF_INET or s.laddr == "::"
                                   for s in listeners) else set()
    fams |= {s.family for s in listeners if s.family == socket.AF_INET6}
    return listeners, diag.dump(["SYN_RECV"], [f for f in families if f in fams],
                                ports={s.lport for s in listeners}, local=True)


class Listeners(Sampler):
    """For every network namespace with a TCP listener: each listener's accept queue now and
    its backlog (sock_diag LISTEN: what `ss -ltn` shows as Recv-Q and Send-Q), its request socks
    (SYN_RECV, what `ss -tan state syn-recv` lists) and its owner; the namespace's listen
    counters (LISTEN_COUNTERS, cumulative), and at its first reading and every
    `refresh_every`th after, the sysctls that bound the queues. One Sample per namespace:

        {"listeners": [{"family", "laddr", "lport", "accept_queue", "backlog", "half_open",
                        "sockets", "inode", "pid", "comm"}, ...],
         "counters": {name: value}, "settings": {name: value} (when read)}

    A namespace that had listeners and has none now (or is gone) gets one last reading with
    none, so that what was known of them ends. Request socks are counted (half_open) when they
    can matter: at a reading where the namespace's request counters moved (a SYN flood) and the
    `refresh_every` readings after it (to follow them down), and at every refresh; else
    half_open is None (not read). Not "while some are there": a healthy busy listener always
    has some, and under a storm the table they are counted in holds tens of thousands of
    TIME_WAIT sockets, walked whole for every count. Not for drops with the accept queue full
    either (requests_moved). Listeners sharing an
    address and port (SO_REUSEPORT) are one entry: their queues summed, `sockets` of them.
    Namespaces without a listener cost one small dump and yield nothing. Only the listeners
    the filters (--port, -4, -6: `ports`, `families`) let through are read, as the kernel side
    traces only their sockets. Measured with 30,000 sockets on the host: docs/bench.md."""
    name = "listen"
    period_ns = 1_000_000_000

    def __init__(self, namespaces=None, ports=(), families=(), refresh_every=10):
        self.families = tuple(families) or (socket.AF_INET, socket.AF_INET6)
        self.ports = tuple(sorted(ports))
        self.namespaces = namespaces or Namespaces(refresh_ns=self.period_ns)
        self.refresh_every = refresh_every
        self._owners = {}       # listener inode -> (pid, comm), or None where nobody was found
        self._diags = {}        # netns -> a sock_diag socket opened in it, kept while it lasts
        self._last = {}         # netns -> (readings taken, its last counters, the reading at
                                #   which the request counters last moved)
        self._listening = set()

    def sample(self, now_ns):
        out = []
        self._listening = set()     # the inodes of the listeners read this time
        known = self.namespaces.get(now_ns)
        for ino, base in known.items():
            try:
                data = self.read(ino, base)
            except OSError:     # the namespace's last task went away meanwhile
                continue
            if data is not None:
                out.append(Sample(now_ns, self.name, ino, data))
        for ino in set(self._last) - set(known):
            out.append(Sample(now_ns, self.name, ino, {"listeners": [],
                                                        "counters": self._last.pop(ino)[1]}))
        for ino in set(self._diags) - set(known):
            self._diags.pop(ino).close()    # it keeps its namespace alive: let it go
        for ino in set(self._owners) - self._listening:
            del self._owners[ino]
        return out

    def read(self, ino, base):
        """The reading of namespace `ino` (that of /proc/<pid> `base`), or None if it has no
        listener."""
        got = counters.tcp_counters(base)
        counts = {k: got.get(k, 0) for k in LISTEN_COUNTERS}
        n, last, moved = self._last.get(ino, (0, None, -self.refresh_every))
        if last is not None and requests_moved(last, counts):
            moved = n
        refresh = n % self.refresh_every == 0
        diag = self._diags.get(ino)
        if diag is None:
            # Opened inside the namespace once (a thread that enters it), then used from here:
            # a socket belongs to the namespace it was made in
            diag = self._diags[ino] = netns.run_in(base, Diag)
        socks, requests = _dumps(diag, self.families, self.ports,
                                 refresh or n - moved < self.refresh_every)
        if not socks:
            if self._last.pop(ino, None) is None:
                return None
            return {"listeners": [], "counters": counts}     # the last listener closed
        listeners = {}
        for s in socks:
            key = (s.family, s.laddr, s.lport)
            got = listeners.get(key)
            if got is None:
                listeners[key] = {"family": s.family, "laddr": s.laddr, "lport": s.lport,
                                  "accept_queue": s.rqueue, "backlog": s.wqueue,
                                  "half_open": 0 if requests is not None else None,
                                  "sockets": 1, "inode": s.inode}
            else:
                got["accept_queue"] += s.rqueue
                got["backlog"] += s.wqueue
                got["sockets"] += 1
        for r in requests or ():
            key = owning_listener(r.family, r.laddr, r.lport, listeners)
            if key is not None:
                listeners[key]["half_open"] += 1
        self._last[ino] = (n + 1, counts, moved)
        self._name_owners(listeners.values(), ino)
        data = {"listeners": list(listeners.values()), "counters": counts}
        if refresh:
            data["settings"] = counters.sysctls(base, LISTEN_SETTINGS)
        return data

    def close(self):
        for d in self._diags.values():
            d.close()
        self._diags = {}

    def known_owners(self, found):
        """Owners already looked up ({socket inode: (pid, comm, fd), or None where nobody was
        found}: the scan that seeds the tracker at start), so that the first reading does not
        scan every process again."""
        for ino, o in found.items():
            self._owners.setdefault(ino, o)

    def _name_owners(self, listeners, ino):
        """pid and comm of each listener's holder, looked up once per listener, among the
        processes of its namespace first (owners.inode_owners reads every descriptor of every
        process it looks at: 137 ms for 21,000 descriptors here, on the tracer's loop)."""
        inodes = {lst["inode"] for lst in listeners}
        self._listening |= inodes
        new = inodes - set(self._owners)
        if new:
            found = owners.inode_owners(new, likely=self.namespaces.pids(ino))
            for ino in new:
                self._owners[ino] = found.get(ino)
        for lst in listeners:
            o = self._owners.get(lst["inode"])
            lst["pid"], lst["comm"] = (o[0], o[1]) if o else (None, None)
