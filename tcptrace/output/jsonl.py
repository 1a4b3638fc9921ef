"""JSON Lines: one object per finding, exactly its `to_record()` (tests hold the two together).

This runs for every line on stdout, so records are written from cached pieces rather than built
as dicts and encoded: a finding's owner and local address, its remote address, its type's keys,
and the string, boolean and None members (names and flags: few distinct) are each formatted once;
only times, ports and numbers are formatted per finding.
"""
import json
import typing

from tcptrace import SCHEMA_VERSION, states
from tcptrace.cache import Memo, ObjectMemo
from tcptrace.findings import Conclusion, InferredTransition, Transition, _SEC, _second
from tcptrace.output import Sink

_encode = json.JSONEncoder(separators=(",", ":")).encode
SCALAR = Memo(_encode)                      # a str, bool or None -> its JSON
KEY = Memo(lambda k: f",{_encode(k)}:")     # a member's name -> `,"name":`
MEMBER = Memo(lambda kv: KEY[kv[0]] + SCALAR[kv[1]])    # (name, str|bool|None) -> the member
LIST = ObjectMemo(_encode)                  # a path list, shared between findings, never changed
HEAD = Memo(lambda t: f'{{"schema":{SCHEMA_VERSION},"type":"{t}","time":"')


def _near(key):
    pid, comm, family, laddr = key
    js = SCALAR
    return (f'","pid":{"null" if pid is None else pid},"comm":{js[comm]},'
            f'"family":{js[states.FAMILY_NAMES.get(family)]},"laddr":{js[laddr]},"lport":')


# The endpoints in two pieces around the ports: the local side with the owner (few distinct on
# a host: its processes and addresses), and the remote address.
NEAR = Memo(_near)                                    # (pid, comm, family, laddr)
FAR = Memo(lambda raddr: f',"raddr":{SCALAR[raddr]},"rport":')


def _flags(key):
    partial, incomplete, evicted, role = key
    return ((MEMBER[("partial", True)] if partial else "")
            + (MEMBER[("incomplete", True)] if incomplete else "")
            + (MEMBER[("evicted", True)] if evicted else "") + MEMBER[("role", role)])


FLAGS = Memo(_flags)     # a Conclusion's (partial, incomplete, evicted, role) -> their members


def member(k, v):
    t = type(v)
    if t is int:
        return f"{KEY[k]}{v}"
    if t is str or t is bool or v is None:
        return MEMBER[(k, v)]
    if t is list:
        return KEY[k] + LIST.of(v)
    return KEY[k] + _encode(v)


def _value(v, kind):
    """The expression that writes member value `v` as member() would, given the type its
    class declares for it (findings.py): a number or None as is, a name (few distinct) from
    SCALAR, a path list from LIST; a member declared otherwise asks its value's type (a fifth of
    a close line's cost went to asking each of its five)."""
    if kind in (int, int | None):
        return f'"null" if {v} is None else {v}'
    if kind in (str, bool, str | None, bool | None):
        return f"SCALAR[{v}]"
    if kind is list:
        return f"LIST.of({v})"
    return (f"{v} if type({v}) is int else SCALAR[{v}] if type({v}) is str or type({v}) is bool "
            f"or {v} is None else LIST.of({v}) if type({v}) is list else _encode({v})")


def _compile(cls):
    """The whole line of a Conclusion type, as one function generated from its OWN (as
    dataclasses generate their methods): the common head, its members, then its flags. Written
    out per type because a loop over members, with a call per member, cost a fifth of a line;
    each member's value is written as member() would, inline."""
    own = "".join(f"    v{i} = f.{name}\n" for i, name in enumerate(cls.OWN))
    kinds = typing.get_type_hints(cls)
    members = "".join(f"{{K{i}}}{{{_value(f'v{i}', kinds.get(name))}}}"
                      for i, name in enumerate(cls.OWN))
    src = ("def line(f, w):\n"
           "    sec, ns = divmod(f.ts_ns + w, 1_000_000_000)\n"
           f"    lport, rport = f.lport, f.rport\n{own}"
           "    return (f'{H}{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z'\n"
           "            f'{NEAR[(f.pid, f.comm, f.family, f.laddr)]}'\n"
           "            f'{\"null\" if lport is None else lport}{FAR[f.raddr]}'\n"
           "            f'{\"null\" if rport is None else rport}'\n"
           f"            f'{members}'\n"
           "            f'{FLAGS[(f.partial, f.incomplete, f.evicted, f.role)]}}}')\n")
    scope = {"LIST": LIST, "_encode": _encode, "FLAGS": FLAGS, "SCALAR": SCALAR, "NEAR": NEAR,
             "FAR": FAR,
             "_SEC": _SEC, "_second": _second, "H": HEAD[cls.TYPE]}
    scope.update((f"K{i}", KEY[name]) for i, name in enumerate(cls.OWN))
    exec(src, scope)
    return scope["line"]


def _ends_json(e):
    """A transition's owner and endpoints (shared by its connection's transitions), and its
    skaddr value."""
    lport, rport = e.lport, e.rport
    return (f'{NEAR[(e.pid, e.comm, e.family, e.laddr)]}{"null" if lport is None else lport}'
            f'{FAR[e.raddr]}{"null" if rport is None else rport}', f'"{e.sk:x}"')


# Keyed by the Ends itself: it hashes by identity, and the key keeps it alive while cached.
# A connection's transitions come close together, so a small cache hits as often as a big
# one, and does not keep thousands of dead connections' Ends and lines in the CPU's caches.
ENDS = Memo(_ends_json, limit=1024)
PAIR = Memo(lambda k: (f',"oldstate":"{states.name(k >> 8)}",'
                       f'"newstate":"{states.name(k & 0xff)}","skaddr":'))
TRANSITION_HEAD = HEAD["transition"]


def _transition(f, w):
    sec, ns = divmod(f.ts_ns + w, 1_000_000_000)
    ends, sk = ENDS[f.ends]
    return (f'{TRANSITION_HEAD}{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z'
            f'{ends}{PAIR[f.pair]}{sk}}}')


BY = Memo(lambda by: f',"inferred":true,"by":{SCALAR[by]}}}')


def _inferred(f, w):
    """An InferredTransition: a transition's line, then its own two members."""
    sec, ns = divmod(f.ts_ns + w, 1_000_000_000)
    ends, sk = ENDS[f.ends]
    return (f'{TRANSITION_HEAD}{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z'
            f'{ends}{PAIR[f.pair]}{sk}{BY[f.by]}')


def _finding(f, w):
    sec, ns = divmod(f.ts_ns + w, 1_000_000_000)
    lport, rport = f.lport, f.rport
    return (f'{HEAD[f.type]}{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z'
            f'{NEAR[(f.pid, f.comm, f.family, f.laddr)]}{"null" if lport is None else lport}'
            f'{FAR[f.raddr]}{"null" if rport is None else rport}'
            + "".join([member(k, v) for k, v in f.extra.items()]) + "}")


# A finding's type -> the function writing its line
LINE = Memo(lambda cls: _transition if cls is Transition else _inferred
            if cls is InferredTransition else _compile(cls) if issubclass(cls, Conclusion)
            else _finding)


def encode(f, wall_offset_ns):
    """The JSON text of f.to_record(wall_offset_ns)."""
    return LINE[type(f)](f, wall_offset_ns)


class JsonSink(Sink):
    def format(self, findings):
        w = self.wall_offset_ns
        # joined by newlines, not each line copied with its own: lines are ~300 bytes
        line = LINE
        return "\n".join([line[type(f)](f, w) for f in findings]) + "\n"
