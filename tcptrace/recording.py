"""The recording format (`--record FILE`, `tcptrace replay FILE`): the raw kernel stream as
JSON Lines.

Line 1 is a header; then one object per event or loss in delivery order, the clock's ticks (the
horizon up to which the stream was complete, which replay feeds the pipeline exactly as the live
loop did), records read from the kernel's maps (flagged F_SCAN, after a tick), and the sockets
seeded at start. Human-readable on purpose: recordings get attached to tickets and read with jq.
"""
import ipaddress
import json
import struct
import sys

from tcptrace import errors
from tcptrace.wire import (F_SCAN, Batch, Event, Kind, Lost, Sample, addr_str, comm_str,
                           iter_steps, pack_steps)

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


def sample_to_json(s):
    return json.dumps({"ts_ns": s.ts_ns, "kind": "sample", "what": s.what, "netns": s.netns,
                       "data": s.data}, separators=(",", ":"))


def record_to_json(r):
    """Any record a source yields, as its recording line."""
    t = type(r)
    return lost_to_json(r) if t is Lost else sample_to_json(r) if t is Sample else event_to_json(r)


def addr_bytes(text):
    if text is None:
        return bytes(16)
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def _int(d, key, default=None):
    """d[key] as an int: recordings hold integers only (a float, 1e999 or true is damage)."""
    v = d.get(key, default)
    if v is None:
        raise ValueError(f"no {key}")
    if type(v) is not int:
        raise ValueError(f"{key} is not an integer: {str(v)[:40]}")
    return v


FAMILIES = (0, 2, 10)     # none (a reset sent for a bare socket pointer), AF_INET, AF_INET6


def from_json_obj(d):
    """One recording line (already parsed) -> Event, Lost or Sample. Raises ValueError saying
    what is wrong, in words."""
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    kind = d.get("kind")
    if kind == "sample":
        what, data = d.get("what"), d.get("data")
        if not isinstance(what, str) or not isinstance(data, dict):
            raise ValueError("a sample needs what (a name) and data (an object)")
        return Sample(_int(d, "ts_ns"), what, _int(d, "netns"), data)
    if kind == "lost":
        count, where = _int(d, "count"), d.get("where")
        if not isinstance(where, str):
            raise ValueError("no where")
        return Lost(_int(d, "ts_ns"), count, where)
    if isinstance(kind, str) and kind in Kind.BY_NAME:
        k = Kind.BY_NAME[kind]
    elif type(kind) is int and kind in Kind.NAMES:
        k = kind
    else:
        raise ValueError(f"unknown kind {str(kind)[:40]!r}" if kind is not None else "no kind")
    fam = _int(d, "family", 0)
    if fam not in FAMILIES:
        raise ValueError(f"family {fam} is neither AF_INET (2) nor AF_INET6 (10)")
    steps = d.get("steps") or ()
    if steps:
        if not isinstance(steps, list) or len(steps) > 255 or \
                any(not isinstance(st, list) or len(st) != 4 for st in steps):
            raise ValueError("bad steps")
        steps = [tuple(_int({"step": x}, "step") for x in st) for st in steps]
        if any(not (0 <= st[2] < 16 and 0 <= st[3] < 16) for st in steps):
            raise ValueError("bad steps")
        try:
            packed = pack_steps(steps)
        except struct.error as e:         # a time or pid outside what the kernel's arrays hold
            raise ValueError(f"bad steps: {e}") from None
    old, new = _int(d, "oldstate", 0), _int(d, "newstate", 0)
    if not (0 <= old < 16 and 0 <= new < 16):
        raise ValueError("bad state")
    saddr, daddr = d.get("saddr"), d.get("daddr")
    if fam == 0 and (saddr or daddr):
        raise ValueError("addresses without a family")
    comm = d.get("comm", "")
    if not isinstance(comm, str) or not isinstance(d.get("skaddr", "0"), str):
        raise ValueError("comm and skaddr are strings")
    try:
        saddr, daddr = addr_bytes(saddr), addr_bytes(daddr)
    except (ValueError, TypeError):
        raise ValueError("bad address") from None
    return Event(
        ts_ns=_int(d, "ts_ns"), skaddr=int(d.get("skaddr", "0"), 16), pid=_int(d, "pid", 0),
        tid=_int(d, "tid", 0), err=_int(d, "err", 0), aux=_int(d, "aux", 0),
        sport=_int(d, "sport", 0), dport=_int(d, "dport", 0), kind=k, family=fam,
        oldstate=old, newstate=new, flags=_int(d, "flags", 0), nsteps=len(steps),
        retrans=_int(d, "retrans", 0), saddr=saddr, daddr=daddr, comm=comm.encode()[:16],
        rst_ns=_int(d, "rst_ns", 0), steps=packed if steps else b"")


class Recorder:
    """--record: the stream a source gave, batch by batch, so replay gives the pipeline the
    same batches (RecordingSource)."""

    def __init__(self, path, wall_offset_ns, plan_summary):
        self.path = path
        try:
            self.f = open(path, "w")
        except OSError as e:
            raise errors.OutputError(f"cannot write recording {path}: {e.strerror}") from None
        self._line(json.dumps(recording_header(wall_offset_ns, plan=plan_summary)))

    def _line(self, s):
        self.f.write(s + "\n")

    def write(self, batch):
        try:
            self._write(batch)
        except OSError as e:
            raise errors.OutputError(f"cannot write recording {self.path}: {e.strerror}") \
                from None

    def _write(self, batch):
        for fam, la, lp, ra, rp, st, ts, owner, ns in batch.seeds:
            pid, comm, fd = owner or (None, None, None)
            self._line(json.dumps({"kind": "seed", "ts_ns": ts, "family": fam, "laddr": la,
                                   "lport": lp, "raddr": ra, "rport": rp, "state": st,
                                   "pid": pid, "comm": comm, "fd": fd, "netns": ns}))
        for r in batch.records:
            self._line(record_to_json(r))
        # replay feeds what came before a tick against it, as the live loop did
        self._line(json.dumps({"kind": "tick", "ts_ns": batch.horizon_ns}))
        for r in batch.scanned:
            self._line(event_to_json(r))
        self.f.flush()

    def close(self):
        try:
            self.f.close()
        except OSError as e:
            raise errors.OutputError(f"cannot write recording {self.path}: {e.strerror}") \
                from None


def _seed(d):
    """A seed line -> (family, laddr, lport, raddr, rport, state, ts_ns, owner or None, netns).
    Recordings before the namespace was recorded have none: 0, as their records carry."""
    fam = _int(d, "family")
    if fam not in FAMILIES[1:]:
        raise ValueError(f"family {fam} is neither AF_INET (2) nor AF_INET6 (10)")
    la, ra = d.get("laddr"), d.get("raddr")
    try:
        addr_bytes(la), addr_bytes(ra)
    except (ValueError, TypeError):
        raise ValueError("bad address") from None
    pid, comm, fd = d.get("pid"), d.get("comm"), d.get("fd")
    owner = None
    if pid:
        if type(pid) is not int or not isinstance(comm, (str, type(None))) \
                or type(fd) not in (int, type(None)):
            raise ValueError("bad owner")
        owner = (pid, comm, fd)
    state = _int(d, "state")
    if not 1 <= state <= 12:
        raise ValueError("bad state")
    ns = _int(d, "netns", 0)
    if not 0 <= ns < 1 << 32:
        raise ValueError("bad netns")
    return (fam, la, _int(d, "lport"), ra, _int(d, "rport"), state, _int(d, "ts_ns"), owner, ns)


class RecordingSource:
    """A recording as a source of Batches. A malformed line ends the stream there: what came
    before is still analysed, and `error` names the line."""
    BATCH = 1000        # records fed at most at a time between ticks

    def __init__(self, path):
        if path == "-":
            self.f, self.path = sys.stdin.buffer, "<stdin>"
        else:
            try:
                self.f = open(path, "rb")
            except OSError as e:
                raise errors.NoInput(f"cannot read recording {path}: {e.strerror}") from None
            self.path = path
        self.error = None
        try:
            head = self._parse(self.f.readline(), header=True)
            if not isinstance(head, dict) or head.get("format") != RECORDING_MAGIC:
                raise ValueError("not a tcptrace recording")
            if head.get("version") not in RECORDING_VERSIONS:
                raise ValueError(f"recording version {str(head.get('version'))[:20]} is not one "
                                 f"of {', '.join(map(str, RECORDING_VERSIONS))}")
            if "wall_offset_ns" not in head:
                raise ValueError("the header has no wall_offset_ns")
            self.wall_offset_ns = _int(head, "wall_offset_ns")
        except ValueError as e:
            self.close()
            raise errors.DataError(f"{self.path}:1: {e}") from None
        except OSError as e:
            self.close()
            raise errors.NoInput(f"cannot read recording {self.path}: {e.strerror}") from None

    @staticmethod
    def _parse(raw, header=False):
        """A line's JSON, or ValueError in words."""
        if header and not raw:
            raise ValueError("empty: not a tcptrace recording")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not a tcptrace recording (not UTF-8 text)" if header
                             else "not UTF-8 text") from None
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError("not a tcptrace recording (not JSON)" if header
                             else "not JSON") from None

    def batches(self):
        newest = 0
        batch, seeds = [], []
        lineno = 1
        try:
            for lineno, raw in enumerate(self.f, start=2):
                if not raw.strip():
                    continue
                try:
                    d = self._parse(raw)
                    kind = d.get("kind") if isinstance(d, dict) else None
                    if kind == "tick":
                        newest = max(newest, _int(d, "ts_ns"))
                        yield Batch(batch, newest, seeds=seeds)
                        batch, seeds = [], []
                        continue
                    if kind == "seed":
                        seeds.append(_seed(d))
                        continue
                    rec = from_json_obj(d)
                    if not raw.endswith(b"\n"):
                        raise ValueError("truncated line")
                except ValueError as e:
                    self.error = f"{self.path}:{lineno}: malformed record ({e})"
                    break
                if type(rec) is Event and rec.flags & F_SCAN:
                    # read from the kernel's map after everything before it: as live
                    yield Batch(batch, newest, scanned=[rec], seeds=seeds)
                    batch, seeds = [], []
                    continue
                newest = max(newest, rec.ts_ns)
                batch.append(rec)
                if len(batch) >= self.BATCH:
                    yield Batch(batch, newest, seeds=seeds)
                    batch, seeds = [], []
        except OSError as e:
            self.error = f"{self.path}:{lineno}: read failed ({e.strerror})"
        yield Batch(batch, newest, seeds=seeds)

    def close(self):
        if self.f is not sys.stdin.buffer:
            self.f.close()
