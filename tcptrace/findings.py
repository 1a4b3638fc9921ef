"""One schema for everything tcptrace concludes. Detectors build findings; sinks only format them.

`to_record()` is the JSON contract (docs/tcptrace.schema.json): every record carries `schema`,
`type`, `time` (RFC 3339, UTC, microseconds), the owning process and both endpoints, then the
finding's own members; durations are integer nanoseconds named *_ns. A finding's own members are
`extra` (a dict), or, for the types every connection yields (connect, accept, close), slots named
in `OWN`, so that the commonest findings cost no dict until a sink asks for one.
"""
import datetime
import operator

from tcptrace import SCHEMA_VERSION, states

TYPES = ("connect", "accept", "refused", "failed", "reset", "close", "stuck", "unstuck",
         "transition", "lost", "evicted", "time_wait", "port_pressure", "time_wait_overflow",
         "listen_pressure", "listen_recovered")
COMMON = ("pid", "comm", "family", "laddr", "lport", "raddr", "rport")

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


class Endpoints:
    """A socket's owner and both ends: what every finding, and a transition's Ends, names."""
    __slots__ = COMMON

    def _set_endpoints(self, pid, comm, family, laddr, lport, raddr, rport):
        self.pid = pid
        self.comm = comm
        self.family = family
        self.laddr = laddr
        self.lport = lport
        self.raddr = raddr
        self.rport = rport


class Finding(Endpoints):
    __slots__ = ("type", "ts_ns", "extra")

    def __init__(self, type, ts_ns, pid=None, comm=None, family=None, laddr=None, lport=None,
                 raddr=None, rport=None, **extra):
        self.type = type
        self.ts_ns = ts_ns
        self._set_endpoints(pid, comm, family, laddr, lport, raddr, rport)
        self.extra = extra

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

    def __repr__(self):
        return (f"Finding({self.type}, {self.laddr}:{self.lport}->{self.raddr}:{self.rport}, "
                f"{self.extra})")


class Conclusion(Finding):
    """connect, accept and close: the findings every connection yields. Their members are slots,
    named in OWN (each with the type its values always have: the JSON sink writes them by it),
    then the flags every connection finding carries: partial, incomplete and evicted (only when
    true) and role. `extra` builds them into a new dict on each read."""
    __slots__ = ("partial", "incomplete", "evicted", "role")
    TYPE = None
    OWN = ()

    def __init_subclass__(cls, **kw):
        """Give each type a constructor that stores its own slots directly, as dataclasses
        generate theirs: a loop of setattr calls cost about 2% of the tracer per connection."""
        super().__init_subclass__(**kw)
        params = ", ".join(cls.OWN)
        body = "".join(f"    self.{n} = {n}\n" for n in ("ts_ns",) + COMMON
                       + ("partial", "incomplete", "role") + cls.OWN) + "    self.evicted = False\n"
        src = (f"def __init__(self, ts_ns, pid, comm, family, laddr, lport, raddr, rport, "
               f"partial, incomplete, role{', ' if params else ''}{params}):\n"
               f"    self.type = {cls.TYPE!r}\n{body}")
        scope = {}
        exec(src, scope)
        cls.__init__ = scope["__init__"]

    @property
    def extra(self):
        x = dict(zip(self.OWN, self.own()))
        if self.partial:
            x["partial"] = True
        if self.incomplete:
            x["incomplete"] = True
        if self.evicted:
            x["evicted"] = True
        x["role"] = self.role
        return x

    def own(self):
        """The values of OWN, in order."""
        return tuple(getattr(self, n) for n in self.OWN)


class Connect(Conclusion):
    __slots__ = ("handshake_ns", "syn_retransmits")
    TYPE = "connect"
    OWN = __slots__
    handshake_ns: int
    syn_retransmits: int


class Accept(Conclusion):
    __slots__ = ()
    TYPE = "accept"


class Close(Conclusion):
    """time_wait: the socket's last step is one after which the kernel puts a timewait sock in
    its place (inferred: detect/timewait.py); time_wait_ns: how long that stays, from the close
    (TCP_TIMEWAIT_LEN), or None."""
    __slots__ = ("duration_ns", "closed_by", "path", "time_wait", "time_wait_ns")
    TYPE = "close"
    OWN = __slots__
    duration_ns: int | None
    closed_by: str | None
    path: list
    time_wait: bool
    time_wait_ns: int | None


class Ends(Endpoints):
    """A socket and its owner as its transitions show them. A connection's transitions share
    one (a new one when the owner or the tuple changes: detect/transitions.py), so sinks can
    format it once per connection rather than once per transition."""
    __slots__ = ("sk",)

    def __init__(self, pid, comm, family, laddr, lport, raddr, rport, sk):
        self._set_endpoints(pid, comm, family, laddr, lport, raddr, rport)
        self.sk = sk


def _ends_field(name):
    get = operator.attrgetter(name)
    return property(lambda self: get(self.ends), doc=f"the transition's {name}, from its Ends")


class Transition(Finding):
    """A raw state transition (--transitions): one per kernel transition, so made of its time,
    its state pair and the connection's shared Ends."""
    __slots__ = ("ends", "pair")   # its Ends; oldstate << 8 | newstate
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
    def oldstate(self):
        return states.name(self.pair >> 8)

    @property
    def newstate(self):
        return states.name(self.pair & 0xff)

    @property
    def skaddr(self):
        return f"{self.ends.sk:x}"

    @property
    def extra(self):
        return {"oldstate": self.oldstate, "newstate": self.newstate, "skaddr": self.skaddr}


class InferredTransition(Transition):
    """A step no tracepoint reports, inferred (--transitions): into TIME_WAIT, where the kernel
    replaces a closing socket by a timewait sock, and out of it, when a sock_diag dump no
    longer shows that sock (`by` "sock_diag") or its 60 s are over and no dump ever showed it
    (`by` "rule"). Its skaddr is the closed socket's: the timewait sock has no other name here."""
    __slots__ = ("by",)

    def __init__(self, ts_ns, ends, pair, by):
        super().__init__(ts_ns, ends, pair)
        self.by = by

    @property
    def extra(self):
        return {"oldstate": self.oldstate, "newstate": self.newstate, "skaddr": self.skaddr,
                "inferred": True, "by": self.by}
