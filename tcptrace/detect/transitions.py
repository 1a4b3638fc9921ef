"""transition (--transitions): every state transition, with the connection's owner as known at
that step (most transitions run in softirq, where the task the kernel names is a bystander)."""
from tcptrace.detect.base import Detector
from tcptrace.findings import Ends, Transition


def ends_of(c, skaddr):
    """c's Ends as they are now. A connection's transitions share one, made anew only when the
    owner or the tuple has changed since its last transition: sinks format it once per
    connection."""
    e = c.ends
    if e is None or e.lport != c.lport or e.pid != c.pid or e.comm != c.comm \
            or e.rport != c.rport or e.laddr != c.laddr or e.raddr != c.raddr:
        e = c.ends = Ends(c.pid, c.comm, c.family, c.laddr, c.lport, c.raddr, c.rport, skaddr)
    return e


class Transitions(Detector):
    def __init__(self, tracker):
        super().__init__(tracker)
        self.emit = tracker.out.append      # one per transition: the list's own method

    def step(self, c, ev, ts, old, new):
        self.emit(Transition(ts, ends_of(c, ev.skaddr), old << 8 | new))
