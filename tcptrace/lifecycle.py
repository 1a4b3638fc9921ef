"""One state machine per connection, rebuilt from time-ordered kernel facts, producing findings.

Pure Python: no BCC, no root. Fed by the live session and by replay alike.

Identity: a socket address is reused as soon as a socket is freed, and the local port is still 0
at CLOSE -> SYN_SENT, so a connection is the pair (skaddr, generation): a new generation starts at
every CLOSE -> SYN_SENT, LISTEN -> SYN_RECV or CLOSE -> LISTEN, and ends at -> CLOSE.

What the kernel tells us, and in which order (checked in tests/kernel):
  refused:    tcp_receive_reset, SYN_SENT -> CLOSE, inet_sk_error_report(ECONNREFUSED)
  timeout:    tcp_retransmit_skb(SYN_SENT) x N, SYN_SENT -> CLOSE, error_report(ETIMEDOUT)
  unreachable: error_report(EHOSTUNREACH), SYN_SENT -> CLOSE          (tcp_v4_err, ICMP)
  linger-0:   ESTABLISHED -> CLOSE, tcp_send_reset                      (tcp_disconnect)
Facts can follow the CLOSE they explain, so a closed connection waits `grace_ns` before its
finding is made. The error report carries no socket pointer: it is matched by 4-tuple.

Honesty rules: a connection first seen mid-life is `partial` (its durations are unknown); one alive
when events were lost is `incomplete` (it may have missed a transition). Neither yields a `stuck`
unless the kernel's own socket table confirms it (the `confirm` hook), and their findings say so.
"""
import collections
import errno
import struct

from tcptrace import states as S
from tcptrace.events import (Kind, Lost, F_KPROBE, EARLY, MAX_STEPS, STATES_AT, STEP_BYTES,
                             addr_str, endpoints, intern_comm, iter_steps, memo)
from tcptrace.findings import Accept, Close, Connect, Ends, Finding, Transition

ACTIVE, PASSIVE, LISTENER = "active", "passive", "listener"
# The hot path reads these per step: globals, not module attributes.
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1 = S.ESTABLISHED, S.SYN_SENT, S.SYN_RECV, S.FIN_WAIT1
CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN = S.CLOSE, S.CLOSE_WAIT, S.LAST_ACK, S.LISTEN
HALF_CLOSED = S.HALF_CLOSED
STATE = Kind.STATE

UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
# Errors seen from connect() before the kernel sent a SYN, and what to call them.
PRE_SYN_REASONS = {errno.ENETUNREACH: "unreachable", errno.EHOSTUNREACH: "unreachable",
                   errno.EACCES: "denied", errno.EPERM: "denied",
                   errno.EADDRNOTAVAIL: "no_local_address", errno.ECONNREFUSED: "refused"}
# What connect() answers when called again on a socket whose attempt is under way or over (event
# loops do this to learn a non-blocking connect's outcome; __inet_stream_connect answers before
# any new SYN): EALREADY, success as EISCONN, or the earlier attempt's error. The last four come
# only from the network, so they always mean such a re-report; the transitions already tell it.
NOT_AN_ATTEMPT = {errno.EALREADY, errno.EISCONN, errno.EINPROGRESS, errno.ECONNREFUSED,
                  errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED}
REREPORT_NS = 10_000_000_000


class Conn:
    __slots__ = ("id", "skaddr", "family", "laddr", "lport", "raddr", "rport", "role",
                 "opened_ns", "established_ns", "state", "since_ns", "path", "pid", "comm",
                 "owner_sure", "syn_retrans", "recv_reset_ns", "send_reset_ns", "error",
                 "first_fin", "partial", "incomplete", "preexisting", "stuck_state", "closed_ns",
                 "fd", "epoch", "scan_ts", "tkey", "ends")

    def __init__(self, cid, skaddr, family, role, state, ts_ns, partial=False, epoch=0):
        self.id = cid
        self.epoch = epoch          # the tracker's loss epoch when this generation began
        self.skaddr = skaddr
        self.family = family
        self.laddr = self.raddr = None
        self.lport = self.rport = 0
        self.role = role
        self.opened_ns = None if partial else ts_ns
        self.established_ns = None
        self.state = state
        self.since_ns = ts_ns
        self.path = state           # states so far, 4 bits each, newest lowest (see path_names)
        self.pid = None
        self.comm = None
        self.owner_sure = False
        self.syn_retrans = 0
        self.recv_reset_ns = None
        self.send_reset_ns = None
        self.error = 0
        self.first_fin = None
        self.partial = partial
        self.incomplete = False
        self.preexisting = False
        self.stuck_state = None
        self.closed_ns = None
        self.fd = None
        self.scan_ts = 0            # newest step taken from a scan of the kernel's `socks` map
        self.tkey = None            # the key it is filed under in Tracker.by_tuple, if it is
        self.ends = None            # with --transitions: the Ends its latest transition showed

    def tuple_key(self):
        return (self.family, self.laddr, self.lport, self.raddr, self.rport)


def path_states(path):
    """The packed path, oldest state first. TCP states are 1..12, so a zero nibble ends it."""
    out = []
    while path:
        out.append(path & 0xF)
        path >>= 4
    out.reverse()
    return out


# A packed path -> its state names. Thousands of connections share a handful of paths; the list
# is shared between their findings and never modified.
_path_names = memo(lambda path: [S.name(s) for s in path_states(path)], limit=10_000)


class Stats:
    def __init__(self):
        self.events = 0
        self.mx = [0] * 256                         # old << 4 | new -> transitions
        self.lost = collections.Counter()          # where -> events
        self.lost_total = 0
        self.evicted = 0
        self.partial = 0
        self.gaps = 0                               # transitions whose old state we did not expect
        self.unmatched_errors = 0

    @property
    def matrix(self):
        """(old, new) -> transitions seen."""
        return collections.Counter({(i >> 4, i & 15): n for i, n in enumerate(self.mx) if n})


class Tracker:
    """Feed `process(record)` with time-ordered Events/Losts and `tick(now_ns)` with the clock;
    findings accumulate in `out` (the caller takes them)."""

    def __init__(self, stuck_after_ns=30_000_000_000, grace_ns=10_000_000, max_conns=262_144,
                 transitions=False, confirm=None, resolve_owner=None):
        self.stuck_after_ns = stuck_after_ns
        self.grace_ns = grace_ns
        self.max_conns = max_conns
        self.transitions = transitions
        self.confirm = confirm                # conn -> bool|None: is it in conn.state in the kernel now?
        self.resolve_owner = resolve_owner    # [conns] -> {conn.id: (pid, comm, fd)}
        self.conns = {}                       # skaddr -> Conn, oldest generation first
        # (family, laddr, lport, raddr, rport) -> Conn, only while a handshake is unresolved:
        # error reports (no skaddr) matter only for connects that fail. Kept small on purpose.
        self.by_tuple = {}
        self.seeded = {}                      # tuple -> Conn seeded from /proc, no skaddr yet
        self.listeners = {}                   # (family, lport) -> (pid, comm)
        # (pid, family, raddr, rport) -> ts of an attempt that died in SYN_SENT: an unreachable
        # error it may still re-report through connect(), told from a route failure before a SYN
        self.failed_syn = collections.OrderedDict()
        # tuple -> (ts, errno) of error reports no connection matched yet: an ICMP error can come
        # before the SYN_SENT it explains has reached us (the kernel sends a socket's pending
        # steps together, at its CLOSE)
        self.early_errors = collections.OrderedDict()
        self.halfclosed = {}                  # id -> Conn now in a HALF_CLOSED state
        self.pending = collections.deque()    # closed Conns waiting out grace_ns
        self.out = []
        self.stats = Stats()
        self._next_id = 1
        self.loss_epoch = 0                   # bumped by every loss; see incomplete()
        self.now_ns = 0
        self._next_stuck_ns = 0
        self.stuck_check_ns = min(250_000_000, stuck_after_ns // 4 or 1)

    # -- construction ------------------------------------------------------------------------
    def _new(self, skaddr, family, role, state, ts_ns, partial=False):
        old = self.conns.pop(skaddr, None)
        if old is not None and old.closed_ns is None:
            # A new generation began without the old one's CLOSE: we missed it (a loss). The
            # old connection is over, so an established one is concluded now, marked incomplete,
            # with what we know of it, rather than vanish from the output.
            self.stats.gaps += 1
            self._forget(old)
            if old.established_ns is not None and old.role != LISTENER:
                old.incomplete = True
                old.closed_ns = ts_ns
                self._finalize(old)
        c = Conn(self._next_id, skaddr, family, role, state, ts_ns, partial, self.loss_epoch)
        self._next_id += 1
        if partial:
            self.stats.partial += 1
        self.conns[skaddr] = c
        if len(self.conns) > self.max_conns:
            victim = self.conns.pop(next(iter(self.conns)))
            self.stats.evicted += 1
            self._forget(victim)
        return c

    def _forget(self, c):
        self.halfclosed.pop(c.id, None)
        if c.tkey is not None:
            self._unfile(c)
        if self.conns.get(c.skaddr) is c:
            del self.conns[c.skaddr]

    def _unfile(self, c):
        if self.by_tuple.get(c.tkey) is c:
            del self.by_tuple[c.tkey]
        c.tkey = None

    def _set_tuple(self, c, laddr, lport, raddr, rport):
        if lport and (c.lport != lport or c.laddr != laddr):
            if c.tkey is not None:
                self._unfile(c)
            c.laddr, c.lport, c.raddr, c.rport = laddr, lport, raddr, rport
            if c.established_ns is None:
                c.tkey = c.tuple_key()
                self.by_tuple[c.tkey] = c
        elif not c.rport and rport:
            c.raddr, c.rport = raddr, rport
        if c.laddr is None:
            c.laddr = laddr

    def seed(self, family, laddr, lport, raddr, rport, state, now_ns, owner=None):
        """A socket that existed before tracing started (from /proc/net/tcp). Adopted by the first
        event whose 4-tuple matches; its start is unknown."""
        if state == S.LISTEN:
            if owner:
                self.listeners[(family, lport)] = owner[:2]
            return None
        c = Conn(self._next_id, 0, family, None, state, now_ns, partial=True, epoch=self.loss_epoch)
        self._next_id += 1
        c.preexisting = True
        c.laddr, c.lport, c.raddr, c.rport = laddr, lport, raddr, rport
        if owner:
            c.pid, c.comm, c.fd = owner
            c.owner_sure = True
        self.seeded[c.tuple_key()] = c
        if state in S.HALF_CLOSED:
            self.halfclosed[c.id] = c
        return c

    # -- input -------------------------------------------------------------------------------
    def process(self, rec):
        ts = rec.ts_ns
        if self.pending and ts > self.pending[0].closed_ns + self.grace_ns:
            self._finalize_due(ts)
        if ts > self.now_ns:
            self.now_ns = ts
        if type(rec) is Lost:
            self._lost(rec)
            return
        self.stats.events += 1
        k = rec.kind
        if k == STATE:
            # Whole records of the common shapes (see _FAST, _REGIONS), before any per-step
            # work: this is most of the input.
            n = rec.nsteps
            if 2 <= n <= 5 and not rec.flags & EARLY:
                s = rec.steps
                fast = _REGIONS.get(s[len(s) // STEP_BYTES * STATES_AT:])
                if fast is not None and fast[0] == n and fast[1](self, rec, s):
                    return
            self._state(rec)
        elif k == Kind.RETRANS:
            c = self.conns.get(rec.skaddr)
            if c is not None and c.closed_ns is None:
                c.syn_retrans += 1
                self._set_tuple(c, *endpoints(rec))
        elif k == Kind.RECV_RESET:
            c = self.conns.get(rec.skaddr)
            if c is not None and c.recv_reset_ns is None:
                c.recv_reset_ns = rec.ts_ns
        elif k == Kind.SEND_RESET:
            c = self.conns.get(rec.skaddr)
            if c is not None and c.send_reset_ns is None:
                c.send_reset_ns = rec.ts_ns
        elif k == Kind.SOCK_ERROR:
            self._sock_error(rec)
        elif k == Kind.CONNECT_RET:
            self._connect_ret(rec)

    def _lost(self, rec):
        self.stats.lost[rec.where] += rec.count
        self.stats.lost_total += rec.count
        # Any connection alive now may have lost a transition: none of them may yield a finding
        # that rests on the absence of an event (stuck) without the kernel confirming it. Marked
        # by epoch, not by walking every connection: losses come in bursts, under load, when
        # the tracker holds the most connections.
        self.loss_epoch += 1
        self.out.append(Finding("lost", rec.ts_ns, count=rec.count, where=rec.where,
                                lost_total=self.stats.lost_total))

    def _state(self, ev):
        """A STATE record: one transition, or several of one socket, oldest first (the kernel
        sends a socket's steps together; a scan of its map can deliver some of them early)."""
        laddr, lport, raddr, rport = endpoints(ev)
        scan = ev.flags & EARLY
        sk = ev.skaddr
        conns = self.conns
        mx = self.stats.mx
        transitions = self.transitions
        c = conns.get(sk)
        n = 0
        for ts, pid, old, new in iter_steps(ev):
            if c is not None and ((ts <= c.scan_ts and c.closed_ns is None)
                                  or (scan and ts <= c.since_ns)):
                # Already taken early, or an early copy of steps already taken (a held socket
                # sent early as it moved on: both copies can arrive, in either order)
                continue
            n += 1
            mx[old << 4 | new] += 1
            if (old == CLOSE and (new == SYN_SENT or new == LISTEN)) \
                    or (old == LISTEN and new == SYN_RECV):
                c = self._open(ev, ts, old, new, laddr, lport, raddr, rport)
            else:
                # A step of a generation: the one we know, or one first seen now.
                if c is None or (c.closed_ns is not None and old == CLOSE):
                    c = self._adopt(ev, old, new, laddr, lport, raddr, rport, ts)
                elif c.state != old:
                    self.stats.gaps += 1
                    c.incomplete = True
                if lport != c.lport or laddr != c.laddr or (not c.rport and rport):
                    self._set_tuple(c, laddr, lport, raddr, rport)
                if ev.retrans > c.syn_retrans:
                    c.syn_retrans = ev.retrans
                # Transitions a process makes itself (close(), shutdown()) name the owner;
                # the ones the network causes run in softirq on whatever task was interrupted.
                if not c.owner_sure and ((old == ESTABLISHED and new == FIN_WAIT1)
                                         or (old == CLOSE_WAIT and new == LAST_ACK)):
                    c.pid, c.comm, c.owner_sure = ev.pid, intern_comm(ev.comm), True
                if transitions:
                    self._transition(c, ev, ts, old, new)
                self._advance(c, ev, ts, old, new)
            if scan:
                c.scan_ts = ts
        if c is None:
            return
        self.stats.events += n - 1
        if ev.rst_ns and c.recv_reset_ns is None:
            c.recv_reset_ns = ev.rst_ns

    def _open(self, ev, ts, old, new, laddr, lport, raddr, rport):
        """A step that starts a new generation at this socket address: connect(), a child
        socket, listen()."""
        if old == CLOSE and new == SYN_SENT:
            c = self._new(ev.skaddr, ev.family, ACTIVE, new, ts)
            c.pid, c.comm, c.owner_sure = ev.pid, intern_comm(ev.comm), True   # connect(): process context
            c.raddr, c.rport, c.laddr = raddr, rport, laddr
            c.syn_retrans = ev.retrans
        elif old == LISTEN:
            c = self._new(ev.skaddr, ev.family, PASSIVE, new, ts)
            self._set_tuple(c, laddr, lport, raddr, rport)
            owner = self.listeners.get((ev.family, lport))
            if owner:   # the listener's owner accepts it; the current task is a softirq bystander
                c.pid, c.comm = owner
        else:
            c = self._new(ev.skaddr, ev.family, LISTENER, new, ts)
            c.pid, c.comm, c.owner_sure = ev.pid, intern_comm(ev.comm), True   # listen(): process context
            c.laddr, c.lport = laddr, lport
            self.listeners[(ev.family, lport)] = (c.pid, c.comm)
        if self.transitions:
            self._transition(c, ev, ts, old, new)
        return c

    def _transition(self, c, ev, ts, old, new):
        self.out.append(Transition(ts, _ends(c, ev), old << 8 | new))

    def _adopt(self, ev, oldstate, newstate, laddr, lport, raddr, rport, ts):
        """First event of a socket we have no generation for."""
        key = (ev.family, laddr, lport, raddr, rport)
        c = self.seeded.pop(key, None)
        if c is not None:
            c.skaddr = ev.skaddr
            old = self.conns.pop(ev.skaddr, None)
            if old is not None:
                self._forget(old)
            self.conns[ev.skaddr] = c
            if c.state not in (oldstate, newstate):
                c.incomplete = True
            c.state = oldstate        # seeded state may be before or after this transition
            self.halfclosed.pop(c.id, None)           # back by _advance if it stays half-closed
            return c
        role = PASSIVE if oldstate == S.SYN_RECV else (ACTIVE if oldstate == S.SYN_SENT else None)
        return self._new(ev.skaddr, ev.family, role, oldstate, ts, partial=True)

    def _advance(self, c, ev, ts, old, new):
        if c.stuck_state is not None and c.stuck_state != new:
            self._finding(c, "unstuck", ts, state=S.name(c.stuck_state),
                          duration_ns=ts - c.since_ns, newstate=S.name(new))
            c.stuck_state = None
        if old in HALF_CLOSED:
            self.halfclosed.pop(c.id, None)
        c.state = new
        c.since_ns = ts
        c.path = (c.path << 4) | new
        if new in HALF_CLOSED:
            self.halfclosed[c.id] = c
        if new == ESTABLISHED:
            c.established_ns = ts
            if c.tkey is not None:
                self._unfile(c)
            if c.opened_ns is None:
                return
            if old == SYN_SENT:
                self._conclude(Connect, c, ts, ts - c.opened_ns, c.syn_retrans)
            elif old == SYN_RECV:
                # No handshake time: the kernel creates the child socket (LISTEN -> SYN_RECV) only
                # when the final ACK arrives, microseconds before ESTABLISHED; the SYN itself
                # lives in a request sock that no tracepoint reports.
                self._conclude(Accept, c, ts)
        elif old == ESTABLISHED and c.first_fin is None:
            if new == FIN_WAIT1:
                c.first_fin = "local"
            elif new == CLOSE_WAIT:
                c.first_fin = "remote"
        if new == CLOSE:
            c.closed_ns = ts
            if old == SYN_SENT and c.pid is None:
                c.pid, c.comm = ev.pid, intern_comm(ev.comm)
            if old == SYN_SENT:
                self.failed_syn[(c.pid, c.family, c.raddr, c.rport)] = ts
                self.failed_syn.move_to_end((c.pid, c.family, c.raddr, c.rport))
                if len(self.failed_syn) > 4096:
                    self.failed_syn.popitem(last=False)
            self.pending.append(c)

    def _sock_error(self, ev):
        if ev.err == 0:
            return          # the kernel also reports "no error" when a dead socket is torn down
        laddr, lport, raddr, rport = endpoints(ev)
        c = self.by_tuple.get((ev.family, laddr, lport, raddr, rport))
        if c is None:
            # ICMP errors can arrive before we learnt the local port: match the one connect to
            # that destination still waiting in SYN_SENT with the port unknown.
            for cand in reversed(self.conns.values()):
                if cand.state == S.SYN_SENT and cand.lport == 0 and cand.rport == rport \
                        and cand.raddr == raddr and cand.family == ev.family:
                    c = cand
                    self._set_tuple(c, laddr, lport, raddr, rport)
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

    def _connect_ret(self, ev):
        err = -ev.err if ev.err < 0 else ev.err
        daddr = addr_str(ev.family, ev.daddr)
        if err in NOT_AN_ATTEMPT:
            return
        died = self.failed_syn.pop((ev.pid, ev.family, daddr, ev.dport), None)
        if died is not None and err in UNREACHABLE and ev.ts_ns - died < REREPORT_NS:
            return
        reason = PRE_SYN_REASONS.get(err, "error")
        kind = "refused" if reason == "refused" else "failed"
        self.out.append(Finding(kind, ev.ts_ns, ev.pid, intern_comm(ev.comm), ev.family, None, None,
                                daddr, ev.dport, reason=reason, errno=S.errno_name(err),
                                syn_retransmits=0, before_syn=True,
                                source="kprobe" if ev.flags & F_KPROBE else "syscall"))

    # -- time-driven work --------------------------------------------------------------------
    def tick(self, now_ns):
        """Called from the poll loop with the time up to which all events have been processed."""
        if now_ns > self.now_ns:
            self.now_ns = now_ns
        self._finalize_due(now_ns)
        if now_ns >= self._next_stuck_ns:
            self._next_stuck_ns = now_ns + self.stuck_check_ns
            self._check_stuck(now_ns)

    def finish(self, now_ns=None):
        """End of input: make every pending finding (stuck sockets are left as they are)."""
        now = max(now_ns or 0, self.now_ns)
        self._finalize_due(now + self.grace_ns + 1)

    def _finalize_due(self, now_ns):
        p = self.pending
        while p and p[0].closed_ns + self.grace_ns < now_ns:
            self._finalize(p.popleft())

    def _check_stuck(self, now_ns):
        due = [c for c in self.halfclosed.values()
               if c.stuck_state is None and now_ns - c.since_ns >= self.stuck_after_ns]
        if not due:
            return
        confirmed = []
        for c in due:
            ok = self.confirm(c) if self.confirm else None
            gaps = self.incomplete(c)
            if ok is False or (ok is None and (gaps or (c.partial and not c.preexisting))):
                # The kernel says it is gone (we missed its transitions), or nobody can confirm a
                # connection we know to have gaps: no report rather than a false one.
                if ok is False and (gaps or c.partial):
                    self.halfclosed.pop(c.id, None)
                continue
            confirmed.append(c)
        owners = self.resolve_owner(confirmed) if (self.resolve_owner and confirmed) else {}
        for c in confirmed:
            c.stuck_state = c.state
            holder = (c.pid, c.comm, c.fd)
            o = owners.get(c.id)
            if o is not None:
                if o[0] is not None:          # a process holds it now
                    c.pid, c.comm, c.fd = holder = o
                    c.owner_sure = True
                else:
                    # Orphaned: its process closed it and the kernel finishes the close alone.
                    # Nobody holds it now, but the pid that closed it stays for later findings.
                    holder = (None, None, None)
            f = self._finding(c, "stuck", now_ns, state=S.name(c.state),
                              age_ns=now_ns - c.since_ns, fd=holder[2],
                              age_is_lower_bound=c.preexisting and c.path == c.state,
                              blame=S.HALF_CLOSED[c.state])
            f.pid, f.comm = holder[0], holder[1]

    def stuck_now(self):
        """Connections currently reported stuck, oldest first."""
        return sorted((c for c in self.halfclosed.values() if c.stuck_state is not None),
                      key=lambda c: c.since_ns)

    # -- conclusions -------------------------------------------------------------------------
    def _finalize(self, c):
        self._forget(c)
        ts = c.closed_ns
        if c.role == LISTENER:
            if self.listeners.get((c.family, c.lport)) == (c.pid, c.comm):
                del self.listeners[(c.family, c.lport)]
            return
        if c.established_ns is None and c.role == ACTIVE and not c.partial:
            if not c.error and self.early_errors:
                early = self.early_errors.pop(c.tuple_key(), None)
                if early is not None and c.opened_ns <= early[0] <= ts:
                    c.error = early[1]
                    self.stats.unmatched_errors -= 1
            err = c.error
            if c.recv_reset_ns is not None or err == errno.ECONNREFUSED:
                self._finding(c, "refused", ts, reason="refused", errno="ECONNREFUSED",
                              syn_retransmits=c.syn_retrans, duration_ns=ts - c.opened_ns,
                              path=_path_names(c.path))
                return
            if err == errno.ETIMEDOUT:
                reason = "timeout"
            elif err in UNREACHABLE:
                reason = "unreachable"
            elif err:
                reason = "error"
            else:
                reason = "cancelled"      # close() or exit while in SYN_SENT: nothing from the net
            self._finding(c, "failed", ts, reason=reason,
                          errno=S.errno_name(err) if err else None,
                          syn_retransmits=c.syn_retrans, duration_ns=ts - c.opened_ns,
                          path=_path_names(c.path))
            return
        if c.established_ns is None and not c.partial:
            return      # a passive open that never completed: the listener's business
        start = c.established_ns if c.established_ns is not None else c.opened_ns
        duration = ts - start if start is not None else None
        path = _path_names(c.path)
        if c.recv_reset_ns is not None or c.send_reset_ns is not None:
            if c.recv_reset_ns is not None and (c.send_reset_ns is None
                                                or c.recv_reset_ns <= c.send_reset_ns):
                by = "remote"
            else:
                by = "local"
            self._finding(c, "reset", ts, reset_by=by, duration_ns=duration,
                          state=path[-2] if len(path) > 1 else None, path=path)
            return
        self._conclude(Close, c, ts, duration, c.first_fin, path)

    def incomplete(self, c):
        """Was c alive across a loss, or did it show a gap?"""
        return c.incomplete or c.epoch != self.loss_epoch

    def _finding(self, c, type_, ts, **extra):
        """Make a finding about c and emit it (it is returned for the caller to adjust)."""
        if c.partial:
            extra["partial"] = True
        if self.incomplete(c):
            extra["incomplete"] = True
        extra["role"] = c.role
        f = Finding.of(type_, ts, c.pid, c.comm, c.family, c.laddr, c.lport or None, c.raddr,
                       c.rport or None, extra)
        self.out.append(f)
        return f

    def _conclude(self, cls, c, ts, a=None, b=None, d=None):
        """As _finding, for the connect, accept and close findings (findings.Conclusion): a, b, d
        are the type's own extras in order; partial, incomplete and role as _finding adds them."""
        self.out.append(cls(ts, c.pid, c.comm, c.family, c.laddr, c.lport or None, c.raddr,
                            c.rport or None, c.partial,
                            c.incomplete or c.epoch != self.loss_epoch,   # self.incomplete(c)
                            c.role, a, b, d))

    def take(self):
        out, self.out = self.out, []
        return out


def _ends(c, ev):
    """The Ends c's transition shows now: the last one's, unless the owner or the tuple has
    changed since. pid/comm: the owner as known at this step, not the task current in the
    kernel: most transitions run in softirq, where that is a bystander."""
    e = c.ends
    if e is None or e.pid != c.pid or e.comm != c.comm or e.lport != c.lport \
            or e.laddr != c.laddr or e.raddr != c.raddr or e.rport != c.rport:
        e = c.ends = Ends(c.pid, c.comm, ev.family, c.laddr, c.lport, c.raddr, c.rport,
                          ev.skaddr)
    return e


# -- whole-record fast paths ---------------------------------------------------------------------
# The four records that make up almost every connection, handled without the per-step machinery.
# Each does exactly what the steps one by one would (tests/unit/test_grouped.py compares the two
# on every scenario) and returns False, leaving it to them, whenever anything is unusual.

def _fast_open(active):
    """CLOSE -> SYN_SENT -> ESTABLISHED (a connect() that completed) or LISTEN -> SYN_RECV ->
    ESTABLISHED (an accepted child socket). Returns the part that does the work, given the two
    steps' times, as a function returning the new Conn (or None: left to the steps)."""
    first = SYN_SENT if active else SYN_RECV
    start = CLOSE if active else LISTEN
    opening = start << 4 | first
    opening_k, established_k = start << 8 | first, first << 8 | ESTABLISHED

    def open_(tr, ev, t0, t1):
        c = tr.conns.get(ev.skaddr)
        if c is not None and c.closed_ns is None:
            return None
        laddr, lport, raddr, rport = endpoints(ev)
        if active and not lport:
            return None
        c = tr._new(ev.skaddr, ev.family, ACTIVE if active else PASSIVE, first, t0)
        c.laddr, c.lport, c.raddr, c.rport = laddr, lport, raddr, rport
        if active:      # connect(): the record's task, in process context
            c.pid, c.comm, c.owner_sure = ev.pid, intern_comm(ev.comm), True
        else:           # the listener's owner accepts it
            owner = tr.listeners.get((ev.family, lport))
            if owner:
                c.pid, c.comm = owner
        if tr.transitions:
            # As the steps would show them: connect()'s step before the kernel chose a port
            out = tr.out
            e = c.ends = Ends(c.pid, c.comm, ev.family, laddr, lport, raddr, rport, ev.skaddr)
            out.append(Transition(t0, Ends(c.pid, c.comm, ev.family, laddr, 0, raddr, rport,
                                           ev.skaddr) if active else e, opening_k))
            out.append(Transition(t1, e, established_k))
        c.syn_retrans = ev.retrans
        c.state, c.since_ns, c.path, c.established_ns = ESTABLISHED, t1, first << 4 | ESTABLISHED, t1
        mx = tr.stats.mx
        mx[opening] += 1
        mx[first << 4 | ESTABLISHED] += 1
        tr.stats.events += 1
        if active:
            tr._conclude(Connect, c, t1, t1 - t0, c.syn_retrans)
        else:
            tr._conclude(Accept, c, t1)
        return c
    return open_


def _close_steps(states):
    """The (old, new) steps of a close from ESTABLISHED through these states."""
    return tuple(zip((ESTABLISHED,) + states[:-1], states))


def _fast_close(first_fin, states):
    """ESTABLISHED -> ... -> CLOSE in three steps, one of which a process makes itself (close()
    or shutdown()): the record's task names the owner when it is not known yet. Returns the part
    that does the work, given the connection and the three steps' times."""
    steps = _close_steps(states)
    m0, m1, m2 = (o << 4 | n for o, n in steps)
    pairs = tuple(o << 8 | n for o, n in steps)
    owner_step = 0 if first_fin == "local" else 1     # close() / shutdown(), or close() after
                                                       # the peer's FIN (CLOSE_WAIT -> LAST_ACK)
    path_add = states[0] << 8 | states[1] << 4 | states[2]

    def close(tr, ev, c, ts):
        if tr.transitions:
            # Each step as the steps would show it, with the owner known at that step: the
            # process's own step names it (the first locally, the second after the peer's FIN).
            out = tr.out
            e = _ends(c, ev)
            for i, k in enumerate(pairs):
                if i == owner_step and not c.owner_sure:
                    c.pid, c.comm, c.owner_sure = ev.pid, intern_comm(ev.comm), True
                    e = _ends(c, ev)
                out.append(Transition(ts[i], e, k))
        elif not c.owner_sure:
            c.pid, c.comm, c.owner_sure = ev.pid, intern_comm(ev.comm), True
        if c.first_fin is None:
            c.first_fin = first_fin
        t = ts[2]
        c.state, c.since_ns, c.closed_ns = CLOSE, t, t
        c.path = c.path << 12 | path_add
        mx = tr.stats.mx
        mx[m0] += 1
        mx[m1] += 1
        mx[m2] += 1
        tr.stats.events += 2
        if ev.rst_ns and c.recv_reset_ns is None:
            c.recv_reset_ns = ev.rst_ns
        tr.pending.append(c)
    return close


def _closable(tr, ev):
    """The open connection a close record continues, if the fast path may take it."""
    c = tr.conns.get(ev.skaddr)
    if c is None or c.state != ESTABLISHED or c.closed_ns is not None \
            or c.stuck_state is not None or c.scan_ts:
        return None
    laddr, lport, raddr, rport = endpoints(ev)
    if lport != c.lport or laddr != c.laddr or raddr != c.raddr or rport != c.rport:
        return None
    return c


def _opening(active):
    open_ = _fast_open(active)

    def record(tr, ev, s):
        c = open_(tr, ev, *_TS2(s))
        if c is None:
            return False
        if ev.rst_ns:
            c.recv_reset_ns = ev.rst_ns
        return True
    return record


def _closing(first_fin, states):
    close = _fast_close(first_fin, states)

    def record(tr, ev, s):
        c = _closable(tr, ev)
        if c is None:
            return False
        close(tr, ev, c, _TS3(s))
        return True
    return record


def _whole(active, first_fin, states):
    """A connection's whole life in one record: the kernel holds a socket's opening steps
    briefly, and sends them with its close when that comes soon enough (bpf/tcptrace.c)."""
    open_ = _fast_open(active)
    close = _fast_close(first_fin, states)

    def record(tr, ev, s):
        t = _TS5(s)
        c = open_(tr, ev, t[0], t[1])
        if c is None:
            return False
        # Each part counts its steps but the one process() counts per record: one record here
        tr.stats.events += 1
        close(tr, ev, c, t[2:])
        return True
    return record


def _key(*pairs):
    """A shape: the steps' old states, then their new states, as in Event.steps."""
    return bytes([o for o, _ in pairs] + [n for _, n in pairs])


_TS2 = struct.Struct("<2Q").unpack_from     # the first two steps' times
_TS3 = struct.Struct("<3Q").unpack_from     # the first three
_TS5 = struct.Struct("<5Q").unpack_from     # the first five

_CONNECT = ((CLOSE, SYN_SENT), (SYN_SENT, ESTABLISHED))
_ACCEPT = ((LISTEN, SYN_RECV), (SYN_RECV, ESTABLISHED))
_LOCAL = ("local", (FIN_WAIT1, S.FIN_WAIT2, CLOSE))
_REMOTE = ("remote", (CLOSE_WAIT, LAST_ACK, CLOSE))


_FAST = {
    _key(*_CONNECT): _opening(active=True),
    _key(*_ACCEPT): _opening(active=False),
    _key(*_close_steps(_LOCAL[1])): _closing(*_LOCAL),
    _key(*_close_steps(_REMOTE[1])): _closing(*_REMOTE),
}
for _active, _open_steps in ((True, _CONNECT), (False, _ACCEPT)):
    for _fin, _states in (_LOCAL, _REMOTE):
        _FAST[_key(*_open_steps, *_close_steps(_states))] = _whole(_active, _fin, _states)


# What process() looks up: a record's state arrays (Event.steps from STATES_AT * M: M old states,
# M new states, unused ones zero) -> (steps, fast path), for every M a record may have: MAX_STEPS
# from the kernel, fewer in recordings and hand-built streams. One slice of the record's bytes is
# the whole key. A record whose nsteps disagrees with the arrays is left to the steps.
def _regions(fast):
    out = {}
    for shape, fn in fast.items():
        n = len(shape) // 2
        for m in range(n, 2 * MAX_STEPS + 1):
            pad = bytes(m - n)
            out[shape[:n] + pad + shape[n:] + pad] = (n, fn)
    return out


_REGIONS = _regions(_FAST)
