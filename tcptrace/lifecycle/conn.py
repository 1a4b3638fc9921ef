"""A connection: one generation of one socket, as the lifecycle rebuilds it."""
from tcptrace import states as S
from tcptrace.cache import Memo

ACTIVE, PASSIVE, LISTENER = "active", "passive", "listener"


class Conn:
    __slots__ = ("id", "skaddr", "family", "laddr", "lport", "raddr", "rport", "role",
                 "opened_ns", "established_ns", "state", "since_ns", "path", "pid", "comm",
                 "owner_sure", "syn_retrans", "recv_reset_ns", "send_reset_ns", "error",
                 "first_fin", "partial", "incomplete", "preexisting", "stuck_state", "closed_ns",
                 "fd", "epoch", "scan_ts", "tkey", "ends", "evicted", "netns")

    def __init__(self, cid, skaddr, family, role, state, ts_ns, partial=False, epoch=0):
        self.id = cid
        self.epoch = epoch          # the tracker's loss epoch when this generation began
        self.skaddr = skaddr
        self.family = family
        self.laddr = self.raddr = None
        self.lport = self.rport = 0
        self.role = role
        self.opened_ns = None if partial else ts_ns
        self.established_ns = None
        self.state = state
        self.since_ns = ts_ns
        self.path = state           # states so far, 4 bits each, newest lowest (see path_names)
        self.pid = None
        self.comm = None
        self.owner_sure = False     # pid/comm come from a step the owner made itself, or /proc
        self.syn_retrans = 0
        self.recv_reset_ns = None
        self.send_reset_ns = None
        self.error = 0              # errno the kernel reported for it (inet_sk_error_report)
        self.first_fin = None       # "local" or "remote": who closed first
        self.partial = partial      # first seen mid-life: its start is unknown
        self.incomplete = False     # a transition of it is missing (a gap)
        self.preexisting = False    # seeded from /proc: it existed before tracing started
        self.stuck_state = None     # the half-closed state it was reported stuck in
        self.closed_ns = None
        self.fd = None
        self.scan_ts = 0            # newest step taken early (a scan, or a held copy)
        self.tkey = None            # the key it is filed under in ConnTable.by_tuple, if it is
        self.ends = None            # with --transitions: the Ends its latest transition showed
        self.evicted = False        # the table dropped it once (--max-conns): partial since
        self.netns = 0              # a listener's network namespace (0: unknown)

    def tuple_key(self):
        return (self.family, self.laddr, self.lport, self.raddr, self.rport)


def path_states(path):
    """The packed path, oldest state first. TCP states are 1..12, so a zero nibble ends it."""
    out = []
    while path:
        out.append(path & 0xF)
        path >>= 4
    out.reverse()
    return out


# A packed path -> its state names. Thousands of connections share a handful of paths; the list
# is shared between their findings and never modified.
path_names = Memo(lambda path: [S.name(s) for s in path_states(path)])
