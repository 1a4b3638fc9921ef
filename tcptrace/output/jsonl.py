"""JSON Lines: one object per finding, exactly its `to_record()` (tests hold the two together).

This runs for every line on stdout, so records are written from cached pieces rather than built
as dicts and encoded: a finding's owner and local address, its remote address, its type's keys,
and the string, boolean and None members (names and flags: few distinct) are each formatted once;
only times, ports and numbers are formatted per finding.
"""
import json
import operator

from tcptrace import SCHEMA_VERSION, states
from tcptrace.cache import Memo, ObjectMemo
from tcptrace.findings import Conclusion, Transition, _SEC, _second
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


def _own_getter(cls):
    """A Conclusion type's OWN values as a tuple, however many there are."""
    if not cls.OWN:
        return lambda f: ()
    get = operator.attrgetter(*cls.OWN)
    return get if len(cls.OWN) > 1 else (lambda f: (get(f),))


OWN = Memo(lambda cls: (cls.OWN, _own_getter(cls)))


def _ends_json(e):
    """A transition's owner and endpoints (shared by its connection's transitions), and its
    closing skaddr member."""
    lport, rport = e.lport, e.rport
    return (f'{NEAR[(e.pid, e.comm, e.family, e.laddr)]}{"null" if lport is None else lport}'
            f'{FAR[e.raddr]}{"null" if rport is None else rport}', f'"{e.sk:x}"}}')


ENDS = ObjectMemo(_ends_json)
PAIR = Memo(lambda k: (f',"oldstate":"{states.name(k >> 8)}",'
                       f'"newstate":"{states.name(k & 0xff)}","skaddr":'))


def encode(f, wall_offset_ns):
    """The JSON text of f.to_record(wall_offset_ns)."""
    sec, ns = divmod(f.ts_ns + wall_offset_ns, 1_000_000_000)
    time = f'{_SEC[1] if _SEC[0] == sec else _second(sec)}.{ns // 1000:06d}Z'
    cls = type(f)
    if cls is Transition:
        ends, tail = ENDS.of(f.ends)
        return f'{HEAD["transition"]}{time}{ends}{PAIR[f.pair]}{tail}'
    lport, rport = f.lport, f.rport
    head = (f'{HEAD[f.type]}{time}{NEAR[(f.pid, f.comm, f.family, f.laddr)]}'
            f'{"null" if lport is None else lport}{FAR[f.raddr]}'
            f'{"null" if rport is None else rport}')
    if isinstance(f, Conclusion):
        names, get = OWN[cls]
        return (head + "".join([member(k, v) for k, v in zip(names, get(f))])
                + FLAGS[(f.partial, f.incomplete, f.evicted, f.role)] + "}")
    return head + "".join([member(k, v) for k, v in f.extra.items()]) + "}"


class JsonSink(Sink):
    def format(self, findings):
        w = self.wall_offset_ns
        # joined by newlines, not each line copied with its own: lines are ~300 bytes
        return "\n".join([encode(f, w) for f in findings]) + "\n"
