"""One schema for everything tcptrace concludes. Detectors build Findings; sinks only format them.

`to_record()` is the JSON contract (docs/tcptrace.schema.json): every record carries `schema`,
`type`, `time` (RFC 3339, UTC, microseconds), the owning process and both endpoints; durations are
integer nanoseconds named *_ns.
"""
import datetime
import json

from tcptrace import SCHEMA_VERSION, states
from tcptrace.events import memo

_encode = json.JSONEncoder(separators=(",", ":")).encode
# JSON of the strings, booleans and None that records carry (names, addresses, commands): a
# handful of distinct ones. The hot loop in _extra_json reads the dict inline.
_SCALARS = {None: "null", True: "true", False: "false"}


def _scalar_json(v):
    j = _SCALARS.get(v)
    if j is None:
        if len(_SCALARS) > 10_000:
            _SCALARS.clear()
            _SCALARS.update({None: "null", True: "true", False: "false"})
        j = _SCALARS[v] = _encode(v)
    return j


def _cached(cache, key, make, limit=10_000):
    """Fill-in for the formatting caches below, which the hot path reads inline (a dict.get, no
    call) and calls this only on a miss. Emptied past `limit`: a busy host repeats few values."""
    if len(cache) >= limit:
        cache.clear()
    j = cache[key] = make(key)
    return j


def _near(key):
    pid, comm, family, laddr = key
    js = _scalar_json
    return (f'","pid":{"null" if pid is None else pid},"comm":{js(comm)},'
            f'"family":{js(states.FAMILY_NAMES.get(family))},"laddr":{js(laddr)},"lport":')


def _far(raddr):
    return f',"raddr":{_scalar_json(raddr)},"rport":'


# The endpoints as JSON in two pieces around the ports, cached apart: the local side with the
# owner (few distinct on a host: its processes and addresses) and the remote address. Ports vary
# by connection, so a cache keyed by the whole tuple missed for most findings.
_NEAR = {}      # (pid, comm, family, laddr) -> from the time's closing quote to `"lport":`
_FAR = {}       # raddr -> `,"raddr":...,"rport":`
_HEADS = {}     # type -> up to the time's opening quote
# `"key":` for the extras' names: a handful of distinct ones, looked up inline (a dict.get, no
# call) since this runs for every member of every finding.
_KEYS = {}
_LISTS = {}     # a path list is shared between findings and never modified: keyed by identity


def _extra_json(extra):
    """`extra` as JSON members, each led by a comma: the values findings carry (int, str, bool,
    None, lists of names) formatted directly, anything else by the JSON encoder."""
    out = []
    for k, v in extra.items():
        kj = _KEYS.get(k)
        if kj is None:
            if len(_KEYS) > 1000:
                _KEYS.clear()
            kj = _KEYS[k] = "," + _encode(k) + ":"
        t = type(v)
        if t is int:
            out.append(f"{kj}{v}")
            continue
        if t is str or t is bool or v is None:
            vj = _SCALARS.get(v) or _scalar_json(v)
        elif t is list:
            j = _LISTS.get(id(v))
            if j is None or j[0] is not v:
                if len(_LISTS) > 10_000:
                    _LISTS.clear()
                j = _LISTS[id(v)] = (v, _encode(v))
            vj = j[1]
        else:
            vj = _encode(v)
        out.append(kj + vj)
    return "".join(out)


TYPES = ("connect", "accept", "refused", "failed", "reset", "close", "stuck", "unstuck",
         "transition", "lost")


_SEC = [None, ""]


def rfc3339(wall_ns):
    """RFC 3339, UTC, microseconds. The seconds part is formatted once per second: this runs for
    every record."""
    sec, ns = divmod(wall_ns, 1_000_000_000)
    if _SEC[0] != sec:
        _SEC[0] = sec
        _SEC[1] = datetime.datetime.fromtimestamp(sec, tz=datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S")
    return f"{_SEC[1]}.{ns // 1000:06d}Z"


class Finding:
    __slots__ = ("type", "ts_ns", "pid", "comm", "family", "laddr", "lport", "raddr", "rport",
                 "extra")

    def __init__(self, type, ts_ns, pid=None, comm=None, family=None, laddr=None, lport=None,
                 raddr=None, rport=None, **extra):
        self._common(type, ts_ns, pid, comm, family, laddr, lport, raddr, rport)
        self.extra = extra

    def _common(self, type, ts_ns, pid, comm, family, laddr, lport, raddr, rport):
        self.type = type
        self.ts_ns = ts_ns
        self.pid = pid
        self.comm = comm
        self.family = family
        self.laddr = laddr
        self.lport = lport
        self.raddr = raddr
        self.rport = rport

    @classmethod
    def of(cls, type, ts_ns, pid, comm, family, laddr, lport, raddr, rport, extra):
        """As the constructor, with `extra` a dict taken as it is (the tracker's hot path)."""
        f = cls.__new__(cls)
        f.type, f.ts_ns, f.pid, f.comm, f.family = type, ts_ns, pid, comm, family
        f.laddr, f.lport, f.raddr, f.rport, f.extra = laddr, lport, raddr, rport, extra
        return f

    def __getattr__(self, name):          # only called for names not in __slots__
        if name == "extra":
            raise AttributeError(name)
        try:
            return self.extra[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_record(self, wall_offset_ns):
        rec = {"schema": SCHEMA_VERSION, "type": self.type,
               "time": rfc3339(self.ts_ns + wall_offset_ns), "pid": self.pid, "comm": self.comm,
               "family": states.FAMILY_NAMES.get(self.family), "laddr": self.laddr,
               "lport": self.lport, "raddr": self.raddr, "rport": self.rport}
        rec.update(self.extra)
        return rec

    def _head(self, wall_offset_ns):
        """The fixed fields as JSON, without the closing brace. This runs for every record on
        stdout: the constant pieces come from caches, only the time and ports are formatted."""
        near = _NEAR.get((self.pid, self.comm, self.family, self.laddr)) \
            or _cached(_NEAR, (self.pid, self.comm, self.family, self.laddr), _near)
        far = _FAR.get(self.raddr) or _cached(_FAR, self.raddr, _far)
        head = _HEADS.get(self.type) or _cached(
            _HEADS, self.type, lambda t: f'{{"schema":{SCHEMA_VERSION},"type":"{t}","time":"')
        lport, rport = self.lport, self.rport
        return (f'{head}{rfc3339(self.ts_ns + wall_offset_ns)}{near}'
                f'{"null" if lport is None else lport}{far}{"null" if rport is None else rport}')

    def to_json(self, wall_offset_ns):
        """The same object as to_record(), serialized without building it."""
        head = self._head(wall_offset_ns)
        return head + _extra_json(self.extra) + "}" if self.extra else head + "}"

    def __repr__(self):
        return f"Finding({self.type}, {self.laddr}:{self.lport}->{self.raddr}:{self.rport}, {self.extra})"


class Transition(Finding):
    """A raw state transition (--transitions): one per kernel event, so built without an extra
    dict and serialized with a per-state-pair suffix cached once."""
    __slots__ = ("_old", "_new", "_sk")     # f.oldstate etc. read as names, through extra

    def __init__(self, ts_ns, pid, comm, family, laddr, lport, raddr, rport, old, new, skaddr):
        self._common("transition", ts_ns, pid, comm, family, laddr, lport, raddr, rport)
        self._old = old
        self._new = new
        self._sk = skaddr

    @property
    def extra(self):
        return {"oldstate": states.name(self._old), "newstate": states.name(self._new),
                "skaddr": f"{self._sk:x}"}

    def to_json(self, wall_offset_ns):
        return (f'{self._head(wall_offset_ns)}{_pair_json(self._old << 8 | self._new)}'
                f'"{self._sk:x}"}}')


_pair_json = memo(lambda k: f',"oldstate":"{states.name(k >> 8)}",'
                            f'"newstate":"{states.name(k & 0xff)}","skaddr":')
