"""One state machine per connection, rebuilt from time-ordered kernel facts; detectors turn what
happens to connections into findings.

Pure Python: no BCC, no root. Fed by the live session and by replay alike.

What the kernel tells us, and in which order (checked in tests/kernel):
  refused:    tcp_receive_reset, SYN_SENT -> CLOSE, inet_sk_error_report(ECONNREFUSED)
  timeout:    tcp_retransmit_skb(SYN_SENT) x N, SYN_SENT -> CLOSE, error_report(ETIMEDOUT)
  unreachable: error_report(EHOSTUNREACH), SYN_SENT -> CLOSE          (tcp_v4_err, ICMP)
  linger-0:   ESTABLISHED -> CLOSE, tcp_send_reset                      (tcp_disconnect)
Facts can follow the CLOSE they explain, so a closed connection waits `grace_ns` before it is
concluded. The error report carries no socket pointer: it is matched by 4-tuple.
A SYN_SENT -> CLOSE record carries the socket's errno too, where BTF gives its offset: the
kernel sets it before the CLOSE, while the error report may come later than the grace (seen
at 10.3 ms in an emulated guest).

Honesty rules: a connection first seen mid-life is `partial` (its durations are unknown); one alive
when events were lost is `incomplete` (it may have missed a transition). Detectors that rest on
the absence of events (stuck) must not trust either without the kernel confirming it.

Attribution: only transitions a process makes itself name the owner: CLOSE -> SYN_SENT
(connect), CLOSE -> LISTEN (listen), ESTABLISHED -> FIN_WAIT1 and CLOSE_WAIT -> LAST_ACK (close,
shutdown). The others run in softirq, on whatever task was interrupted. An accepted connection
belongs to its listener's owner.
"""
import collections

from tcptrace import states as S
from tcptrace.detect import base as hooks
from tcptrace.findings import Finding
from tcptrace.lifecycle import fast
from tcptrace.lifecycle.conn import ACTIVE, LISTENER, PASSIVE
from tcptrace.lifecycle.rules import OPENING_CELLS, OWNER_CELLS
from tcptrace.lifecycle.table import ConnTable
from tcptrace.wire import COMM_TEXT, EARLY, Kind, Lost, Sample, endpoints, iter_steps

# The hot path reads these per step: globals, not module attributes.
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1 = S.ESTABLISHED, S.SYN_SENT, S.SYN_RECV, S.FIN_WAIT1
CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN = S.CLOSE, S.CLOSE_WAIT, S.LAST_ACK, S.LISTEN
HALF_CLOSED = S.HALF_CLOSED
STATE = Kind.STATE


class Stats:
    def __init__(self):
        self.events = 0
        self.mx = [0] * 256                         # old << 4 | new -> transitions
        self.lost = collections.Counter()          # where -> events
        self.lost_total = 0
        self.partial = 0
        self.gaps = 0                               # transitions whose old state we did not expect
        self.unmatched_errors = 0
        self.folded = 0                             # sockets the kernel folded (detect/folded.py)
        self.unfollowed = 0                         # timewait socks not followed (timewait.py)

    @property
    def matrix(self):
        """(old, new) -> transitions seen."""
        return collections.Counter({(i >> 4, i & 15): n for i, n in enumerate(self.mx) if n})


class Tracker:
    """Feed `process(record)` with time-ordered Events/Losts and `tick(now_ns)` with the clock;
    findings accumulate in `out` (the caller takes them). `detectors`: factories called with
    the tracker (tcptrace/detect: `standard()` by default)."""

    def __init__(self, stuck_after_ns=30_000_000_000, grace_ns=10_000_000, max_conns=262_144,
                 transitions=False, confirm=None, resolve_owner=None, detectors=None,
                 port_pressure=0.8, pressure_interval_ns=5_000_000_000, follow_time_wait=True,
                 time_wait_sampling=None):
        from tcptrace import detect
        self.grace_ns = grace_ns
        self.table = ConnTable(max_conns)
        # tuple -> (ts, errno) of error reports no connection matched yet: an ICMP error can come
        # before the SYN_SENT it explains has reached us (the kernel sends a socket's pending
        # steps together, at its CLOSE)
        self.early_errors = collections.OrderedDict()
        self.pending = collections.deque()    # closed Conns waiting out grace_ns
        self.out = []
        self.stats = Stats()
        self.loss_epoch = 0                   # bumped by every loss; see incomplete()
        self.now_ns = 0
        if detectors is None:
            detectors = detect.standard(stuck_after_ns, transitions, confirm, resolve_owner,
                                        port_pressure, pressure_interval_ns, follow_time_wait,
                                        time_wait_sampling)
        self.detectors = [make(self) for make in detectors]
        for name in hooks.HOOKS:
            setattr(self, name, hooks.dispatch(self.detectors, name))
        self.transitions = self.step is not hooks.nothing     # someone wants every transition

    @property
    def max_conns(self):
        return self.table.max_conns

    @property
    def conns(self):
        return self.table.by_sk

    def detector(self, cls):
        """The detector of this type, or None."""
        return next((d for d in self.detectors if isinstance(d, cls)), None)

    def stuck_now(self):
        from tcptrace.detect.stuck import Stuck
        d = self.detector(Stuck)
        return d.now() if d else []

    def listeners(self):
        """The Listeners detector (detect/listen.py), or None."""
        from tcptrace.detect.listen import Listeners
        return self.detector(Listeners)

    def waited_on(self, c, until_ns):
        """The local listener under pressure that c's SYNs waited on, as a finding member, or
        None (detect/listen.py: Listeners.waited_on)."""
        d = self.listeners()
        return d.waited_on(c, until_ns) if d else None

    # -- what detectors call -----------------------------------------------------------------
    def emit(self, f):
        self.out.append(f)

    def finding(self, c, type_, ts, **extra):
        """A finding about c, with the flags every connection finding carries (partial,
        incomplete, role); emitted, and returned for the caller to adjust."""
        if c.partial:
            extra["partial"] = True
        if self.incomplete(c):
            extra["incomplete"] = True
        if c.evicted:
            extra["evicted"] = True
        extra["role"] = c.role
        f = Finding(type_, ts, c.pid, c.comm, c.family, c.laddr, c.lport or None, c.raddr,
                    c.rport or None, **extra)
        self.out.append(f)
        return f

    def conclude(self, cls, c, ts, *own):
        """As finding(), for the types with slots (findings.Conclusion): own is their OWN."""
        f = cls(ts, c.pid, c.comm, c.family, c.laddr, c.lport or None, c.raddr, c.rport or None,
                c.partial, c.incomplete or c.epoch != self.loss_epoch,   # self.incomplete(c)
                c.role, *own)
        if c.evicted:
            f.evicted = True
        self.out.append(f)

    def incomplete(self, c):
        """Was c alive across a loss, or did it show a gap?"""
        return c.incomplete or c.epoch != self.loss_epoch

    def take(self):
        """The findings made since the last take. `out` stays the same list (detectors may
        hold its append), emptied here."""
        out = self.out[:]
        self.out.clear()
        return out

    # -- the connection table ----------------------------------------------------------------
    def new(self, skaddr, family, role, state, ts_ns, partial=False):
        """A new generation at skaddr. One whose CLOSE we never saw is over: concluded now,
        marked incomplete, with what we know of it, rather than vanish from the output."""
        old = self.table.by_sk.pop(skaddr, None)
        if old is not None and old.closed_ns is None:
            self.stats.gaps += 1
            self.forget(old)
            if old.established_ns is not None and old.role != LISTENER:
                old.incomplete = True
                old.closed_ns = ts_ns
                self._conclude(old)
        c, victim = self.table.add(skaddr, family, role, state, ts_ns, partial, self.loss_epoch)
        if partial:
            self.stats.partial += 1
        if victim is not None:
            self.gone(victim)
        return c

    def forget(self, c):
        self.gone(c)
        self.table.forget(c)

    def seed(self, family, laddr, lport, raddr, rport, state, now_ns, owner=None, netns=0):
        """A socket that existed before tracing started (ConnTable.seed), in namespace netns
        (the records', 0 where they carry none)."""
        c = self.table.seed(family, laddr, lport, raddr, rport, state, now_ns, owner,
                            self.loss_epoch, netns)
        if c is not None and state in HALF_CLOSED:
            self.resting(c)
        return c

    # -- input -------------------------------------------------------------------------------
    def process(self, rec):
        ts = rec.ts_ns
        if self.pending and ts > self.pending[0].closed_ns + self.grace_ns:
            self._conclude_due(ts)
        if ts > self.now_ns:
            self.now_ns = ts
        t = type(rec)
        if t is Lost:
            self._lost(rec)
            return
        if t is Sample:
            self.sample(rec)
            return
        self.stats.events += 1
        k = rec.kind
        if k == STATE:
            if not fast.apply(self, rec):
                self._state(rec)
        elif k == Kind.RETRANS:
            c = self.table.get(rec.skaddr)
            if c is not None and c.closed_ns is None:
                c.syn_retrans += 1
                self.table.set_tuple(c, *endpoints(rec))
        elif k == Kind.RECV_RESET:
            c = self.table.get(rec.skaddr)
            if c is not None and c.recv_reset_ns is None:
                c.recv_reset_ns = rec.ts_ns
        elif k == Kind.SEND_RESET:
            c = self.table.get(rec.skaddr)
            if c is None or c.role == LISTENER:
                self.fact(rec)      # a listener's (or an unknown socket's): detect/listen.py
            elif c.send_reset_ns is None:
                c.send_reset_ns = rec.ts_ns
        elif k == Kind.SOCK_ERROR:
            self._sock_error(rec)
        else:
            self.fact(rec)

    def _lost(self, rec):
        self.stats.lost[rec.where] += rec.count
        self.stats.lost_total += rec.count
        # Any connection alive now may have lost a transition. Marked by epoch, not by walking
        # every connection: losses come in bursts, under load, when the table is fullest.
        self.loss_epoch += 1
        self.lost(rec)

    def _state(self, ev):
        """A STATE record: one transition, or several of one socket, oldest first (the kernel
        sends a socket's steps together; some may have been taken early already)."""
        laddr, lport, raddr, rport = endpoints(ev)
        early = ev.flags & EARLY
        conns = self.table.by_sk
        mx = self.stats.mx
        stepping = self.transitions
        c = conns.get(ev.skaddr)
        # A connection the table dropped (--max-conns): the steps it had are not taken again
        taken = self.table.tombs.pop(ev.skaddr, 0) if c is None and self.table.tombs else 0
        n = 0
        for ts, pid, old, new in iter_steps(ev):
            if c is None:
                if ts <= taken:
                    continue
            elif (ts <= c.scan_ts and c.closed_ns is None) or (early and ts <= c.since_ns):
                # Already taken early, or an early copy of steps already taken (a held socket
                # sent early as it moved on: both copies can arrive, in either order)
                continue
            n += 1
            cell = old << 4 | new
            mx[cell] += 1
            if cell in OPENING_CELLS:
                c = self._open(ev, ts, old, new, laddr, lport, raddr, rport)
            else:
                # A step of a generation: the one we know, or one first seen now.
                if c is None or (c.closed_ns is not None and old == CLOSE):
                    c = self._adopt(ev, old, new, laddr, lport, raddr, rport, ts)
                    if taken:
                        c.evicted = True
                elif c.state != old:
                    self.stats.gaps += 1
                    c.incomplete = True
                if lport != c.lport or laddr != c.laddr or (not c.rport and rport):
                    self.table.set_tuple(c, laddr, lport, raddr, rport)
                if ev.retrans > c.syn_retrans:
                    c.syn_retrans = ev.retrans
                if not c.owner_sure and cell in OWNER_CELLS:
                    c.pid, c.comm, c.owner_sure = ev.pid, COMM_TEXT[ev.comm], True
                if stepping:
                    self.step(c, ev, ts, old, new)
                self.advance(c, ev, ts, old, new)
            if early:
                c.scan_ts = ts
        if c is None:
            return
        self.stats.events += n - 1
        if ev.rst_ns and c.recv_reset_ns is None:
            c.recv_reset_ns = ev.rst_ns
        if ev.err and c.closed_ns is not None and not c.error:
            c.error = ev.err            # sk_err at SYN_SENT -> CLOSE (bpf/state.c: tt_close_err)

    def _open(self, ev, ts, old, new, laddr, lport, raddr, rport):
        """A step that starts a new generation at this socket address: connect(), a child
        socket, listen()."""
        if old == CLOSE and new == SYN_SENT:
            c = self.new(ev.skaddr, ev.family, ACTIVE, new, ts)
            c.pid, c.comm, c.owner_sure = ev.pid, COMM_TEXT[ev.comm], True
            c.raddr, c.rport, c.laddr = raddr, rport, laddr
            c.syn_retrans = ev.retrans
        elif old == LISTEN:
            c = self.new(ev.skaddr, ev.family, PASSIVE, new, ts)
            self.table.set_tuple(c, laddr, lport, raddr, rport)
            owner = self.table.accepted_by(ev.aux, ev.family, laddr, lport, ts)
            if owner:   # the listener's owner accepts it; the current task is a softirq bystander
                c.pid, c.comm = owner
        else:
            c = self.new(ev.skaddr, ev.family, LISTENER, new, ts)
            c.pid, c.comm, c.owner_sure = ev.pid, COMM_TEXT[ev.comm], True
            c.laddr, c.lport, c.netns = laddr, lport, ev.aux
            self.table.listening(c.netns, ev.family, laddr, lport, (c.pid, c.comm))
        if self.transitions:
            self.step(c, ev, ts, old, new)
        return c

    def _adopt(self, ev, oldstate, newstate, laddr, lport, raddr, rport, ts):
        """First event of a socket we have no generation for: a seeded one, or one first seen
        mid-life (partial)."""
        c, displaced = self.table.claim(ev.skaddr, (ev.family, laddr, lport, raddr, rport))
        if displaced is not None:
            self.gone(displaced)
        if c is not None:
            if c.state not in (oldstate, newstate):
                c.incomplete = True
            c.state = oldstate        # seeded state may be before or after this transition
            self.gone(c)              # back by advance() if it stays half-closed
            return c
        if oldstate == LISTEN:
            # A listener closing that we never saw open (it existed before start): the task
            # closing it is its owner (LISTEN -> CLOSE runs in close() or the process's exit)
            c = self.new(ev.skaddr, ev.family, LISTENER, oldstate, ts, partial=True)
            c.pid, c.comm = ev.pid, COMM_TEXT[ev.comm]
            c.laddr, c.lport, c.netns = laddr, lport, ev.aux
            return c
        role = PASSIVE if oldstate == S.SYN_RECV else (ACTIVE if oldstate == S.SYN_SENT else None)
        return self.new(ev.skaddr, ev.family, role, oldstate, ts, partial=True)

    def advance(self, c, ev, ts, old, new):
        """c makes the transition old -> new at ts (old is c.state unless there was a gap)."""
        if old in HALF_CLOSED or c.stuck_state is not None:
            self.moved(c, ts, new)
        c.state = new
        c.since_ns = ts
        c.path = (c.path << 4) | new
        if new in HALF_CLOSED:
            self.resting(c)
        if new == ESTABLISHED:
            c.established_ns = ts
            if c.tkey is not None:
                self.table.unfile(c)
            if c.opened_ns is not None:
                self.established(c, ts, old)
        elif old == ESTABLISHED and c.first_fin is None:
            if new == FIN_WAIT1:
                c.first_fin = "local"
            elif new == CLOSE_WAIT:
                c.first_fin = "remote"
        if new == CLOSE:
            c.closed_ns = ts
            if old == SYN_SENT and c.pid is None:
                c.pid, c.comm = ev.pid, COMM_TEXT[ev.comm]
            self.closing(c, ts, old)
            self.pending.append(c)

    def _sock_error(self, ev):
        if ev.err == 0:
            return          # the kernel also reports "no error" when a dead socket is torn down
        laddr, lport, raddr, rport = endpoints(ev)
        c = self.table.by_tuple.get((ev.family, laddr, lport, raddr, rport))
        if c is None:
            # ICMP errors can arrive before we learnt the local port: match the one connect to
            # that destination still waiting in SYN_SENT with the port unknown.
            for cand in reversed(self.table.by_sk.values()):
                if cand.state == S.SYN_SENT and cand.lport == 0 and cand.rport == rport \
                        and cand.raddr == raddr and cand.family == ev.family:
                    c = cand
                    self.table.set_tuple(c, laddr, lport, raddr, rport)
                    break
        if c is None:
            self.stats.unmatched_errors += 1
            key = (ev.family, laddr, lport, raddr, rport)
            self.early_errors[key] = (ev.ts_ns, ev.err)
            if len(self.early_errors) > 4096:
                self.early_errors.popitem(last=False)
            return
        if not c.error:
            c.error = ev.err

    # -- time-driven work --------------------------------------------------------------------
    def tick(self, now_ns):
        """Called from the poll loop with the time up to which all events have been processed."""
        if now_ns > self.now_ns:
            self.now_ns = now_ns
        self._conclude_due(now_ns)
        self.clock(now_ns)

    def finish(self, now_ns=None):
        """End of input: conclude every closed connection (stuck ones are left as they are)."""
        now = max(now_ns or 0, self.now_ns)
        self._conclude_due(now + self.grace_ns + 1)

    def _conclude_due(self, now_ns):
        p = self.pending
        due = now_ns - self.grace_ns
        conclude = self._conclude
        while p and p[0].closed_ns < due:
            conclude(p.popleft())

    def _conclude(self, c):
        """c is over: the detectors conclude it (one of them, at most)."""
        self.gone(c)                # forget(c), without its call: this runs for every socket
        self.table.forget(c)
        if c.role == LISTENER:
            self.table.unlisten(c.netns, c.family, c.laddr, c.lport, (c.pid, c.comm),
                                c.opened_ns, c.closed_ns)
            return
        if c.established_ns is None and c.role == ACTIVE and not c.partial and not c.error \
                and self.early_errors:
            early = self.early_errors.pop(c.tuple_key(), None)
            if early is not None and c.opened_ns <= early[0] <= c.closed_ns:
                c.error = early[1]
                self.stats.unmatched_errors -= 1
        self.closed(c)
