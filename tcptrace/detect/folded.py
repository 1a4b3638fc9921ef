"""aggregate: healthy short connections the kernel folded into its aggregates instead of
sending them (bpf/aggregate.c; Options.fold says when), as one finding per key and reading.

Such a connection makes no finding of its own: `report` and `metrics` count it from the
aggregate (its connect or accept, its close, its handshake time by bucket), and the transition
matrix gets its five steps, and for the side that closed first the inferred step into
TIME_WAIT (detect/timewait.py) and, 60 s later (TCP_TIMEWAIT_LEN), the one out of it: no dump
can tell a folded socket's timewait sock from another's. Only the sockets whose whole life was
one ordinary record are folded; the lifecycle never knew them, so nothing else is owed for
them.
"""
import collections

from tcptrace import states as S
from tcptrace.detect.base import Detector
from tcptrace.detect.timewait import TIME_WAIT_NS, TW_CELL
from tcptrace.findings import Finding
from tcptrace.wire import AGG, AGG_PASSIVE as PASSIVE, AGG_REMOTE as REMOTE

ESTABLISHED = S.ESTABLISHED
_CLOSES = {0: (S.FIN_WAIT1, S.FIN_WAIT2, S.CLOSE), REMOTE: (S.CLOSE_WAIT, S.LAST_ACK, S.CLOSE)}


def _cells(shape):
    """The transition matrix cells (old << 4 | new) of a folded life of this shape."""
    start, first = (S.LISTEN, S.SYN_RECV) if shape & PASSIVE else (S.CLOSE, S.SYN_SENT)
    close = _CLOSES[shape & REMOTE]
    path = (start, first, ESTABLISHED) + close
    return tuple(o << 4 | n for o, n in zip(path, path[1:]))


CELLS = {shape: _cells(shape) for shape in (0, PASSIVE, REMOTE, PASSIVE | REMOTE)}


INTO_TW = S.FIN_WAIT2 << 4 | S.TIME_WAIT


class Folded(Detector):
    def __init__(self, tracker):
        super().__init__(tracker)
        self.waiting = collections.deque()      # (when they leave TIME_WAIT, how many)

    def clock(self, now_ns):
        w = self.waiting
        while w and w[0][0] <= now_ns:
            self.tr.stats.mx[TW_CELL] += w.popleft()[1]

    def sample(self, rec):
        if rec.what != AGG:
            return
        st = self.tr.stats
        mx = st.mx
        for family, shape, other, addr, port, comm, n, hs_sum, hs_max, life_sum, buckets \
                in rec.data["rows"]:
            for cell in CELLS[shape]:
                mx[cell] += n
            if not shape & REMOTE:
                mx[INTO_TW] += n
                self.waiting.append((rec.ts_ns + TIME_WAIT_NS, n))
            st.folded += n
            passive = bool(shape & PASSIVE)
            ends = ({"laddr": addr, "lport": port} if passive
                    else {"raddr": addr, "rport": port})
            self.tr.emit(Finding(
                "aggregate", rec.ts_ns, comm="(other)" if other else comm, family=S.FAMILY_NAMES.get(family), **ends,
                role="passive" if passive else "active",
                closed_by="remote" if shape & REMOTE else "local", other=other, count=n,
                handshake_sum_ns=hs_sum, handshake_max_ns=hs_max,
                handshake_buckets={b: k for b, k in buckets}, duration_sum_ns=life_sum))
