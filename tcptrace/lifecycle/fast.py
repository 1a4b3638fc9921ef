"""Whole-record fast paths: the records that make up almost every connection, applied at once.

The kernel sends a socket's transitions together (bpf/tcptrace.c), so nearly every record is one
of a few shapes: a connect() that completed, an accepted child, an active or a passive close,
or a short connection's whole life (its opening held until its close). Such a record moves a
connection through states it did not rest in, so what the step machine does per step for a
state that may last (half-closed bookkeeping, 4-tuple filing, gap checks) has nothing to do,
and the record is applied with a handful of stores. Each path calls what the step machine
calls for the same facts (Tracker.new, the established/step/closing hooks, Tracker.ended), and
returns False, leaving the record to the step machine, whenever anything is unusual.
tests/unit/test_grouped.py checks that both give identical findings on every scenario.
"""
import struct

from tcptrace import states as S
from tcptrace.lifecycle.conn import ACTIVE, PASSIVE
from tcptrace.wire import COMM_TEXT, EARLY, MAX_STEPS, STATES_AT, STEP_BYTES, endpoints

ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1 = S.ESTABLISHED, S.SYN_SENT, S.SYN_RECV, S.FIN_WAIT1
CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN = S.CLOSE, S.CLOSE_WAIT, S.LAST_ACK, S.LISTEN

_TS2 = struct.Struct("<2Q").unpack_from     # the first two steps' times
_TS3 = struct.Struct("<3Q").unpack_from     # the first three
_TS5 = struct.Struct("<5Q").unpack_from     # the first five


def _open(active):
    """CLOSE -> SYN_SENT -> ESTABLISHED (a connect() that completed) or LISTEN -> SYN_RECV ->
    ESTABLISHED (an accepted child socket), given the two steps' times; returns the new Conn,
    or None: left to the step machine."""
    first = SYN_SENT if active else SYN_RECV
    start = CLOSE if active else LISTEN
    opening = start << 4 | first

    def open_(tr, ev, t0, t1):
        table = tr.table
        c = table.by_sk.get(ev.skaddr)
        if (c is not None and c.closed_ns is None) or (table.tombs and ev.skaddr in table.tombs):
            return None
        laddr, lport, raddr, rport = endpoints(ev)
        if active and not lport:
            return None
        c = tr.new(ev.skaddr, ev.family, ACTIVE if active else PASSIVE, first, t0)
        c.laddr, c.raddr, c.rport = laddr, raddr, rport
        if active:      # connect(): the record's task, in process context
            c.pid, c.comm, c.owner_sure = ev.pid, COMM_TEXT[ev.comm], True
        else:           # the listener's owner accepts it
            c.lport = lport
            owner = table.accepted_by(ev.aux, ev.family, laddr, lport, t0)
            if owner:
                c.pid, c.comm = owner
        if tr.transitions:
            tr.step(c, ev, t0, start, first)      # connect()'s step: before the port is chosen
        c.lport = lport
        c.syn_retrans = ev.retrans
        if tr.transitions:
            tr.step(c, ev, t1, first, ESTABLISHED)
        c.state, c.since_ns, c.path, c.established_ns = ESTABLISHED, t1, first << 4 | ESTABLISHED, t1
        mx = tr.stats.mx
        mx[opening] += 1
        mx[first << 4 | ESTABLISHED] += 1
        tr.stats.events += 1
        tr.established(c, t1, first)
        return c
    return open_


def _close_steps(states):
    """The (old, new) steps of a close from ESTABLISHED through these states."""
    return tuple(zip((ESTABLISHED,) + states[:-1], states))


def _close(first_fin, states):
    """ESTABLISHED -> ... -> CLOSE in three steps, one of which a process makes itself (close()
    or shutdown()): the record's task names the owner when it is not known yet. Given the
    connection and the three steps' times."""
    steps = _close_steps(states)
    cells = tuple(o << 4 | n for o, n in steps)
    # close() / shutdown(), or close() after the peer's FIN (CLOSE_WAIT -> LAST_ACK)
    owner_step = 0 if first_fin == "local" else 1
    path_add = states[0] << 8 | states[1] << 4 | states[2]

    def close(tr, ev, c, ts):
        if tr.transitions:
            for i, (old, new) in enumerate(steps):
                if i == owner_step and not c.owner_sure:
                    c.pid, c.comm, c.owner_sure = ev.pid, COMM_TEXT[ev.comm], True
                tr.step(c, ev, ts[i], old, new)
        elif not c.owner_sure:
            c.pid, c.comm, c.owner_sure = ev.pid, COMM_TEXT[ev.comm], True
        if c.first_fin is None:
            c.first_fin = first_fin
        t = ts[2]
        c.state, c.since_ns, c.closed_ns = CLOSE, t, t
        c.path = c.path << 12 | path_add
        mx = tr.stats.mx
        for cell in cells:
            mx[cell] += 1
        tr.stats.events += 2
        if ev.rst_ns and c.recv_reset_ns is None:
            c.recv_reset_ns = ev.rst_ns
        tr.closing(c, t, states[1])
        tr.pending.append(c)
    return close


def _closable(tr, ev):
    """The open connection a close record continues, if a fast path may take it."""
    c = tr.table.by_sk.get(ev.skaddr)
    if c is None or c.state != ESTABLISHED or c.closed_ns is not None \
            or c.stuck_state is not None or c.scan_ts:
        return None
    laddr, lport, raddr, rport = endpoints(ev)
    if lport != c.lport or laddr != c.laddr or raddr != c.raddr or rport != c.rport:
        return None
    return c


def _opening(active):
    open_ = _open(active)

    def record(tr, ev, s):
        c = open_(tr, ev, *_TS2(s))
        if c is None:
            return False
        if ev.rst_ns:
            c.recv_reset_ns = ev.rst_ns
        return True
    return record


def _closing(first_fin, states):
    close = _close(first_fin, states)

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
    open_ = _open(active)
    close = _close(first_fin, states)

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


def _shape(*pairs):
    """A shape: the steps' old states, then their new states, as in Event.steps."""
    return bytes([o for o, _ in pairs] + [n for _, n in pairs])


_CONNECT = ((CLOSE, SYN_SENT), (SYN_SENT, ESTABLISHED))
_ACCEPT = ((LISTEN, SYN_RECV), (SYN_RECV, ESTABLISHED))
_LOCAL = ("local", (FIN_WAIT1, S.FIN_WAIT2, CLOSE))
_REMOTE = ("remote", (CLOSE_WAIT, LAST_ACK, CLOSE))

PATHS = {
    _shape(*_CONNECT): _opening(active=True),
    _shape(*_ACCEPT): _opening(active=False),
    _shape(*_close_steps(_LOCAL[1])): _closing(*_LOCAL),
    _shape(*_close_steps(_REMOTE[1])): _closing(*_REMOTE),
}
for _active, _open_steps in ((True, _CONNECT), (False, _ACCEPT)):
    for _fin, _states in (_LOCAL, _REMOTE):
        PATHS[_shape(*_open_steps, *_close_steps(_states))] = _whole(_active, _fin, _states)


def _regions(paths):
    """A record's state arrays (Event.steps from STATES_AT * M: M old states, M new states,
    unused ones zero) -> (steps, path), for every M a record may have: MAX_STEPS from the
    kernel, fewer in recordings and hand-built streams. One slice of the record's bytes is then
    the whole key. A record whose nsteps disagrees with the arrays is left to the steps."""
    out = {}
    for shape, fn in paths.items():
        n = len(shape) // 2
        for m in range(n, 2 * MAX_STEPS + 1):
            pad = bytes(m - n)
            out[shape[:n] + pad + shape[n:] + pad] = (n, fn)
    return out


REGIONS = _regions(PATHS)


def apply(tr, ev):
    """Apply a STATE record whole if it has a common shape; False: it is the step machine's."""
    n = ev.nsteps
    if 2 <= n <= 5 and not ev.flags & EARLY:
        s = ev.steps
        path = REGIONS.get(s[len(s) // STEP_BYTES * STATES_AT:])
        if path is not None and path[0] == n:
            return path[1](tr, ev, s)
    return False
