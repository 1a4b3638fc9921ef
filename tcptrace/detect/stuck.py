"""stuck and unstuck: sockets lingering in a half-closed state, reported while they linger.

A stuck report rests on the *absence* of events, so for a connection that may have missed one
(partial, or alive across a loss) it is made only when the kernel's own socket table confirms
the state (`confirm`); in replay, with no kernel to ask, it is then not made. The owner is
looked up when it is reported (`resolve_owner`): the process holding the socket now.
"""
from tcptrace import states as S
from tcptrace.detect.base import Detector


class Stuck(Detector):
    def __init__(self, tracker, stuck_after_ns, confirm=None, resolve_owner=None):
        super().__init__(tracker)
        self.stuck_after_ns = stuck_after_ns
        self.confirm = confirm                # conn -> bool|None: is it in conn.state now?
        self.resolve_owner = resolve_owner    # [conns] -> {conn.id: (pid, comm, fd)}
        self.halfclosed = {}                  # id -> Conn now in a half-closed state
        self.check_every_ns = min(250_000_000, stuck_after_ns // 4 or 1)
        self._next_check_ns = 0

    def resting(self, c):
        self.halfclosed[c.id] = c

    def gone(self, c):
        self.halfclosed.pop(c.id, None)

    def moved(self, c, ts, new):
        if c.stuck_state is not None and c.stuck_state != new:
            self.tr.finding(c, "unstuck", ts, state=S.name(c.stuck_state),
                            duration_ns=ts - c.since_ns, newstate=S.name(new))
            c.stuck_state = None
        self.halfclosed.pop(c.id, None)

    def clock(self, now_ns):
        if now_ns < self._next_check_ns:
            return
        self._next_check_ns = now_ns + self.check_every_ns
        due = [c for c in self.halfclosed.values()
               if c.stuck_state is None and now_ns - c.since_ns >= self.stuck_after_ns]
        if not due:
            return
        confirmed = []
        for c in due:
            ok = self.confirm(c) if self.confirm else None
            gaps = self.tr.incomplete(c)
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
            f = self.tr.finding(c, "stuck", now_ns, state=S.name(c.state),
                                age_ns=now_ns - c.since_ns, fd=holder[2],
                                age_is_lower_bound=c.preexisting and c.path == c.state,
                                blame=S.HALF_CLOSED[c.state])
            f.pid, f.comm = holder[0], holder[1]

    def now(self):
        """Connections currently reported stuck, oldest first."""
        return sorted((c for c in self.halfclosed.values() if c.stuck_state is not None),
                      key=lambda c: c.since_ns)
