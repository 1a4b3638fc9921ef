"""Hand-built kernel event streams for the pure tiers, shaped like the real ones
(tests/data/*.jsonl are recorded from the real kernel)."""
import json

from tcptrace import events, states as S
from tcptrace.events import Event, Kind, Lost

MS = 1_000_000
SEC = 1_000_000_000


def ev(kind, ts, sk=0, old=0, new=0, pid=100, comm="app", family=S.AF_INET,
       laddr="127.0.0.1", lport=0, raddr="127.0.0.1", rport=0, err=0, aux=0, flags=0):
    return Event(ts_ns=ts, skaddr=sk, pid=pid, tid=pid, err=err, aux=aux, sport=lport,
                 dport=rport, kind=kind, family=family, oldstate=old, newstate=new, flags=flags,
                 saddr=events.addr_bytes(laddr), daddr=events.addr_bytes(raddr),
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


def passive_open(t0, sk, lport, rport, pid=7, comm="ksoftirqd/0"):
    return [state(t0, sk, S.LISTEN, S.SYN_RECV, pid=pid, comm=comm, lport=lport, rport=rport),
            state(t0 + 1000, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid, comm=comm, lport=lport,
                  rport=rport)]


def listen(t0, sk, lport, pid=200, comm="server"):
    return [state(t0, sk, S.CLOSE, S.LISTEN, pid=pid, comm=comm, lport=lport, raddr="0.0.0.0")]


def active_close(t0, sk, lport, rport, pid=100, comm="client"):
    return [state(t0, sk, S.ESTABLISHED, S.FIN_WAIT1, pid=pid, comm=comm, lport=lport, rport=rport),
            state(t0 + 1000, sk, S.FIN_WAIT1, S.FIN_WAIT2, pid=0, comm="swapper/0", lport=lport, rport=rport),
            state(t0 + 2000, sk, S.FIN_WAIT2, S.CLOSE, pid=0, comm="swapper/0", lport=lport, rport=rport)]


def passive_close(t0, sk, lport, rport, pid=200, comm="server", wait=1000):
    return [state(t0, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=0, comm="swapper/0", lport=lport, rport=rport),
            state(t0 + wait, sk, S.CLOSE_WAIT, S.LAST_ACK, pid=pid, comm=comm, lport=lport, rport=rport),
            state(t0 + wait + 1000, sk, S.LAST_ACK, S.CLOSE, pid=0, comm="swapper/0", lport=lport, rport=rport)]


def write_recording(path, recs, wall_offset_ns=1_700_000_000 * SEC, ticks=()):
    """A recording file as `--record` writes it; ticks: extra clock ticks (ts_ns)."""
    items = [(r.ts_ns, 0, r) for r in recs] + [(t, 1, None) for t in ticks]
    with open(path, "w") as f:
        f.write(json.dumps(events.recording_header(wall_offset_ns)) + "\n")
        for ts, is_tick, r in sorted(items, key=lambda x: (x[0], x[1])):
            if is_tick:
                f.write(json.dumps({"kind": "tick", "ts_ns": ts}) + "\n")
            elif isinstance(r, Lost):
                f.write(events.lost_to_json(r) + "\n")
            else:
                f.write(events.event_to_json(r) + "\n")
