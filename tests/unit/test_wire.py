"""bpf/tcptrace.h is the one wire contract: Python's names and kinds must match it, and the
decoder built from a compiled layout must read the bytes the kernel writes."""
import ctypes
import os
import re

from tcptrace import recording, wire
from tcptrace.wire import Event, Kind
from tcptrace.wire import build_event, decoder_for

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "tcptrace.h")
CTYPES = {"u64": ctypes.c_ulonglong, "u32": ctypes.c_uint, "s32": ctypes.c_int,
          "u16": ctypes.c_ushort, "u8": ctypes.c_ubyte, "char": ctypes.c_char}


def header_struct():
    """ctypes view of struct tt_event, parsed from the header (as BCC would lay it out)."""
    text = open(HEADER).read()
    macros = dict(re.findall(r"#define (TT_\w+)\s+(\d+)\s", text))
    body = re.search(r"struct tt_event \{(.*?)\};", text, re.S).group(1)
    fields = []
    for typ, name, n in re.findall(r"^\s*(u64|u32|s32|u16|u8|char)\s+(\w+)(?:\[(\w+)\])?;", body,
                                   re.M):
        t = CTYPES[typ]
        fields.append((name, t * int(macros.get(n, n)) if n else t))
    return type("tt_event", (ctypes.Structure,), {"_fields_": fields})


def test_event_fields_match_header_members():
    names = [n for n, _ in header_struct()._fields_ if not n.startswith("_")]
    steps = [n for n in names if n.startswith("step_")]
    assert tuple(steps) == wire.STEP_ARRAYS
    assert sorted(n for n in names if n not in steps) == sorted(Event._fields[:-1])
    assert Event._fields[-1] == "steps"


def test_step_layout_is_one_layout():
    """Event.steps' widths, its struct and the header's arrays agree (wire.STEP_WIDTHS)."""
    S = header_struct()
    widths = tuple(ctypes.sizeof(dict(S._fields_)[n]._type_) for n in wire.STEP_ARRAYS)
    assert widths == wire.STEP_WIDTHS
    assert wire.steps_struct[3].size == 3 * wire.STEP_BYTES
    assert list(wire.iter_steps(Event(0, 0, 0, 0, 0, 0, 0, 0, Kind.STATE, 2, 0, 0, 0, b"", b"",
                                        b"", nsteps=2, steps=wire.pack_steps(
                                            [(5, 6, 7, 2), (8, 0, 2, 1), (0, 0, 0, 0)]))))[1] \
        == (8, 0, 2, 1)


def test_max_steps_matches_header():
    assert re.search(r"#define TT_MAX_STEPS\s+(\d+)", open(HEADER).read()).group(1) == \
        str(wire.MAX_STEPS)


def test_kind_constants_match_header():
    text = open(HEADER).read()
    defined = {int(v): k for k, v in re.findall(r"#define TT_(\w+)\s+(\d+)\s", text)
               if k in ("STATE", "RECV_RESET", "SEND_RESET", "SOCK_ERROR", "RETRANS", "CONNECT_RET",
                        "SYNACK")}
    assert {v: k.lower() for v, k in defined.items()} == Kind.NAMES


def test_decoder_reads_what_the_kernel_writes():
    S = header_struct()
    assert ctypes.sizeof(S) % 8 == 0
    raw = S(ts_ns=123456789, skaddr=0xffff888103001280, pid=4321, tid=4322, err=-111, aux=5,
            sport=40000, dport=443, kind=1, family=10, oldstate=7, newstate=2, flags=2)
    raw.saddr[:] = list(recording.addr_bytes("fd77::1"))
    raw.daddr[:] = list(recording.addr_bytes("fd77::2"))
    raw.comm = b"curl"
    raw.nsteps = 2
    raw.retrans = 1
    raw.rst_ns = 77
    raw.step_ts[:2] = [100, 200]
    raw.step_pid[:2] = [4321, 0]
    raw.step_old[:2] = [7, 2]
    raw.step_new[:2] = [2, 1]
    st, perm = decoder_for(S)
    assert st.size == ctypes.sizeof(S)
    ev = build_event(st.unpack(bytes(raw)), perm)
    assert (ev.ts_ns, ev.skaddr, ev.pid, ev.err, ev.sport, ev.dport) == \
        (123456789, 0xffff888103001280, 4321, -111, 40000, 443)
    assert (ev.nsteps, ev.retrans, ev.rst_ns) == (2, 1, 77)
    assert list(wire.iter_steps(ev)) == [(100, 4321, 7, 2), (200, 0, 2, 1)]
    assert wire.addr_str(ev.family, ev.daddr) == "fd77::2"
    assert wire.comm_str(ev.comm) == "curl"


def test_decoder_reorders_when_layout_order_differs():
    fields = list(header_struct()._fields_)
    fields.insert(0, fields.pop([n for n, _ in fields].index("comm")))
    S = type("shuffled", (ctypes.Structure,), {"_fields_": fields})
    fields.insert(1, fields.pop([n for n, _ in fields].index("step_new")))
    S = type("shuffled", (ctypes.Structure,), {"_fields_": fields})
    raw = S(ts_ns=5, pid=9, comm=b"x", nsteps=1)
    raw.step_ts[0] = 5
    raw.step_old[0] = 2
    raw.step_new[0] = 1
    st, perm = decoder_for(S)
    assert perm is not None
    ev = build_event(st.unpack(bytes(raw)), perm)
    assert (ev.ts_ns, ev.pid, wire.comm_str(ev.comm)) == (5, 9, "x")
    assert list(wire.iter_steps(ev)) == [(5, 0, 2, 1)]


def test_recording_round_trip():
    e = Event(1, 0xabc, 2, 3, -110, 4, 5, 6, Kind.SOCK_ERROR, 2, 0, 0, 0,
              recording.addr_bytes("10.0.0.1"), recording.addr_bytes("10.0.0.2"), b"app")
    import json
    back = recording.from_json_obj(json.loads(recording.event_to_json(e)))
    assert back == e._replace(comm=b"app")
    st = Event(9, 0xabc, 2, 3, 0, 0, 5, 6, Kind.STATE, 2, 2, 1, 4,
               recording.addr_bytes("10.0.0.1"), recording.addr_bytes("10.0.0.2"), b"app",
               nsteps=2, retrans=1, rst_ns=0,
               steps=wire.pack_steps([(1, 2, 7, 2), (9, 0, 2, 1)] + [(0, 0, 0, 0)] * 4))
    back = recording.from_json_obj(json.loads(recording.event_to_json(st)))
    assert list(wire.iter_steps(back)) == [(1, 2, 7, 2), (9, 0, 2, 1)]
    assert (back.nsteps, back.retrans) == (2, 1)


def test_map_scanner_says_none_when_the_kernel_cannot_batch():
    """Anything but ENOENT on the first call (EINVAL before 5.6, EBADF, EPERM) means "no batch
    lookup": KernelSource then falls back to BCC's iteration, and says so."""
    from tcptrace.kernel.bpfsys import MapScanner
    assert MapScanner(-1, 8, 8).values() is None
