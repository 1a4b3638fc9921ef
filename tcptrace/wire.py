"""The wire contract, user-space side: kernel records as frozen Python records.

`Event` names the members of `struct tt_event` (bpf/tcptrace.h) minus padding; a unit test parses
the header to keep the two in step. The byte layout itself is never copied here: `decoder_for`
derives the decoder from the ctypes struct BCC builds from the compiled program
(tcptrace/kernel/loader.py asks for it), so the header stays the single source of truth.
"""
import ctypes
import socket
import struct
from typing import NamedTuple

from tcptrace import states
from tcptrace.cache import Memo


class Kind:
    STATE = 1
    RECV_RESET = 2
    SEND_RESET = 3
    SOCK_ERROR = 4
    RETRANS = 5
    CONNECT_RET = 6
    SYNACK = 7

    NAMES = {1: "state", 2: "recv_reset", 3: "send_reset", 4: "sock_error", 5: "retrans",
             6: "connect_ret", 7: "synack"}
    BY_NAME = {v: k for k, v in NAMES.items()}


# flags
F_KPROBE = 0x01
F_SYSCALL = 0x02
F_OWNER = 0x04      # STATE: pid/comm are the task of a step a process makes itself
F_HELD = 0x08       # STATE: a held socket's steps sent early; they may come again, and ts_ns is
                    #   when this was sent (bpf/tcptrace.h)
F_REASON = 0x10     # SEND_RESET: aux is the reset's reason (enum sk_rst_reason)
F_SCAN = 0x80       # STATE: read from the kernel's maps by user space (set here, never by the
                    #   kernel)
EARLY = F_HELD | F_SCAN   # STATE: steps that may come again with the socket's next record

MAX_STEPS = 6       # TT_MAX_STEPS
STEP_ARRAYS = ("step_ts", "step_pid", "step_old", "step_new")
# Event.steps is the four arrays' bytes as the kernel lays them out, back to back: M u64 times,
# M u32 pids, M u8 old states, M u8 new states (little-endian), 14 bytes per step. One bytes
# object rather than 4 x M numbers: most records are applied by reading two or three of them
# (tcptrace/lifecycle/fast.py), and unpacking all of them was about 40% of decoding.
STEP_WIDTHS = (8, 4, 1, 1)          # bytes per element of each of STEP_ARRAYS
STEP_BYTES = sum(STEP_WIDTHS)
STATES_AT = STEP_BYTES - 2          # M steps' arrays: the state arrays start at STATES_AT * M


class Event(NamedTuple):
    ts_ns: int        # CLOCK_MONOTONIC, as bpf_ktime_get_ns()
    skaddr: int       # opaque socket key; 0 when the hook has none (error reports)
    pid: int          # tgid of the task current when the hook ran (may be a bystander in softirq)
    tid: int
    err: int
    aux: int          # bpf/tcptrace.h: a fd, a reason, or a network namespace (STATE: of a
                      #   listener or its child, 0 if unknown or another socket)
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


class Lost(NamedTuple):
    """Events the kernel side could not deliver: `count` of them, noticed at `ts_ns`."""
    ts_ns: int
    count: int
    where: str        # "bpf:<kind>" (output refused), "recursion:<prog>", "perf:cpuN",
                      # "unseen:<tracepoint>" (no program ran; kernel/tally.py)


steps_struct = Memo(lambda m: struct.Struct(f"<{m}Q{m}I{m}B{m}B"), limit=64)  # M -> M steps


def iter_steps(ev):
    """(ts_ns, pid, oldstate, newstate) of each transition a STATE record carries."""
    n = ev.nsteps
    if not n:
        return ((ev.ts_ns, ev.pid, ev.oldstate, ev.newstate),)
    m = len(ev.steps) // STEP_BYTES
    n = min(n, m)
    s = steps_struct[m].unpack(ev.steps)
    return zip(s[:n], s[m:m + n], s[2 * m:2 * m + n], s[3 * m:3 * m + n])


def pack_steps(steps):
    """[(ts, pid, old, new), ...] -> Event.steps, as many steps long as given."""
    return steps_struct[len(steps)].pack(*(st[i] for i in range(4) for st in steps))


# --- decoding the compiled layout ------------------------------------------------------------

_CT_CODES = {ctypes.c_ulonglong: "Q", ctypes.c_longlong: "q", ctypes.c_uint: "I",
             ctypes.c_int: "i", ctypes.c_ushort: "H", ctypes.c_short: "h",
             ctypes.c_ubyte: "B", ctypes.c_char: "c", ctypes.c_byte: "b"}
HEAD_FIELDS = Event._fields[:-1]          # everything but `steps`
_NHEAD = len(HEAD_FIELDS)


def decoder_for(ctype):
    """A struct.Struct plus field order for Event, derived from BCC's ctypes view of tt_event.

    Decoding with struct.unpack_from is several times cheaper than building a ctypes object per
    record, and the layout still comes from the compiled program, never from a copy. The step
    arrays stay bytes (STEP_BYTES): one field when they lie back to back in the header's order,
    as they do, else one per array, which build_event() joins.
    Returns (struct, perm): perm is None when the unpacked tuple is Event's fields in order, else
    the index of each wanted item in the unpacked tuple."""
    fields = dict(ctype._fields_)
    m = fields[STEP_ARRAYS[0]]._length_
    pos = getattr(ctype, STEP_ARRAYS[0]).offset
    blob = True
    for name, width in zip(STEP_ARRAYS, STEP_WIDTHS):
        t = fields[name]
        if t._length_ != m or ctypes.sizeof(t._type_) != width:
            raise ValueError(f"tt_event.{name}: {t._length_} x {ctypes.sizeof(t._type_)} bytes, "
                             f"expected {m} x {width}")
        blob = blob and getattr(ctype, name).offset == pos
        pos += m * width
    spec = []
    names = HEAD_FIELDS + (("steps",) if blob else STEP_ARRAYS)
    for name in names:
        if name == "steps":
            off, code = getattr(ctype, STEP_ARRAYS[0]).offset, f"{m * STEP_BYTES}s"
        else:
            t = fields[name]
            off = getattr(ctype, name).offset
            code = f"{ctypes.sizeof(t)}s" if issubclass(t, ctypes.Array) else _CT_CODES[t]
        spec.append((off, name, code))
    spec.sort()
    fmt, pos, order = "<", 0, []
    for off, name, code in spec:
        if off > pos:
            fmt += f"{off - pos}x"
        fmt += code
        pos = off + struct.calcsize("<" + code)
        order.append(name)
    if ctypes.sizeof(ctype) > pos:
        fmt += f"{ctypes.sizeof(ctype) - pos}x"
    st = struct.Struct(fmt)
    if order == list(Event._fields):
        return st, None
    return st, [order.index(w) for w in names]


def build_event(t, perm=None):
    """Event from an unpacked tt_event (see decoder_for)."""
    if perm is None:
        return Event._make(t)
    v = [t[i] for i in perm]
    if len(v) > _NHEAD + 1:                  # the step arrays apart: join them in order
        v[_NHEAD:] = [b"".join(v[_NHEAD:])]
    return Event._make(v)


# --- fields as text --------------------------------------------------------------------------

def _addr_text(key):
    family, raw = key
    if family == states.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family != states.AF_INET6:
        return None
    s = socket.inet_ntop(socket.AF_INET6, raw[:16])
    if s.startswith("::ffff:") and "." not in s:     # show a mapped v4 peer as ss does
        s = "::ffff:" + socket.inet_ntop(socket.AF_INET, raw[12:16])
    return s


ADDR_TEXT = Memo(_addr_text, limit=100_000)     # (family, 16 raw bytes) -> text, or None


def addr_str(family, raw):
    """Text form of a 16-byte address field; None for a family that is not IPv4 or IPv6."""
    return ADDR_TEXT[(family, raw)]


def endpoints(ev):
    """(laddr, lport, raddr, rport) of a record, in text."""
    family = ev.family
    return ADDR_TEXT[(family, ev.saddr)], ev.sport, ADDR_TEXT[(family, ev.daddr)], ev.dport


def comm_str(raw):
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


# One str per distinct command name: thousands of connections share a handful.
COMM_TEXT = Memo(comm_str)


class Sample(NamedTuple):
    """What the kernel's own tables and counters said at ts_ns, read by a sampler on the tick
    (tcptrace/host/samplers.py): `what` names the sampler, `netns` the network namespace (its
    inode), `data` the reading as plain JSON values. Recorded and replayed as they are, so a
    replay sees what the live run saw."""
    ts_ns: int
    what: str
    netns: int
    data: dict


# Sample.what of the readings of bpf/listen.c's `overflows` map (kernel/source.py), which the
# kernel side takes itself: no sampler of tcptrace/host reads BPF maps.
OVERFLOWS = "overflows"
# Sample.what of the kernel's aggregates of folded connections (kernel/aggregates.py), and the
# shape bits of their keys (bpf/tcptrace.h: TT_AGG_*)
AGG = "agg"
AGG_PASSIVE, AGG_REMOTE, AGG_OTHER = 0x01, 0x02, 0x80
# Sample.what of the running kernel's names for the numbers records carry (reset reasons), sent
# once at start (kernel/source.py): a recording replayed elsewhere reads them as they were.
NAMES = "names"


class Batch(NamedTuple):
    """What a source hands the pipeline at a time: the live kernel every poll, a recording
    every tick it recorded. Both sources yield the same thing, so one loop runs either."""
    records: list             # Events, Losts and Samples, in delivery order
    horizon_ns: int           # the stream is complete up to this time (the clock at the read)
    scanned: list = ()        # STATE records read from the kernel's maps (F_SCAN), after those
    seeds: list = ()          # sockets that existed before start: (family, laddr, lport, raddr,
                              #   rport, state, ts_ns, owner (pid, comm, fd) or None, netns)
