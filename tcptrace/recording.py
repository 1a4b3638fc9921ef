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

from tcptrace import errors
from tcptrace.wire import (F_SCAN, Batch, Event, Kind, Lost, addr_str, comm_str, iter_steps,
                           pack_steps)

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


def addr_bytes(text):
    if text is None:
        return bytes(16)
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


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


class Recorder:
    """--record: the stream a source gave, batch by batch, so replay gives the pipeline the
    same batches (RecordingSource)."""

    def __init__(self, path, wall_offset_ns, plan_summary):
        try:
            self.f = open(path, "w")
        except OSError as e:
            raise errors.NoInput(f"cannot write recording {path}: {e.strerror}") from None
        self._line(json.dumps(recording_header(wall_offset_ns, plan=plan_summary)))

    def _line(self, s):
        self.f.write(s + "\n")

    def write(self, batch):
        for fam, la, lp, ra, rp, st, ts, owner in batch.seeds:
            pid, comm, fd = owner or (None, None, None)
            self._line(json.dumps({"kind": "seed", "ts_ns": ts, "family": fam, "laddr": la,
                                   "lport": lp, "raddr": ra, "rport": rp, "state": st,
                                   "pid": pid, "comm": comm, "fd": fd}))
        for r in batch.records:
            self._line(lost_to_json(r) if type(r) is Lost else event_to_json(r))
        # replay feeds what came before a tick against it, as the live loop did
        self._line(json.dumps({"kind": "tick", "ts_ns": batch.horizon_ns}))
        for r in batch.scanned:
            self._line(event_to_json(r))
        self.f.flush()

    def close(self):
        self.f.close()


class RecordingSource:
    """A recording as a source of Batches. A malformed line ends the stream there: what came
    before is still analysed, and `error` names the line."""
    BATCH = 1000        # records fed at most at a time between ticks

    def __init__(self, path):
        try:
            self.f = open(path)
        except OSError as e:
            raise errors.NoInput(f"cannot read recording {path}: {e.strerror}") from None
        self.path = path
        self.error = None
        first = self.f.readline()
        try:
            head = json.loads(first)
            if head.get("format") != RECORDING_MAGIC:
                raise ValueError("not a tcptrace recording")
            if head.get("version") not in RECORDING_VERSIONS:
                raise ValueError(f"recording version {head.get('version')} is not one of "
                                 f"{', '.join(map(str, RECORDING_VERSIONS))}")
            self.wall_offset_ns = int(head["wall_offset_ns"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self.f.close()
            raise errors.DataError(f"{path}:1: {e if str(e) else 'bad header'}") from None

    def batches(self):
        newest = 0
        batch, seeds = [], []
        with self.f:
            for lineno, line in enumerate(self.f, start=2):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    kind = d["kind"]
                    ts = int(d["ts_ns"])
                    if kind == "tick":
                        newest = max(newest, ts)
                        yield Batch(batch, newest, seeds=seeds)
                        batch, seeds = [], []
                        continue
                    if kind == "seed":
                        seeds.append((int(d["family"]), d["laddr"], int(d["lport"]), d["raddr"],
                                      int(d["rport"]), int(d["state"]), ts,
                                      (d["pid"], d["comm"], d["fd"]) if d.get("pid") else None))
                        continue
                    rec = from_json_obj(d)
                    if not line.endswith("\n"):
                        raise ValueError("truncated line")
                except (ValueError, KeyError, TypeError) as e:
                    self.error = f"{self.path}:{lineno}: malformed record ({e})"
                    break
                if type(rec) is not Lost and rec.flags & F_SCAN:
                    # read from the kernel's map after everything before it: as live
                    yield Batch(batch, newest, scanned=[rec], seeds=seeds)
                    batch, seeds = [], []
                    continue
                newest = max(newest, rec.ts_ns)
                batch.append(rec)
                if len(batch) >= self.BATCH:
                    yield Batch(batch, newest, seeds=seeds)
                    batch, seeds = [], []
        yield Batch(batch, newest, seeds=seeds)

    def close(self):
        self.f.close()
