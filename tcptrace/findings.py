"""One schema for everything tcptrace concludes. Detectors build Findings; sinks only format them.

`to_record()` is the JSON contract (docs/tcptrace.schema.json): every record carries `schema`,
`type`, `time` (RFC 3339, UTC, microseconds), the owning process and both endpoints; durations are
integer nanoseconds named *_ns.
"""
import datetime
import json
import operator

from tcptrace import SCHEMA_VERSION, states

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
_KEYS = {}      # an extra's name -> `,"name":`
# An extra's name and string, boolean or None value -> the whole member: those values are names
# and flags (role, closed_by, reason, errno...), few distinct. Ints are never keys here: 1 would
# find True's member.
_MEMBERS = {}
_LISTS = {}     # a path list is shared between findings and never modified: keyed by identity


def _key_json(k):
    return "," + _encode(k) + ":"


def _member_json(kv):
    return _key_json(kv[0]) + _scalar_json(kv[1])


def _list_json(v):
    j = _LISTS.get(id(v))
    if j is None or j[0] is not v:
        j = _cached(_LISTS, id(v), lambda _: (v, _encode(v)))
    return j[1]


TYPES = ("connect", "accept", "refused", "failed", "reset", "close", "stuck", "unstuck",
         "transition", "lost")


_SEC = [None, ""]     # the second last formatted, and its text


def _second(sec):
    _SEC[0] = sec
    _SEC[1] = datetime.datetime.fromtimestamp(sec, tz=datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S")
    return _SEC[1]


def rfc3339(wall_ns):
    """RFC 3339, UTC, microseconds. The seconds part is formatted once per second: this runs for
    every record."""
    sec, ns = divmod(wall_ns, 1_000_000_000)
    return f"{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z"


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
        # One store per statement: the tuple assignment builds and unpacks a tuple (slower)
        f.type = type
        f.ts_ns = ts_ns
        f.pid = pid
        f.comm = comm
        f.family = family
        f.laddr = laddr
        f.lport = lport
        f.raddr = raddr
        f.rport = rport
        f.extra = extra
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

    def to_json(self, wall_offset_ns):
        """The same object as to_record(), serialized without building it. This runs for every
        record on stdout, in one piece (no calls but _members'): the constant parts come from
        caches, only the time, the ports and the extras' values are formatted."""
        sec, ns = divmod(self.ts_ns + wall_offset_ns, 1_000_000_000)
        near = _NEAR.get((self.pid, self.comm, self.family, self.laddr)) \
            or _cached(_NEAR, (self.pid, self.comm, self.family, self.laddr), _near)
        far = _FAR.get(self.raddr) or _cached(_FAR, self.raddr, _far)
        head = _HEADS.get(self.type) or _cached(
            _HEADS, self.type, lambda t: f'{{"schema":{SCHEMA_VERSION},"type":"{t}","time":"')
        lport, rport = self.lport, self.rport
        return (f'{head}{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z{near}'
                f'{"null" if lport is None else lport}{far}{"null" if rport is None else rport}'
                f'{self._members()}}}')

    def _members(self):
        """`extra` as JSON members, each led by a comma: the values findings carry (int, str,
        bool, None, lists of names) formatted directly, anything else by the JSON encoder."""
        out = []
        for k, v in self.extra.items():
            t = type(v)
            if t is int:
                out.append(f"{_KEYS.get(k) or _cached(_KEYS, k, _key_json)}{v}")
            elif t is str or t is bool or v is None:
                out.append(_MEMBERS.get((k, v)) or _cached(_MEMBERS, (k, v), _member_json))
            elif t is list:
                out.append((_KEYS.get(k) or _cached(_KEYS, k, _key_json)) + _list_json(v))
            else:
                out.append((_KEYS.get(k) or _cached(_KEYS, k, _key_json)) + _encode(v))
        return "".join(out)

    def __repr__(self):
        return f"Finding({self.type}, {self.laddr}:{self.lport}->{self.raddr}:{self.rport}, {self.extra})"


class Conclusion(Finding):
    """connect, accept and close: the findings every connection yields, so made and formatted
    without a dict of extras (on stdout, the dict and its keys' formatting were a third of a
    finding's cost, and a close's, holding its path list, was one more object for the garbage
    collector to track while findings wait for time order). The extras are slots, formatted by
    a fixed template per type; `extra` builds them into a new dict on each read, as Transition
    does. Their order is Tracker._finding's: the type's own, then partial and incomplete when
    true, then role."""
    # partial, incomplete and role apart, not as one tuple: a tuple held per finding would be
    # one more object for the garbage collector to count
    __slots__ = ("_a", "_b", "_c", "_partial", "_incomplete", "_role")
    TYPE = None

    def __init__(self, ts_ns, pid, comm, family, laddr, lport, raddr, rport, partial,
                 incomplete, role, a=None, b=None, c=None):
        # stored here, not through _common: one call less for every connection
        self.type = self.TYPE
        self.ts_ns = ts_ns
        self.pid = pid
        self.comm = comm
        self.family = family
        self.laddr = laddr
        self.lport = lport
        self.raddr = raddr
        self.rport = rport
        self._partial = partial
        self._incomplete = incomplete
        self._role = role
        self._a = a
        self._b = b
        self._c = c

    @property
    def extra(self):
        x = self._own()
        if self._partial:
            x["partial"] = True
        if self._incomplete:
            x["incomplete"] = True
        x["role"] = self._role
        return x

    def parts(self):
        """(a, b, partial, incomplete): the type's own values, in _own's order, and the flags,
        for a sink that formats these types itself without building `extra`."""
        return self._a, self._b, self._partial, self._incomplete

    def _tail(self):
        k = (self._partial, self._incomplete, self._role)
        return _TAILS.get(k) or _cached(_TAILS, k, _tail_json)


def _tail_json(tail):
    partial, incomplete, role = tail
    return ((_member_json(("partial", True)) if partial else "")
            + (_member_json(("incomplete", True)) if incomplete else "")
            + _member_json(("role", role)))


_TAILS = {}     # (partial, incomplete, role) -> their members: a handful of distinct ones


class Connect(Conclusion):
    __slots__ = ()
    TYPE = "connect"

    def _own(self):
        return {"handshake_ns": self._a, "syn_retransmits": self._b}

    def _members(self):     # both are ints: formatted as they are
        return f',"handshake_ns":{self._a},"syn_retransmits":{self._b}{self._tail()}'


class Accept(Conclusion):
    __slots__ = ()
    TYPE = "accept"

    def _own(self):
        return {}

    def _members(self):
        return self._tail()


class Close(Conclusion):
    __slots__ = ()
    TYPE = "close"

    def _own(self):
        return {"duration_ns": self._a, "closed_by": self._b, "path": self._c}

    def _members(self):     # an int or None, a name or None, a list of names
        d, by = self._a, self._b
        return (f',"duration_ns":{"null" if d is None else d},'
                f'"closed_by":{_SCALARS.get(by) or _scalar_json(by)},"path":{_list_json(self._c)}'
                f'{self._tail()}')


class Ends:
    """A socket and its owner as its transitions show them. A connection's transitions share
    one (a new one when the owner or the tuple changes: lifecycle.Tracker._ends), so it is made
    once per connection rather than per transition, and formatted once: `json` and `text` are
    the sinks' renderings of it, filled on first use. With --transitions, most lines are
    transitions, and their owner and tuple had been most of their cost."""
    __slots__ = ("pid", "comm", "family", "laddr", "lport", "raddr", "rport", "sk", "json",
                 "jtail", "text")

    def __init__(self, pid, comm, family, laddr, lport, raddr, rport, sk):
        self.pid = pid
        self.comm = comm
        self.family = family
        self.laddr = laddr
        self.lport = lport
        self.raddr = raddr
        self.rport = rport
        self.sk = sk
        self.json = self.jtail = self.text = None

    def render_json(self):
        """From the time's closing quote to `"oldstate":`'s comma; jtail: the skaddr value on."""
        lport, rport = self.lport, self.rport
        key = (self.pid, self.comm, self.family, self.laddr)
        self.jtail = f'"{self.sk:x}"}}'
        j = self.json = (f'{_NEAR.get(key) or _cached(_NEAR, key, _near)}'
                         f'{"null" if lport is None else lport}'
                         f'{_FAR.get(self.raddr) or _cached(_FAR, self.raddr, _far)}'
                         f'{"null" if rport is None else rport}')
        return j


def _ends_field(name):
    get = operator.attrgetter(name)
    return property(lambda self: get(self.ends), doc=f"the transition's {name}, from its Ends")


class Transition(Finding):
    """A raw state transition (--transitions): one per kernel event, so made of its time, its
    state pair and the connection's shared Ends, and serialized from their cached pieces."""
    __slots__ = ("ends", "pair")   # its Ends; oldstate << 8 | newstate (for the sinks)
    type = "transition"            # the base's slots below are not used: read through ends
    pid = _ends_field("pid")
    comm = _ends_field("comm")
    family = _ends_field("family")
    laddr = _ends_field("laddr")
    lport = _ends_field("lport")
    raddr = _ends_field("raddr")
    rport = _ends_field("rport")

    def __init__(self, ts_ns, ends, pair):
        self.ts_ns = ts_ns
        self.ends = ends
        self.pair = pair

    @classmethod
    def of(cls, ts_ns, pid, comm, family, laddr, lport, raddr, rport, old, new, skaddr):
        """One transition with Ends of its own (tests, and anything not on a hot path)."""
        return cls(ts_ns, Ends(pid, comm, family, laddr, lport, raddr, rport, skaddr),
                   old << 8 | new)

    @property
    def extra(self):
        k = self.pair
        return {"oldstate": states.name(k >> 8), "newstate": states.name(k & 0xff),
                "skaddr": f"{self.ends.sk:x}"}

    def to_json(self, wall_offset_ns):
        """Finding.to_json with this type's head and members inlined (so it has no _members):
        with --transitions this runs for most lines."""
        sec, ns = divmod(self.ts_ns + wall_offset_ns, 1_000_000_000)
        e = self.ends
        k = self.pair
        return (f'{_TRANSITION_HEAD}{_SEC[1] if _SEC[0] == sec else _second(sec)}.'
                f'{ns // 1000:06d}Z{e.json or e.render_json()}{_PAIRJ.get(k) or _pair_json(k)}'
                f'{e.jtail}')


_PAIRJ = {}      # oldstate << 8 | newstate -> its members, up to the skaddr value
_TRANSITION_HEAD = f'{{"schema":{SCHEMA_VERSION},"type":"transition","time":"'


def _pair_json(k):
    j = _PAIRJ.get(k)
    if j is None:
        j = _PAIRJ[k] = (f',"oldstate":"{states.name(k >> 8)}",'
                         f'"newstate":"{states.name(k & 0xff)}","skaddr":')
    return j
