"""Kernel facts as frozen records, and their recording format.

`Event` names the members of `struct tt_event` (bpf/tcptrace.h) minus padding; a unit test parses
the header to keep the two in step. The byte layout itself is never copied here: tcptrace/kernel.py
asks BCC for the compiled struct and builds the decoder from it.
"""
import ipaddress
import json
import socket
import struct
from typing import NamedTuple

from tcptrace import states


class Kind:
    STATE = 1
    RECV_RESET = 2
    SEND_RESET = 3
    SOCK_ERROR = 4
    RETRANS = 5
    CONNECT_RET = 6

    NAMES = {1: "state", 2: "recv_reset", 3: "send_reset", 4: "sock_error", 5: "retrans",
             6: "connect_ret"}
    BY_NAME = {v: k for k, v in NAMES.items()}


# flags
F_KPROBE = 0x01
F_SYSCALL = 0x02
F_OWNER = 0x04      # STATE: pid/comm are the task of a step a process makes itself
F_HELD = 0x08       # STATE: a held socket's steps sent early; they may come again, and ts_ns is
                    #   when this was sent (bpf/tcptrace.h)
F_SCAN = 0x80       # STATE: read from the kernel's `socks` map (set here, never by the kernel)
EARLY = F_HELD | F_SCAN   # STATE: steps that may come again with the socket's next record

MAX_STEPS = 6       # TT_MAX_STEPS
STEP_ARRAYS = ("step_ts", "step_pid", "step_old", "step_new")
# Event.steps is the four arrays' bytes as the kernel lays them out, back to back: M u64 times,
# M u32 pids, M u8 old states, M u8 new states (little-endian), 14 bytes per step. Kept as one
# bytes object rather than 4 x M numbers: decoding a record made 24 ints and two tuples that
# almost no record needs (the whole-record fast paths read two or three of them), which cost
# about 40% of decoding.
STEP_WIDTHS = (8, 4, 1, 1)          # bytes per element of each of STEP_ARRAYS
STEP_BYTES = sum(STEP_WIDTHS)
STATES_AT = STEP_BYTES - 2          # M steps' arrays: the state arrays start at STATES_AT * M


class Event(NamedTuple):
    ts_ns: int        # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
    skaddr: int       # opaque socket key; 0 when the hook has none (error reports)
    pid: int          # tgid of the task current when the hook ran (may be a bystander in softirq)
    tid: int
    err: int
    aux: int
    sport: int
    dport: int
    kind: int
    family: int
    oldstate: int
    newstate: int
    flags: int
    saddr: bytes      # 16 bytes; IPv4 uses the first 4
    daddr: bytes
    comm: bytes       # NUL-padded
    nsteps: int = 0   # STATE: transitions in `steps`; 0 in a one-transition event (ts_ns, pid,
                      #   oldstate, newstate: recordings of version 1, hand-built streams)
    retrans: int = 0  # STATE: SYN retransmissions while the steps were pending
    rst_ns: int = 0   # STATE: when the peer reset the socket while the steps were pending
    steps: bytes = b"" # STATE: the step arrays' bytes, M steps long (M = len // STEP_BYTES):
                      #   ts x M, pid x M, oldstate x M, newstate x M; the first nsteps are used


_STEP_STRUCTS = {}   # M -> struct.Struct of M steps' arrays


def steps_struct(m):
    st = _STEP_STRUCTS.get(m)
    if st is None:
        st = _STEP_STRUCTS[m] = struct.Struct(f"<{m}Q{m}I{m}B{m}B")
    return st


def iter_steps(ev):
    """(ts_ns, pid, oldstate, newstate) of each transition a STATE record carries."""
    n = ev.nsteps
    if not n:
        return ((ev.ts_ns, ev.pid, ev.oldstate, ev.newstate),)
    m = len(ev.steps) // STEP_BYTES
    n = min(n, m)
    s = steps_struct(m).unpack(ev.steps)
    return zip(s[:n], s[m:m + n], s[2 * m:2 * m + n], s[3 * m:3 * m + n])


def pack_steps(steps):
    """[(ts, pid, old, new), ...] -> Event.steps, as many steps long as given."""
    return steps_struct(len(steps)).pack(*(st[i] for i in range(4) for st in steps))


class Lost(NamedTuple):
    """Events the kernel side could not deliver: `count` of them, noticed at `ts_ns`."""
    ts_ns: int
    count: int
    where: str        # "ringbuf", "perf:cpuN", "bpf:<kind>" (output refused), "recursion:<prog>",
                      # "unseen:inet_sock_set_state" (no program ran; kernel.Tally)


def memo(fn, limit=100_000):
    """fn(key) cached in a dict that is emptied when it grows past `limit`. For the per-record
    conversions (addresses, command names, JSON strings) where a busy host repeats a handful of
    values: a dict lookup is cheaper than functools.lru_cache's bookkeeping."""
    cache = {}

    def get(key):
        v = cache.get(key)
        if v is None:
            if len(cache) >= limit:
                cache.clear()
            v = cache[key] = fn(key)
        return v
    return get


def _addr_text(key):
    family, raw = key
    if family == states.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    s = socket.inet_ntop(socket.AF_INET6, raw[:16])
    if s.startswith("::ffff:") and "." not in s:     # show a mapped v4 peer as ss does
        s = "::ffff:" + socket.inet_ntop(socket.AF_INET, raw[12:16])
    return s


_ADDRS = {}     # (family, raw) -> text; a busy host repeats a handful of addresses


def addr_str(family, raw):
    """Text form of a 16-byte address field (runs twice per record, hence cached, inline)."""
    s = _ADDRS.get((family, raw))
    if s is None:
        if family not in (states.AF_INET, states.AF_INET6):
            return None
        if len(_ADDRS) >= 100_000:
            _ADDRS.clear()
        s = _ADDRS[(family, raw)] = _addr_text((family, raw))
    return s


def endpoints(ev):
    """(laddr, lport, raddr, rport) of a record, in text. Runs for most records: the address
    cache is read inline, addr_str called only on a miss."""
    family = ev.family
    return (_ADDRS.get((family, ev.saddr)) or addr_str(family, ev.saddr), ev.sport,
            _ADDRS.get((family, ev.daddr)) or addr_str(family, ev.daddr), ev.dport)


def addr_bytes(text):
    if text is None:
        return bytes(16)
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def comm_str(raw):
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# One str per distinct command name: thousands of connections share a handful.
intern_comm = memo(comm_str, limit=10_000)


# --- recording format -------------------------------------------------------------------------
# JSON Lines. Line 1 is a header; then one object per event or loss, in delivery order (replay
# re-orders exactly as the live path does). Human-readable on purpose: recordings get attached to
# tickets and read with jq.

RECORDING_MAGIC = "tcptrace-recording"
RECORDING_VERSION = 2       # 2: STATE records may carry several steps
RECORDING_VERSIONS = (1, 2)  # what replay reads


def recording_header(wall_offset_ns, **extra):
    return {"format": RECORDING_MAGIC, "version": RECORDING_VERSION,
            "wall_offset_ns": wall_offset_ns, **extra}


def event_to_json(ev):
    d = {"ts_ns": ev.ts_ns, "kind": Kind.NAMES.get(ev.kind, ev.kind), "skaddr": f"{ev.skaddr:x}",
         "pid": ev.pid, "tid": ev.tid, "comm": comm_str(ev.comm),
         "family": ev.family, "saddr": addr_str(ev.family, ev.saddr),
         "daddr": addr_str(ev.family, ev.daddr), "sport": ev.sport, "dport": ev.dport,
         "oldstate": ev.oldstate, "newstate": ev.newstate, "err": ev.err, "aux": ev.aux,
         "flags": ev.flags}
    if ev.nsteps:
        d["steps"] = [list(st) for st in iter_steps(ev)]
        d["retrans"] = ev.retrans
        d["rst_ns"] = ev.rst_ns
    return json.dumps(d, separators=(",", ":"))


def lost_to_json(lost):
    return json.dumps({"ts_ns": lost.ts_ns, "kind": "lost", "count": lost.count,
                       "where": lost.where}, separators=(",", ":"))


def from_json_obj(d):
    """One recording line (already parsed) -> Event or Lost. Raises ValueError/KeyError/TypeError."""
    kind = d["kind"]
    if kind == "lost":
        return Lost(int(d["ts_ns"]), int(d["count"]), str(d["where"]))
    k = Kind.BY_NAME[kind] if isinstance(kind, str) else int(kind)
    fam = int(d.get("family", 0))
    steps = d.get("steps") or ()
    if steps:
        steps = [tuple(int(x) for x in st) for st in steps]
        if any(len(st) != 4 or not (0 <= st[2] < 16 and 0 <= st[3] < 16) for st in steps) \
                or len(steps) > 255:
            raise ValueError("bad steps")
        try:
            packed = pack_steps(steps)
        except struct.error as e:         # a time or pid outside what the kernel's arrays hold
            raise ValueError(f"bad steps: {e}") from None
    if not (0 <= int(d.get("oldstate", 0)) < 16 and 0 <= int(d.get("newstate", 0)) < 16):
        raise ValueError("bad state")
    return Event(
        ts_ns=int(d["ts_ns"]), skaddr=int(str(d.get("skaddr", "0")), 16), pid=int(d.get("pid", 0)),
        tid=int(d.get("tid", 0)), err=int(d.get("err", 0)), aux=int(d.get("aux", 0)),
        sport=int(d.get("sport", 0)), dport=int(d.get("dport", 0)), kind=k, family=fam,
        oldstate=int(d.get("oldstate", 0)), newstate=int(d.get("newstate", 0)),
        flags=int(d.get("flags", 0)), nsteps=len(steps), retrans=int(d.get("retrans", 0)),
        saddr=addr_bytes(d.get("saddr")), daddr=addr_bytes(d.get("daddr")),
        comm=str(d.get("comm", "")).encode()[:16], rst_ns=int(d.get("rst_ns", 0)),
        steps=packed if steps else b"")
