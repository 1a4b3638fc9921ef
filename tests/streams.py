"""Hand-built kernel event streams for the pure tiers, shaped like the real ones
(tests/data/*.jsonl are recorded from the real kernel)."""
import io
import json

from tcptrace import recording, wire, states as S
from tcptrace.lifecycle import rules
from tcptrace.output import Sink
from tcptrace.wire import Event, Kind, Lost

MS = 1_000_000
SEC = 1_000_000_000


def ev(kind, ts, sk=0, old=0, new=0, pid=100, comm="app", family=S.AF_INET,
       laddr="127.0.0.1", lport=0, raddr="127.0.0.1", rport=0, err=0, aux=0, flags=0):
    return Event(ts_ns=ts, skaddr=sk, pid=pid, tid=pid, err=err, aux=aux, sport=lport,
                 dport=rport, kind=kind, family=family, oldstate=old, newstate=new, flags=flags,
                 saddr=recording.addr_bytes(laddr), daddr=recording.addr_bytes(raddr),
                 comm=comm.encode())


def state(ts, sk, old, new, **kw):
    return ev(Kind.STATE, ts, sk, old, new, **kw)


def lost(ts, n=1, where="bpf:state"):
    return Lost(ts, n, where)


def active_open(t0, sk, lport, rport, pid=100, comm="client", hs=50_000):
    """CLOSE->SYN_SENT (port 0, process context), SYN_SENT->ESTABLISHED (softirq bystander)."""
    return [state(t0, sk, S.CLOSE, S.SYN_SENT, pid=pid, comm=comm, rport=rport),
            state(t0 + hs, sk, S.SYN_SENT, S.ESTABLISHED, pid=0, comm="swapper/0",
                  lport=lport, rport=rport)]


def passive_open(t0, sk, lport, rport, pid=7, comm="ksoftirqd/0", netns=0, **kw):
    """A listener's child: its first step names the namespace (bpf/state.c), the next not."""
    return [state(t0, sk, S.LISTEN, S.SYN_RECV, pid=pid, comm=comm, lport=lport, rport=rport,
                  aux=netns, **kw),
            state(t0 + 1000, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid, comm=comm, lport=lport,
                  rport=rport, **kw)]


def listen(t0, sk, lport, pid=200, comm="server", netns=0, **kw):
    kw.setdefault("raddr", "0.0.0.0")
    return [state(t0, sk, S.CLOSE, S.LISTEN, pid=pid, comm=comm, lport=lport, aux=netns, **kw)]


def unlisten(t0, sk, lport, pid=200, comm="server", netns=0, **kw):
    kw.setdefault("raddr", "0.0.0.0")
    return [state(t0, sk, S.LISTEN, S.CLOSE, pid=pid, comm=comm, lport=lport, aux=netns, **kw)]


def active_close(t0, sk, lport, rport, pid=100, comm="client"):
    return [state(t0, sk, S.ESTABLISHED, S.FIN_WAIT1, pid=pid, comm=comm, lport=lport, rport=rport),
            state(t0 + 1000, sk, S.FIN_WAIT1, S.FIN_WAIT2, pid=0, comm="swapper/0", lport=lport, rport=rport),
            state(t0 + 2000, sk, S.FIN_WAIT2, S.CLOSE, pid=0, comm="swapper/0", lport=lport, rport=rport)]


def passive_close(t0, sk, lport, rport, pid=200, comm="server", wait=1000, **kw):
    return [state(t0, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=0, comm="swapper/0", lport=lport,
                  rport=rport, **kw),
            state(t0 + wait, sk, S.CLOSE_WAIT, S.LAST_ACK, pid=pid, comm=comm, lport=lport,
                  rport=rport, **kw),
            state(t0 + wait + 1000, sk, S.LAST_ACK, S.CLOSE, pid=0, comm="swapper/0",
                  lport=lport, rport=rport, **kw)]


def write_recording(path, recs, wall_offset_ns=1_700_000_000 * SEC, ticks=()):
    """A recording file as `--record` writes it; ticks: extra clock ticks (ts_ns)."""
    items = [(r.ts_ns, 0, r) for r in recs] + [(t, 1, None) for t in ticks]
    with open(path, "w") as f:
        f.write(json.dumps(recording.recording_header(wall_offset_ns)) + "\n")
        for ts, is_tick, r in sorted(items, key=lambda x: (x[0], x[1])):
            if is_tick:
                f.write(json.dumps({"kind": "tick", "ts_ns": ts}) + "\n")
            else:       # an event, a loss or a sample
                f.write(recording.record_to_json(r) + "\n")


_OWNER_STEPS = set(rules.OWNER_STEPS)
_FRESH = set(rules.OPENING_STEPS)


def grouped(recs, max_steps=wire.MAX_STEPS, scan_at=(), hold_ns=None):
    """What the kernel sends for a stream of one-transition events (bpf/state.c): each
    socket's steps together, sent at ESTABLISHED, LISTEN or CLOSE or when max_steps are pending;
    a reset or SYN retransmission while steps are pending rides in that record. scan_at: times at
    which user space reads the pending steps (records flagged F_SCAN), as the live loop does.
    hold_ns: as the kernel with held opens (TT_HOLD): steps reaching ESTABLISHED wait for the
    socket's next transition, which carries them, unless a new socket takes the address or
    another task (pid, tid or comm) makes the owner's step (then they go out alone, flagged
    F_HELD); a socket held
    hold_ns is sent early (a copy flagged F_HELD, timed when sent) by the next hit after that."""
    out, pending, held = [], {}, {}
    due = []                # held sockets not sent early yet, oldest first: (held at, skaddr)
    scans = sorted(scan_at)

    def send(p, flags=0, ts=None):
        steps = p["steps"]
        last = steps[-1]
        pad = [(0, 0, 0, 0)] * (max_steps - len(steps))
        h = p["head"]
        return h._replace(ts_ns=last[0] if ts is None else ts, oldstate=last[2],
                          newstate=last[3], flags=p["flags"] | flags, nsteps=len(steps),
                          retrans=p["retrans"], rst_ns=p["rst"],
                          steps=wire.pack_steps(steps + pad))

    def other_task(p, r):
        h = p["head"]
        return p["flags"] & wire.F_OWNER and (h.pid, h.tid, h.comm) != (r.pid, r.tid, r.comm)

    for r in sorted(recs, key=lambda r: r.ts_ns):
        while scans and scans[0] < r.ts_ns:
            scans.pop(0)
            out.extend(send(p, wire.F_SCAN) for p in pending.values())
        if isinstance(r, Lost) or r.kind not in (Kind.STATE, Kind.RECV_RESET, Kind.RETRANS):
            out.append(r)
            continue
        p = pending.get(r.skaddr)
        if r.kind == Kind.RECV_RESET and (p or r.skaddr in held):
            p = p or held[r.skaddr]
            p["rst"] = p["rst"] or r.ts_ns
            continue
        if r.kind == Kind.RETRANS and p:
            p["retrans"] += 1
            continue
        if r.kind != Kind.STATE:
            out.append(r)
            continue
        pair = (r.oldstate, r.newstate)
        starts_anew = lambda p: pair in _FRESH or (pair in _OWNER_STEPS and other_task(p, r))
        if p and starts_anew(p):
            out.append(send(pending.pop(r.skaddr)))
            p = None
        if p is None and r.skaddr in held:
            h = held.pop(r.skaddr)
            if starts_anew(h):
                out.append(send(h, wire.F_HELD, ts=r.ts_ns))
            else:
                p = pending[r.skaddr] = h
        if p is None:
            p = pending[r.skaddr] = {"head": r, "steps": [], "retrans": 0, "rst": 0,
                                     "flags": wire.F_OWNER if pair in _OWNER_STEPS else 0}
        else:
            if r.sport:
                p["head"] = p["head"]._replace(sport=r.sport, dport=r.dport, saddr=r.saddr,
                                               daddr=r.daddr)
            if pair in _OWNER_STEPS:
                p["head"] = p["head"]._replace(pid=r.pid, tid=r.tid, comm=r.comm)
                p["flags"] |= wire.F_OWNER
        p["steps"].append((r.ts_ns, r.pid, r.oldstate, r.newstate))
        if r.newstate in rules.SEND_AT or len(p["steps"]) >= max_steps:
            p = pending.pop(r.skaddr)
            if hold_ns is not None and r.newstate == S.ESTABLISHED and len(p["steps"]) < max_steps:
                held[r.skaddr] = p
                due.append((r.ts_ns, r.skaddr, p))
            else:
                out.append(send(p))
        # This hit sends what is due (tt_flush): a socket held hold_ns ago and still held.
        while due and due[0][0] + (hold_ns or 0) <= r.ts_ns:
            t, sk, p = due.pop(0)
            if held.get(sk) is p:
                out.append(send(p, wire.F_HELD, ts=r.ts_ns))
    out.extend(send(p) for p in pending.values())
    out.extend(send(p, wire.F_HELD, ts=p["steps"][-1][0]) for p in held.values())
    return out


class Collect(Sink):
    """A sink that keeps every finding it is given, as the tracker hands them over (unordered:
    the pipeline does not hold them back for time order)."""
    ordered = False

    def __init__(self):
        super().__init__(io.StringIO(), 0)
        self.got = []

    def emit_many(self, findings):
        self.got += findings
