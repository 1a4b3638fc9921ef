"""time_wait, port_pressure and time_wait_overflow: who waits in TIME_WAIT, for how long, and
when a destination runs out of local ports.

No tracepoint reports TIME_WAIT. The closing socket goes FIN_WAIT2 -> CLOSE (or CLOSING ->
CLOSE, FIN_WAIT1 -> CLOSE) and the kernel puts a timewait sock in its place (tcp_time_wait());
nothing fires when that expires 60 s later (TCP_TIMEWAIT_LEN, fixed) or is recycled. So:

- the step into TIME_WAIT is inferred from the last step (`entered_time_wait`): close findings
  say `time_wait`, --transitions shows the step, flagged inferred;
- the step out is read from the kernel's own table: the TIME_WAIT sampler
  (host/timewait.py) dumps the timewait socks of every namespace and says which 4-tuples left
  since its last dump; a sock no dump ever showed (recycled, killed, or never made because
  tcp_max_tw_buckets was reached) is let out by the 60 s rule;
- counts, entries and recycles per namespace, and per destination the share of the local port
  range that TIME_WAIT and connected sockets use, come from the same samples: a `time_wait`
  record when they change, `port_pressure` when a destination crosses the threshold, and
  `time_wait_overflow` when the kernel could not make a timewait sock at all.
"""
import collections

from tcptrace import states as S
from tcptrace.detect.base import Detector
from tcptrace.detect.transitions import ends_of
from tcptrace.findings import Ends, Finding, InferredTransition
from tcptrace.host.timewait import TimeWaitSampler

TIME_WAIT_NS = 60_000_000_000      # TCP_TIMEWAIT_LEN (include/net/tcp.h): not tunable
# The last steps after which the kernel makes a timewait sock (tcp_time_wait() then
# tcp_done()): the FIN handshake finished from FIN_WAIT2, a simultaneous close from CLOSING,
# and FIN_WAIT1 -> CLOSE on the paths that skip the FIN_WAIT2 transition.
INTO_TIME_WAIT = frozenset((S.FIN_WAIT2, S.CLOSING, S.FIN_WAIT1))
TW_CELL = S.TIME_WAIT << 4 | S.CLOSE
MAX_WAITING = 65_536        # timewait socks followed for their exit at once
RECENT_NS = 1_000_000_000   # how long a dump's new TIME_WAIT 4-tuples wait for their close
# How often the sampler reads a namespace. A TIME_WAIT count changes slowly by nature: each
# timewait sock lives 60 s, so in 5 s a pile-up grows by at most 5/60 of its steady height,
# which is what a peak read every 5 s can miss; and a reading costs about a microsecond per
# socket, every timewait sock of the namespace each time, so reading every second made the
# sampler half of report's CPU under a 5k conn/s storm, and a third of watch's (docs/bench.md).
# So every 5 s, `report` every --interval when that is shorter; but `watch` samples every
# second while a destination is near port_pressure's threshold (host/timewait.near: half of it
# used, or growing as fast as would reach it in 5 s), where a second can matter: at 5k
# connections/s to one destination, 80% to 100% of a 28k-port range takes a second.
PERIOD_NS = 5_000_000_000


def sample_options(report, interval_s, threshold, transitions):
    """The TIME_WAIT sampler's options for a run: how often (see PERIOD_NS), and whether its
    samples name the 4-tuples that entered and left TIME_WAIT (`follow`): only for
    --transitions, whose lines show each step out when a dump no longer shows the sock.
    report's matrix counts those steps by the 60 s rule, as it does for the connections the
    kernel folds: each reading's diff of every timewait sock's 4-tuple was over half of its
    sampling's cost with a 60 s pile at 5k connections/s (docs/bench.md)."""
    out = {"follow": transitions}
    if not report:
        out.update(calm_period_ns=PERIOD_NS, threshold=threshold)
    elif interval_s:
        out["period_ns"] = max(TimeWaitSampler.period_ns, min(PERIOD_NS, int(interval_s * 1e9)))
    else:
        out["period_ns"] = PERIOD_NS
    return out


# the last two states of a path (Conn.path's low byte) that end in a timewait sock
_INTO_TW_ENDS = frozenset(s << 4 | S.CLOSE for s in INTO_TIME_WAIT)


def entered_time_wait(c):
    """Did c's socket leave a timewait sock behind? Inferred from its last step: one of
    INTO_TIME_WAIT -> CLOSE with no reset either way and no error (a reset, an abort or a
    timeout closes from those states too, and leaves none)."""
    return (c.path & 0xFF in _INTO_TW_ENDS and c.recv_reset_ns is None
            and c.send_reset_ns is None and not c.error)


class TimeWaits(Detector):
    SAMPLERS = (TimeWaitSampler,)
    # what its samples change: its own findings, and when a timewait sock's exit is told
    SAMPLED_FOR = frozenset(("time_wait", "port_pressure", "time_wait_overflow", "transition"))

    def __init__(self, tracker, threshold=0.8, follow=True, sampling=None):
        super().__init__(tracker)
        self.threshold = threshold
        # Follow each timewait sock to its exit (TIME_WAIT -> CLOSE): only for what shows
        # transitions (--transitions, the report's matrix); nothing else reads it. Told by a
        # dump where the samples name exits (the sampler's `follow`), else by the 60 s rule.
        self.follow = follow
        # how the sampler reads (sample_options; None: following, every second)
        self.sampler_options = {"follow": follow, **(sampling or {})}
        # (laddr, lport, raddr, rport) -> (entered_ns, seen in a dump, *the Ends' fields):
        # timewait socks whose exit is still to be told, oldest first. Tuples of plain values,
        # not the Ends: Python's collector stops walking such a tuple once it has seen it, and
        # up to MAX_WAITING of them live a minute (as objects they were a tenth of the
        # tracer's CPU under --transitions at 10k connections/s, walked at each collection)
        self.waiting = collections.OrderedDict()
        self.sampled = False        # a TIME_WAIT sampler runs (else the 60 s rule alone)
        # 4-tuples the latest samples showed entering TIME_WAIT -> that sample's time: a dump
        # can come between a socket's CLOSE and its conclusion (the tracker's grace)
        self.recent = {}
        self.ns = {}                # netns -> what its last sample said (_Namespace)
        if not follow:
            # The step into TIME_WAIT is then neither shown nor counted in a matrix anyone
            # reads: not asked of every closed socket
            self.closed = None

    # -- connections --------------------------------------------------------------------------
    def closed(self, c):
        """Runs before the detector that concludes c (it concludes nothing itself): the step
        into TIME_WAIT, counted in the transition matrix and shown with --transitions."""
        if not entered_time_wait(c):
            return False
        ts = c.closed_ns
        old = (c.path >> 4) & 0xF
        tr = self.tr
        tr.stats.mx[old << 4 | S.TIME_WAIT] += 1
        if not c.lport:
            return False
        ends = ends_of(c, c.skaddr)
        if tr.transitions:
            tr.out.append(InferredTransition(ts, ends, old << 8 | S.TIME_WAIT, "close"))
        key = (c.laddr, c.lport, c.raddr, c.rport)
        waiting = self.waiting
        if key in waiting:
            del waiting[key]        # taken over (tcp_tw_reuse): the new one replaces it
        elif len(waiting) >= MAX_WAITING:
            # Full: this one's exit goes untold (counted; the matrix's TW -> CLOSE counts
            # less). Not the oldest dropped for it: above MAX_WAITING entries a minute, each
            # would be dropped before its 60 s were over, and no exit told at all.
            tr.stats.unfollowed += 1
            return False
        waiting[key] = (ts, key in self.recent, ends.pid, ends.comm, ends.family, ends.laddr,
                        ends.lport, ends.raddr, ends.rport, ends.sk)
        return False

    def _leave(self, key, ts, by):
        w = self.waiting.pop(key, None)
        if w is None:
            return
        self.tr.stats.mx[TW_CELL] += 1
        if self.tr.transitions:
            self.tr.emit(InferredTransition(ts, Ends(*w[2:]), S.TIME_WAIT << 8 | S.CLOSE, by))

    def clock(self, now_ns):
        """The 60 s rule, for timewait socks no dump has shown: they are let out when their
        time is up. Those a dump has shown wait for a dump that no longer shows them (a
        FIN_WAIT2 timewait sock restarts its 60 s at the peer's FIN)."""
        w = self.waiting
        while w:
            key, entry = next(iter(w.items()))
            due = entry[0] + TIME_WAIT_NS
            if due > now_ns:
                break
            if entry[1] and self.sampled:
                # A dump showed it: the dump that no longer shows it will tell. Asked again
                # 60 s later, and then let out by the rule (its namespace may be gone).
                w[key] = (due, False) + entry[2:]
                w.move_to_end(key)
                continue
            self._leave(key, due, "rule")

    # -- samples ------------------------------------------------------------------------------
    def sample(self, rec):
        if rec.what != TimeWaitSampler.name:
            return
        self.sampled = True
        d = rec.data
        if not self.follow:
            self._namespace(rec)
            return
        recent = self.recent
        if recent and next(iter(recent.values())) < rec.ts_ns - RECENT_NS:
            self.recent = recent = {k: t for k, t in recent.items()
                                    if t >= rec.ts_ns - RECENT_NS}
        for t in d.get("entered", ()):
            key = (t[0], t[1], t[2], t[3])
            w = self.waiting.get(key)
            if w is not None:
                self.waiting[key] = (w[0], True) + w[2:]     # (in place: keeps its turn)
            else:
                recent[key] = rec.ts_ns
        for t in d.get("left", ()):
            self._leave((t[0], t[1], t[2], t[3]), rec.ts_ns, "sock_diag")
        self._namespace(rec)

    def _namespace(self, rec):
        """The namespace's own view: counts, destinations, pressure."""
        if rec.data.get("gone"):
            self.ns.pop(rec.netns, None)
            return
        ns = self.ns.get(rec.netns)
        if ns is None:
            ns = self.ns[rec.netns] = _Namespace()
        ns.update(self, rec)


COUNTERS = ("TW", "TWRecycled", "TWKilled", "TCPTimeWaitOverflow")


class _Namespace:
    """One network namespace's TIME_WAIT as its samples show it."""
    __slots__ = ("counters", "ts_ns", "shown", "pressed")

    def __init__(self):
        self.counters = None        # the last sample's absolute counters
        self.ts_ns = None
        # what the last time_wait record said: (count, destinations, services)
        self.shown = (0, (), ())
        self.pressed = set()        # destinations over the threshold now

    def update(self, det, rec):
        d, tr = rec.data, det.tr
        lo, hi = d["port_range"]
        ports = max(1, hi - lo + 1)
        now = {k: d["counters"].get(k, 0) for k in COUNTERS}
        delta = ({k: now[k] - self.counters[k] for k in COUNTERS}
                 if self.counters is not None else None)
        interval = rec.ts_ns - self.ts_ns if self.ts_ns is not None else None
        self.counters, self.ts_ns = now, rec.ts_ns
        if delta and delta["TCPTimeWaitOverflow"] > 0:
            tr.emit(Finding("time_wait_overflow", rec.ts_ns, netns=rec.netns,
                            count=delta["TCPTimeWaitOverflow"], interval_ns=interval,
                            max_tw_buckets=d.get("max_tw_buckets"), time_wait=d["tw"]))
        dests = []
        pressed = set()
        for laddr, raddr, rport, tw, other in d["dests"]:
            share = (tw + other) / ports
            if share >= det.threshold:
                key = (laddr, raddr, rport)
                pressed.add(key)
                if key not in self.pressed:
                    tr.emit(Finding("port_pressure", rec.ts_ns, None, None,
                                    S.AF_INET6 if ":" in raddr else S.AF_INET, laddr, None,
                                    raddr, rport, netns=rec.netns, time_wait=tw, connected=other,
                                    ports=ports, port_range=[lo, hi],
                                    port_share=round(share, 4), threshold=det.threshold,
                                    tw_reuse=d.get("tw_reuse")))
            if tw:
                dests.append({"laddr": laddr, "raddr": raddr, "rport": rport, "time_wait": tw,
                              "in_use": tw + other, "port_share": round(share, 4)})
        self.pressed = pressed
        shown = (d["tw"], tuple((x["laddr"], x["raddr"], x["rport"], x["time_wait"])
                                for x in dests),
                 tuple(tuple(s) for s in d["services"]))
        moved = delta is not None and (delta["TW"] or delta["TWRecycled"] or delta["TWKilled"])
        if shown == self.shown and not moved:
            return
        self.shown = shown
        tr.emit(Finding(
            "time_wait", rec.ts_ns, netns=rec.netns, time_wait=d["tw"],
            entered=delta["TW"] if delta else None,
            recycled=delta["TWRecycled"] if delta else None,
            killed=delta["TWKilled"] if delta else None, interval_ns=interval,
            port_range=[lo, hi], destinations=dests,
            local_addresses=[{"laddr": a, "time_wait": tw, "in_use": tw + other,
                              "port_share": round((tw + other) / ports, 4)}
                             for a, tw, other in d["locals"] if tw],
            services=[{"laddr": a, "lport": p, "time_wait": n} for a, p, n in d["services"]]))
