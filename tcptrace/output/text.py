"""Text: one line per finding, under 80 columns for the common case (Gregg's rule):

    TIME         PID     COMM         EVENT    LOCAL > REMOTE  what happened

A line whose detail does not fit continues on an indented line of its own (unless --wide).
Every finding goes through the same `line()`; what repeats (the owner's columns, an address's
text, a transition's endpoints, the clock's second) is formatted once and looked up after.
"""
import textwrap

from tcptrace.cache import Memo, ObjectMemo
from tcptrace.findings import Transition, rfc3339
from tcptrace.output import Sink
from tcptrace import states

HEADER = f"{'TIME':<12} {'PID':>7} {'COMM':<12} {'EVENT':<8} CONNECTION / DETAIL"


def ns_text(v):
    """Human duration from integer nanoseconds: 850us, 12.3ms, 1.02s, 3m05s."""
    if v is None:
        return "-"
    if v < 1_000_000:
        return f"{v / 1000:.0f}us"
    if v < 1_000_000_000:
        return f"{v / 1e6:.1f}ms"
    if v < 60_000_000_000:
        return f"{v / 1e9:.2f}s"
    s = v // 1_000_000_000
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


ADDR = Memo(lambda a: f"[{a}]:" if ":" in a else f"{a}:")   # address -> its text before the port


def endpoint(addr, port):
    if addr is None:
        return "*"
    return f"{ADDR[addr]}{port if port is not None else '*'}"


def _plural(n, word):
    return f"{n} {word}{'s' if n != 1 else ''}"


def _waited(f):
    """The local listener a connect's SYNs waited on (detect/listen.py), as a suffix."""
    lst = getattr(f, "listener", None)
    if not lst:
        return ""
    owner = f" ({lst['comm']} {lst['pid']})" if lst.get("pid") else ""
    cause = ", ".join(c.replace("_", " ") for c in lst.get("cause") or ())
    return f"; waited on listener {endpoint(lst['laddr'], lst['lport'])}{owner}" + (
        f": {cause}" if cause else "")


def _connect(f):
    r = getattr(f, "syn_retransmits", 0)
    return f"handshake {ns_text(f.handshake_ns)}" + (
        f", {_plural(r, 'SYN retransmit')}" if r else "") + _waited(f)


def _refused(f):
    return "refused" if getattr(f, "before_syn", False) else "refused (RST to our SYN)"


def _failed(f):
    reason, err = f.reason, getattr(f, "errno", None)
    if reason == "timeout":
        return (f"timed out after {getattr(f, 'syn_retransmits', 0)} SYN retransmits ({err})"
                + _waited(f))
    if reason == "cancelled":
        return "cancelled: closed by the application in SYN_SENT" + _waited(f)
    if getattr(f, "before_syn", False):
        return f"{reason} before any SYN ({err})"
    return f"{reason} ({err})" + _waited(f)


def _close(f):
    by = getattr(f, "closed_by", None)
    return f"closed after {ns_text(getattr(f, 'duration_ns', None))}" + (
        f", {by} closed first" if by else "")


def _stuck(f):
    owner = "; orphaned (no process)" if f.pid is None else ""
    return f"STUCK {f.state} {ns_text(f.age_ns)}: {f.blame}{owner}"


def _lost(f):
    return f"LOST {f.count} events ({f.where}), {f.lost_total} so far"


def _evicted(f):
    return (f"EVICTED {f.count} connections over --max-conns {f.max_conns}, "
            f"{f.evicted_total} so far")


def _queues(f):
    q = f"half-open {'not read' if f.half_open is None else f.half_open}"
    if f.half_open_peak != (f.half_open or 0):
        q += f" (peak {f.half_open_peak})"
    q += f", accept queue {f.accept_queue}/{f.backlog}"
    if f.overflows:
        q += f", {_plural(f.overflows, 'overflow')}"
    return q


def _resets(f):
    r = getattr(f, "resets", None)
    if not r:
        return ""
    n = sum(r.values())
    why = ", ".join(f"{k} {v}" if len(r) > 1 else k for k, v in sorted(r.items())
                    if k != "unknown")
    return f"; {_plural(n, 'reset')} sent" + (f" ({why})" if why else "")


def _pressure(f):
    return f"{f.reason}; {_queues(f)}{_resets(f)}"


def _recovered(f):
    e = f.episode
    counts = [f"{e[k]:,} {many if e[k] != 1 else one}" for k, one, many in (
        ("dropped", "SYN dropped", "SYNs dropped"),
        ("cookies_sent", "SYN cookie sent", "SYN cookies sent"),
        ("synack_retransmits", "SYN-ACK retransmitted", "SYN-ACKs retransmitted"),
        ("overflows", "overflow", "overflows")) if e.get(k)]
    return (f"{'listener closed' if f.closed else 'recovered'} after {ns_text(f.duration_ns)}"
            + (f"; in all {', '.join(counts)}" if counts else ""))


def listener_text(f):
    """A listener finding's subject: the listening address, or the namespace's counts."""
    if f.lport is None:
        return f"netns {f.netns} (namespace-wide)"
    return f"{endpoint(f.laddr, f.lport)} listening"


PAIR = Memo(lambda k: f"{states.name(k >> 8)} -> {states.name(k & 0xff)}")

# What happened, in words, without the time, process and endpoint columns: one per type.
DESCRIBE = {
    "connect": _connect,
    "accept": lambda f: "",           # the EVENT column says it all
    "refused": _refused,
    "failed": _failed,
    "reset": lambda f: f"reset by {f.reset_by} after {ns_text(getattr(f, 'duration_ns', None))}",
    "close": _close,
    "stuck": _stuck,
    "unstuck": lambda f: f"left {f.state} after {ns_text(f.duration_ns)}",
    "transition": lambda f: PAIR[f.pair],
    "lost": _lost,
    "evicted": _evicted,
    "listen_pressure": _pressure,
    "listen_recovered": _recovered,
}
# The EVENT column's word where the type is longer than the column.
LABELS = {"listen_pressure": "pressure", "listen_recovered": "recovered"}


def flags(f):
    """The marks a connection finding may carry, as the detail's suffix."""
    if type(f) is Transition:
        return ""
    return ((" [partial]" if getattr(f, "partial", False) else "")
            + (" [incomplete]" if getattr(f, "incomplete", False) else "")
            + (" [evicted]" if getattr(f, "evicted", False) else ""))


def describe(f):
    return DESCRIBE.get(f.type, lambda f: f.type)(f) + flags(f)


class TextSink(Sink):
    def __init__(self, stream, wall_offset_ns, wide=False):
        super().__init__(stream, wall_offset_ns)
        self.wide = wide
        self._header = False
        width = 16 if wide else 12
        # (pid, comm, type) -> the PID, COMM and EVENT columns, with the spaces around them
        self._cols = Memo(lambda k: (f" {'-' if k[0] is None else str(k[0]):>7} "
                                     f"{(k[1] or '-')[:width]:<12} {k[2]:<8} "))
        self._ends = ObjectMemo(self._ends_text)    # a transition's columns and connection
        self._sec = [None, ""]                      # the second last formatted, as HH:MM:SS

    def _ends_text(self, e):
        return f"{self._cols[(e.pid, e.comm, 'transition')]}{endpoint(e.laddr, e.lport)} > " \
               f"{endpoint(e.raddr, e.rport)}"

    def _second(self, sec):
        self._sec[0] = sec
        self._sec[1] = rfc3339(sec * 1_000_000_000)[11:19]
        return self._sec[1]

    def line(self, f):
        """The line (or two) of a finding, ending in a newline."""
        sec, ns = divmod(f.ts_ns + self.wall_offset_ns, 1_000_000_000)
        tm = f"{self._sec[1] if self._sec[0] == sec else self._second(sec)}.{ns // 1_000_000:03d}"
        t = f.type
        if t == "transition":
            line = tm + self._ends.of(f.ends)
        elif t == "lost" or t == "evicted":
            line = tm + self._cols[(f.pid, f.comm, t)]
        elif t in LABELS:
            line = f"{tm}{self._cols[(f.pid, f.comm, LABELS[t])]}{listener_text(f)}"
        else:
            line = (f"{tm}{self._cols[(f.pid, f.comm, t)]}{endpoint(f.laddr, f.lport)} > "
                    f"{endpoint(f.raddr, f.rport)}")
        detail = describe(f)
        if not detail:
            return line.rstrip() + "\n"
        if self.wide or len(line) + 2 + len(detail) <= 79:
            return (f"{line}{detail}" if t == "lost" or t == "evicted"
                    else f"{line}  {detail}").rstrip() + "\n"
        if len(detail) > 75:
            detail = "\n    ".join(textwrap.wrap(detail, 75))
        return f"{line}\n    {detail}\n"

    def format(self, findings):
        head = ""
        if not self._header:
            head = HEADER + "\n"
            self._header = True
        return head + "".join([self.line(f) for f in findings])
