"""listen_pressure and listen_recovered: a listener dropping SYNs, retransmitting SYN-ACKs or
running its accept queue full, reported while it happens, and when it ends.

What it reads, all of it the kernel's own view:
  sample "listen"      (host/samplers.py: Listeners) per network namespace, every second: each
                       listener's accept queue and backlog, its request socks (half-open), its
                       owner; the namespace's TcpExt listen counters; its queue sysctls.
  fact SYNACK          (bpf/listen.c) a SYN-ACK retransmitted by a listener: its namespace, its
                       port and the address the SYN came to. Exact, per listener.
  sample "overflows"   (bpf/listen.c, read by kernel/source.py) final ACKs each listener dropped
                       with its accept queue full, where the kernel names the listener
                       (TCP_LISTEN_OVERFLOW). Exact, per listener.
  fact SEND_RESET      a reset a listener sent (to an ACK it has no connection or SYN cookie
                       for), with its reason where the kernel gives one (names: sample
                       "names"). Counted while the listener is under pressure.

The SYNs the kernel drops fire no tracepoint: only the namespace's counters tell them. A
namespace with one listener gives its counts to that listener. With several, they go, marked
namespace-wide, to the listeners that show pressure of their own (a full queue, SYN-ACKs
retransmitted, overflows); if none does, to the namespace itself (a finding without a listener
address), rather than to a guess.

Every count is reported once: a finding carries what happened since its listener's previous
finding, and `listen_recovered` the rest.
"""
import collections

from tcptrace.detect.base import Detector
from tcptrace.findings import Finding
from tcptrace.host import samplers
from tcptrace.lifecycle.conn import LISTENER
from tcptrace.states import owning_listener
from tcptrace.wire import F_REASON, NAMES, OVERFLOWS, Kind, addr_str

# The namespace counters (host/samplers.py: LISTEN_COUNTERS) under the names findings give them
COUNTER_NAMES = {"ListenDrops": "dropped", "ListenOverflows": "accept_queue_full",
                 "TCPReqQFullDrop": "request_queue_full", "SyncookiesSent": "cookies_sent",
                 "SyncookiesRecv": "cookies_validated", "SyncookiesFailed": "cookies_failed"}
# Requests remembered per listener: under a SYN flood without cookies the request queue holds
# at most the backlog, and with cookies the kernel keeps no request beyond it either.
MAX_REQUESTS = 4096


class Listener:
    """One listening address and port in one namespace as its readings show it; with family
    None, the namespace itself (for counts no listener can be named for)."""

    def __init__(self, netns, family, laddr, lport):
        self.netns, self.family, self.laddr, self.lport = netns, family, laddr, lport
        self.pid = self.comm = None
        self.accept_queue = self.backlog = 0
        self.half_open = None
        self.counts = collections.Counter()     # since the last finding
        self.resets = collections.Counter()     # the same, resets it sent by reason
        self.totals = collections.Counter()     # since tracing began (the report's)
        self.episode = collections.Counter()    # since this pressure began
        self.scope = None           # whose counters are in counts: "listener" or "namespace"
        self.counted = "namespace" if family is None else "listener"    # the same, in totals
        self.peak = 0               # most half-open at a reading since tracing began
        self.window_ns = None       # when `counts` began
        self.samples = self.full_samples = self.half_open_peak = 0     # in the window
        self.fresh = False          # SYN-ACKs or overflows since the last reading
        self.since_ns = None        # under pressure since, or None
        self.reported_ns = self.active_ns = None
        self.last_episode = None    # (first, last active reading) of the last pressure ended
        self.requests = set()       # requests whose SYN-ACK it retransmitted in its pressure,
                                    #   or its last one (4-tuples, up to MAX_REQUESTS)
        self.starting = set()       # the same, since then, for a pressure about to begin
        # (window start, end, cause) of its recent findings, the last one's latest: what a
        # connect that waited on it met over its whole wait, not only in the window last reported
        self.causes = collections.deque(maxlen=32)

    def read(self, d):
        # half_open is None where the sampler did not count request socks this time (it does
        # whenever the counters move or some were there: host/samplers.py)
        self.accept_queue, self.backlog, self.half_open = \
            d["accept_queue"], d["backlog"], d["half_open"]
        self.peak = max(self.peak, self.half_open or 0)
        if d.get("pid") is not None or self.pid is None:
            self.pid, self.comm = d.get("pid"), d.get("comm")

    def accept_full(self):
        """The accept queue is full now (sk_acceptq_is_full: more queued than the backlog)."""
        return self.family is not None and self.accept_queue > self.backlog

    def request_full(self):
        """The request queue is full now (inet_csk_reqsk_queue_is_full: as many half-open as
        the backlog): new SYNs are dropped, or answered with cookies."""
        return self.half_open is not None and self.half_open >= max(self.backlog, 1)

    def pressed(self):
        """Pressure of its own, without the namespace's counters."""
        return self.fresh or self.accept_full() or self.request_full()

    def pressed_within(self, start_ns, end_ns):
        """Was it under pressure at some time in [start_ns, end_ns]? A reading is taken every
        period, so pressure seen at one began up to a period before it."""
        slack = samplers.Listeners.period_ns
        if self.since_ns is not None:
            return self.since_ns - slack <= end_ns
        if self.last_episode is not None:
            first, last = self.last_episode
            return first - slack <= end_ns and last >= start_ns
        return False

    def takes(self, family, addr, port):
        """Would a connection to addr:port of this family reach this listener?"""
        if self.family is None:
            return False
        return owning_listener(family, addr, port, {(self.family, self.laddr, self.lport)}) \
            is not None


class Listeners(Detector):
    SAMPLERS = (samplers.Listeners,)
    # its own findings, and the listener a slow or failed connect waited on
    SAMPLED_FOR = frozenset(("listen_pressure", "listen_recovered", "connect", "refused",
                             "failed"))

    def __init__(self, tracker, interval_ns=5_000_000_000):
        super().__init__(tracker)
        self.interval_ns = interval_ns
        self.spaces = {}            # netns -> {(family, laddr, lport) or None: Listener}
        self.readings = {}          # netns -> (counters, settings) of its last reading
        self.unplaced = collections.Counter()   # (netns, family, laddr, lport) -> SYN-ACK
                                                #   retransmits of a listener not read yet
        self.unplaced_dropped = 0   # SYN-ACK retransmits no listener reading ever matched
        self.overflows_read = {}    # skaddr -> drops at the last reading of `overflows`
        self.by_sk = {}             # a listener's skaddr (its SYN-ACK records name it) -> it
        self.rst_names = {}         # reset reason number -> the running kernel's name
        self.per_listener_overflows = False     # the kernel side counts them (a reading came)
        self.past = collections.deque(maxlen=256)       # listeners gone, for the report

    # -- inputs ------------------------------------------------------------------------------
    def sample(self, rec):
        if rec.what == samplers.Listeners.name:
            self._reading(rec.ts_ns, rec.netns, rec.data)
        elif rec.what == OVERFLOWS:
            self._overflows(rec.data["listeners"])
        elif rec.what == NAMES:
            self.rst_names = {int(k): v for k, v in rec.data.get("rst_reasons", {}).items()}

    def fact(self, ev):
        if ev.kind == Kind.SEND_RESET:
            self._reset(ev)
            return
        if ev.kind != Kind.SYNACK:
            return
        laddr = addr_str(ev.family, ev.saddr)
        key = (ev.aux, ev.family, laddr, ev.sport)
        lst = self._find(*key)
        if lst is None:
            self.unplaced[key] += 1      # its listener may not have been read yet
            return
        self.by_sk[ev.skaddr] = lst
        request = (laddr, ev.sport, addr_str(ev.family, ev.daddr), ev.dport)
        if lst.since_ns is None:
            if request in lst.requests:
                # A request left over from the last pressure, retried later (the retries space
                # out over tcp_synack_retries): the tail of that, not a new one. Counted in the
                # listener's totals, not reported.
                lst.totals["synack_retransmits"] += 1
                return
            seen = lst.starting
        else:
            seen = lst.requests
        if len(seen) < MAX_REQUESTS:
            seen.add(request)
        lst.counts["synack_retransmits"] += 1
        lst.fresh = True

    def _reset(self, ev):
        """A reset a socket sent: the listener's, if it is a listener we know (by the skaddr
        its SYN-ACKs named, or its listen() seen by the tracker). Counted while the listener
        is under pressure; otherwise only in its totals (a restarted server's listener
        answering the old connections' packets is no pressure)."""
        lst = self.by_sk.get(ev.skaddr)
        if lst is None:
            c = self.tr.table.get(ev.skaddr)
            if c is None or c.role != LISTENER:
                return
            lst = self._find(c.netns, c.family, c.laddr, c.lport)
            if lst is None:
                return
        if lst.since_ns is None:
            lst.totals["resets"] += 1
            return
        lst.counts["resets"] += 1
        lst.resets[self.rst_names.get(ev.aux, str(ev.aux)) if ev.flags & F_REASON
                   else "unknown"] += 1

    def _find(self, netns, family, laddr, lport):
        """The one listener a connection to laddr:lport reaches in namespace netns (0: unknown,
        then in any namespace), or None when none or several do."""
        spaces = [self.spaces.get(netns, {})] if netns else self.spaces.values()
        found = []
        for space in spaces:
            key = owning_listener(family, laddr, lport, space)
            if key is not None:
                found.append(space[key])
        return found[0] if len(found) == 1 else None

    def _overflows(self, rows):
        """The kernel's per-listener overflow counts (cumulative); each listener's growth since
        the last reading is its overflows."""
        self.per_listener_overflows = True
        for sk, netns, family, port, drops in rows:
            last = self.overflows_read.get(sk, 0)
            self.overflows_read[sk] = drops
            n = drops - last if drops >= last else drops    # evicted and made anew: from 0
            if not n:
                continue
            spaces = [self.spaces.get(netns, {})] if netns else self.spaces.values()
            found = [lst for space in spaces for key, lst in space.items()
                     if key is not None and lst.family == family and lst.lport == port]
            if len(found) == 1:
                lst = found[0]
            elif netns in self.spaces:      # several on that port: the namespace's, not a guess
                lst = self._namespace(netns)
            else:
                continue
            lst.counts["overflows"] += n
            lst.fresh = True

    def _namespace(self, netns):
        space = self.spaces.setdefault(netns, {})
        if None not in space:
            space[None] = Listener(netns, None, None, None)
        return space[None]

    def _reading(self, ts, netns, data):
        space = self.spaces.setdefault(netns, {})
        now = set()
        for d in data["listeners"]:
            key = (d["family"], d["laddr"], d["lport"])
            lst = space.get(key)
            if lst is None:
                lst = space[key] = Listener(netns, *key)
                lst.window_ns = ts
            lst.read(d)
            now.add(key)
        for key in [k for k in space if k is not None and k not in now]:
            self._gone(space.pop(key), ts)
        for key in [k for k in self.unplaced if k[0] in (netns, 0)]:
            lst = self._find(*key)
            n = self.unplaced.pop(key)
            if lst is not None:
                lst.counts["synack_retransmits"] += n
                lst.fresh = True
            elif key[0] == netns:
                self.unplaced_dropped += n
        counters = data["counters"]
        last = self.readings.get(netns)
        settings = data.get("settings") or (last[1] if last else {})
        self.readings[netns] = (counters, settings)
        delta = _delta(last[0], counters) if last else None
        named = [lst for key, lst in space.items() if key is not None]
        given = []
        if delta:
            if len(named) == 1:
                given, scope = named, "listener"
            else:
                given = [lst for lst in named if lst.pressed()] or [self._namespace(netns)]
                scope = "namespace"
            for lst in given:
                lst.counts.update(delta)
                lst.scope = scope
                if scope == "namespace":
                    lst.counted = scope
        for lst in list(space.values()):
            self._judge(lst, ts, lst in given or lst.pressed(), settings)
        if not named:       # its last listener closed, or it is gone: no reading comes again
            lst = space.pop(None, None)
            if lst is not None:
                self._gone(lst, ts)
            del self.spaces[netns], self.readings[netns]

    # -- pressure ----------------------------------------------------------------------------
    def _judge(self, lst, ts, active, settings):
        lst.fresh = False
        lst.samples += 1
        lst.full_samples += lst.accept_full()
        lst.half_open_peak = max(lst.half_open_peak, lst.half_open or 0)
        if active:
            lst.active_ns = ts
        if lst.since_ns is None:
            if active:
                lst.since_ns = ts
                lst.requests, lst.starting = lst.starting, set()
                self._report(lst, ts, "listen_pressure", settings)
            else:
                self._window(lst, ts)
        elif active:
            if ts - lst.reported_ns >= self.interval_ns:
                self._report(lst, ts, "listen_pressure", settings)
        elif ts - lst.active_ns >= self.interval_ns:
            self._report(lst, ts, "listen_recovered", settings)

    def _gone(self, lst, ts):
        """A listener no longer in its namespace's dump: closed (or its namespace is gone)."""
        if lst.since_ns is not None:
            self._report(lst, ts, "listen_recovered", self.readings.get(lst.netns, ({}, {}))[1],
                         closed=True)
        self.past.append(lst)
        self.by_sk = {sk: other for sk, other in self.by_sk.items() if other is not lst}

    def _window(self, lst, ts):
        lst.window_ns = ts
        lst.samples = lst.full_samples = 0
        lst.half_open_peak = lst.half_open or 0
        lst.scope = None

    def _report(self, lst, ts, type_, settings, closed=False):
        c = lst.counts
        lst.episode.update(c)
        lst.totals.update(c)
        cause, words = _cause(lst, c, settings)
        lst.causes.append((ts if lst.window_ns is None else lst.window_ns, ts, cause))
        extra = {"netns": lst.netns, "cause": cause, "reason": "; ".join(words),
                 "interval_ns": ts - lst.window_ns if lst.window_ns is not None else None,
                 "duration_ns": ts - lst.since_ns,
                 "accept_queue": lst.accept_queue, "backlog": lst.backlog,
                 "half_open": lst.half_open, "half_open_peak": lst.half_open_peak,
                 "synack_retransmits": c["synack_retransmits"],
                 "overflows": c["overflows"] if self.per_listener_overflows else None,
                 "drops": _drops(c), "cookies": _cookies(c), "counters": lst.scope,
                 "resets": dict(lst.resets),
                 "settings": dict(settings)}
        if lst.family is None:
            extra["listeners"] = len(self.spaces.get(lst.netns, ())) - 1
        if type_ == "listen_recovered":
            e = lst.episode
            extra["episode"] = {"dropped": e["dropped"], "synack_retransmits":
                                e["synack_retransmits"], "overflows": e["overflows"],
                                "cookies_sent": e["cookies_sent"]}
            extra["closed"] = closed
            lst.last_episode = (lst.since_ns, lst.active_ns)
            lst.since_ns = None
            lst.episode = collections.Counter()
        self.tr.emit(Finding(type_, ts, lst.pid, lst.comm, lst.family, lst.laddr, lst.lport,
                             **extra))
        c.clear()
        lst.resets.clear()
        lst.reported_ns = ts
        self._window(lst, ts)

    # -- what others ask ---------------------------------------------------------------------
    def waited_on(self, c, until_ns):
        """The local listener a connect's SYNs waited on: the one listener that was under
        pressure at some time between c's connect() and until_ns and takes connections to c's
        destination; None if none or several are. As a finding member: laddr, lport, pid,
        comm, netns, cause: the causes of its findings whose windows overlap the wait, in the
        order they first came (a SYN dropped for a full request queue during a flood, then let
        in while only SYN-ACK retransmissions were left, met both); its latest cause if none
        does."""
        start = c.opened_ns if c.opened_ns is not None else until_ns
        hits = [lst for space in self.spaces.values() for lst in space.values()
                if lst.takes(c.family, c.raddr, c.rport) and lst.pressed_within(start, until_ns)]
        if len(hits) != 1:
            return None
        lst = hits[0]
        slack = samplers.Listeners.period_ns
        met = []
        for lo, hi, cause in lst.causes:
            if lo - slack <= until_ns and hi >= start:
                met += [k for k in cause if k not in met]
        return {"laddr": lst.laddr, "lport": lst.lport, "pid": lst.pid, "comm": lst.comm,
                "netns": lst.netns,
                "cause": met or (list(lst.causes[-1][2]) if lst.causes else [])}

    def table(self):
        """Every listener known, and those gone since start: [Listener]."""
        return [lst for space in self.spaces.values() for lst in space.values()] + \
            list(self.past)


def _delta(last, now):
    """Counter growth between two readings, under the findings' names; None if a counter went
    down (the namespace was made anew under the same inode: start over)."""
    out = collections.Counter()
    for name, key in COUNTER_NAMES.items():
        d = now.get(name, 0) - last.get(name, 0)
        if d < 0:
            return None
        if d:
            out[key] = d
    return out


def _drops(c):
    other = c["dropped"] - c["accept_queue_full"] - c["request_queue_full"]
    return {"total": c["dropped"], "request_queue_full": c["request_queue_full"],
            "accept_queue_full": c["accept_queue_full"], "other": max(other, 0)}


def _cookies(c):
    return {"sent": c["cookies_sent"], "validated": c["cookies_validated"],
            "failed": c["cookies_failed"]}


def _n(n, one, many=None):
    """A count with its noun: 1 SYN, 36,411 SYNs."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _cause(lst, c, settings):
    """(cause codes, the cause in words) of a listener's counts."""
    codes, words = [], []
    cookies = settings.get("tcp_syncookies")
    dropped, syns = c["request_queue_full"], c["cookies_sent"]
    if dropped or syns or lst.request_full():
        codes.append("request_queue_full")
        w = f"SYN flood: request queue full ({lst.half_open_peak}/{lst.backlog})"
        if dropped:
            w += f", {_n(dropped, 'SYN')} dropped"
        if syns:
            w += f", answered with {_n(syns, 'SYN cookie')}"
        if dropped and cookies == 0:
            w += ", no SYN cookies"
        words.append(w)
    full = c["accept_queue_full"]
    if full or c["overflows"] or lst.full_samples:
        codes.append("accept_queue_full")
        if lst.samples and lst.full_samples == lst.samples:
            w = (f"accept queue full ({lst.accept_queue}/{lst.backlog}): the application is "
                 "not calling accept()")
        else:
            w = "accept queue full at times: accept() is not keeping up"
        if full:
            w += f", {_n(full, 'SYN or ACK', 'SYNs and ACKs')} dropped"
        words.append(w)
    other = _drops(c)["other"]
    if other:
        codes.append("other_drops")
        w = f"{_n(other, 'SYN')} dropped"
        if cookies == 0 and "tcp_max_syn_backlog" in settings:
            w += (f", the request queue near tcp_max_syn_backlog "
                  f"({settings['tcp_max_syn_backlog']}) and no SYN cookies")
        words.append(w)
    if c["cookies_failed"]:
        codes.append("cookies_failed")
        words.append(f"{_n(c['cookies_failed'], 'ACK')} matched no SYN cookie")
    n = c["synack_retransmits"]
    if n and not codes:
        codes.append("synack_retransmits")
        words.append(f"{_n(n, 'SYN-ACK')} retransmitted: half-open connections not completing "
                     "(peers gone, or their final ACKs lost)")
    elif n:
        words.append(f"{_n(n, 'SYN-ACK')} retransmitted")
    if not codes and c["cookies_validated"]:
        codes.append("cookies")
        words.append(f"{_n(c['cookies_validated'], 'connection')} completed through SYN "
                     "cookies")
    if lst.scope == "namespace" and any(c[k] for k in COUNTER_NAMES.values()):
        words.append("counts namespace-wide")
    if not words:
        words.append("nothing dropped, no SYN-ACK retransmitted, queues not full")
    return codes, words
