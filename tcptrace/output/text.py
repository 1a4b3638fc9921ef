"""Text: one line per finding, under 80 columns for the common case (Gregg's rule):

    TIME         PID     COMM         EVENT    LOCAL > REMOTE  what happened

A line whose detail does not fit continues on an indented line of its own (unless --wide).
Every finding goes through the same `line()`; what repeats (the owner's columns, an address's
text, a transition's endpoints, the clock's second) is formatted once and looked up after.
"""
import textwrap

from tcptrace.cache import Memo
from tcptrace.findings import Close, Conclusion, Connect, InferredTransition, Transition, rfc3339
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
    """The local listener a connect's SYNs waited on (detect/listen.py), as a suffix. Only a
    plain Finding names one (detect/connect.py); a Conclusion is not asked, since asking one
    for a member it lacks builds its `extra` and raises to say so."""
    if isinstance(f, Conclusion):
        return ""
    lst = f.extra.get("listener")
    if not lst:
        return ""
    owner = f" ({lst['comm']} {lst['pid']})" if lst.get("pid") else ""
    cause = ", ".join(c.replace("_", " ") for c in lst.get("cause") or ())
    return f"; waited on listener {endpoint(lst['laddr'], lst['lport'])}{owner}" + (
        f": {cause}" if cause else "")


RETRANSMITS = Memo(lambda r: f", {_plural(r, 'SYN retransmit')}" if r else "")


def _connect(f):
    if type(f) is Connect:      # the common case: its members are slots, and it waited on none
        r, waited = f.syn_retransmits, ""
    else:
        r, waited = f.extra.get("syn_retransmits", 0), _waited(f)
    return f"handshake {ns_text(f.handshake_ns)}{RETRANSMITS[r]}{waited}"


# refused, failed and reset are plain Findings: their optional members are read from `extra`,
# since getattr() with a default finds a missing one by an exception.
def _refused(f):
    return "refused" if f.extra.get("before_syn") else "refused (RST to our SYN)"


def _failed(f):
    x = f.extra
    reason, err = x["reason"], x.get("errno")
    if reason == "timeout":
        return (f"timed out after {x.get('syn_retransmits', 0)} SYN retransmits ({err})"
                + _waited(f))
    if reason == "cancelled":
        return "cancelled: closed by the application in SYN_SENT" + _waited(f)
    if x.get("before_syn"):
        return f"{reason} before any SYN ({err})"
    return f"{reason} ({err})" + _waited(f)


CLOSED_BY = Memo(lambda by: f", {by} closed first" if by else "")
TIME_WAIT_TEXT = Memo(lambda ns: f", TIME_WAIT {ns_text(ns)}")


def _close(f):
    if type(f) is Close:        # as the tracker makes them: members in slots
        ns, by, tw, tw_ns = f.duration_ns, f.closed_by, f.time_wait, f.time_wait_ns
    else:
        x = f.extra
        ns, by, tw, tw_ns = (x.get("duration_ns"), x.get("closed_by"), x.get("time_wait"),
                             x.get("time_wait_ns"))
    return f"closed after {ns_text(ns)}{CLOSED_BY[by]}{TIME_WAIT_TEXT[tw_ns] if tw else ''}"


def _transition(f):
    by = getattr(f, "by", None)
    return PAIR[f.pair] + (f" [inferred: {by}]" if by else "")


def _time_wait(f):
    """The namespace's count, what moved since its last sample, and its busiest
    destination."""
    moved = ""
    if f.entered is not None:
        moved = (f", +{f.entered} in {ns_text(f.interval_ns)} ({f.recycled} recycled"
                 + (f", {f.killed} killed)" if f.killed else ")"))
    text = f"netns {f.netns}: {f.time_wait} TIME_WAIT{moved}"
    if f.destinations:
        d = max(f.destinations, key=lambda d: d["time_wait"])
        top = f"; {endpoint(d['raddr'], d['rport'])} {d['time_wait']} ({d['port_share']:.0%})"
        if len(text) + len(top) <= 76:      # a line of its own, indented: 80 columns
            text += top
    return text


def _port_pressure(f):
    return (f"{f.time_wait + f.connected}/{f.ports} local ports in use ({f.port_share:.0%}): "
            f"{f.time_wait} TIME_WAIT + {f.connected} connected")


def _overflow(f):
    return (f"netns {f.netns}: {f.count} closes got no timewait sock (tcp_max_tw_buckets "
            f"{f.max_tw_buckets})")


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
    "reset": lambda f: f"reset by {f.reset_by} after {ns_text(f.extra.get('duration_ns'))}",
    "close": _close,
    "stuck": _stuck,
    "unstuck": lambda f: f"left {f.state} after {ns_text(f.duration_ns)}",
    "transition": _transition,
    "lost": _lost,
    "evicted": _evicted,
    "time_wait": _time_wait,
    "port_pressure": _port_pressure,
    "time_wait_overflow": _overflow,
    "listen_pressure": _pressure,
    "listen_recovered": _recovered,
}
# The EVENT column's word where the type is longer than the column.
LABELS = {"listen_pressure": "pressure", "listen_recovered": "recovered"}
# Findings about a namespace or the tracer, not a connection: no endpoint columns.
NO_ENDS = frozenset(("lost", "evicted", "time_wait", "time_wait_overflow"))


FLAGS = Memo(lambda k: "".join(text for on, text in zip(k, (" [partial]", " [incomplete]",
                                                               " [evicted]")) if on))


def flags(f):
    """The marks a plain finding may carry, as the detail's suffix (a Conclusion's are slots,
    read by TextSink.format; transitions carry none)."""
    x = f.extra
    return FLAGS[(x.get("partial", False), x.get("incomplete", False), x.get("evicted", False))]


def _type(f):
    return f.type


class TextSink(Sink):
    def __init__(self, stream, wall_offset_ns, wide=False):
        super().__init__(stream, wall_offset_ns)
        self.wide = wide
        self._header = False
        width = 16 if wide else 12
        # (pid, comm, type) -> the PID, COMM and EVENT columns, with the spaces around them
        self._cols = Memo(lambda k: (f" {'-' if k[0] is None else str(k[0]):>7} "
                                     f"{(k[1] or '-')[:width]:<12} {k[2]:<8} "))
        # a transition's columns and connection, per Ends (which hashes by identity; small,
        # as jsonl.ENDS)
        self._ends = Memo(self._ends_text, limit=1024)
        self._sec = [None, ""]                      # the second last formatted, as HH:MM:SS

    def _ends_text(self, e):
        return f"{self._cols[(e.pid, e.comm, 'transition')]}{endpoint(e.laddr, e.lport)} > " \
               f"{endpoint(e.raddr, e.rport)}"

    def _second(self, sec):
        self._sec[0] = sec
        self._sec[1] = rfc3339(sec * 1_000_000_000)[11:19]
        return self._sec[1]

    def format(self, findings):
        out = []
        if not self._header:
            out.append(HEADER)
            self._header = True
        w, wide, sec_memo, cols = self.wall_offset_ns, self.wide, self._sec, self._cols
        ends, append = self._ends, out.append
        for f in findings:
            sec, ns = divmod(f.ts_ns + w, 1_000_000_000)
            tm = sec_memo[1] if sec_memo[0] == sec else self._second(sec)
            cls = type(f)
            if cls is Transition or cls is InferredTransition:
                line = f"{tm}.{ns // 1_000_000:03d}{ends[f.ends]}"
                sep, detail = "  ", PAIR[f.pair] if cls is Transition else _transition(f)
            else:
                t = f.type
                if t in NO_ENDS:
                    # no connection: the detail follows the EVENT column
                    line = f"{tm}.{ns // 1_000_000:03d}{cols[(f.pid, f.comm, t)]}"
                    sep = ""
                elif t in LABELS:
                    line = (f"{tm}.{ns // 1_000_000:03d}{cols[(f.pid, f.comm, LABELS[t])]}"
                            f"{listener_text(f)}")
                    sep = "  "
                else:
                    la, lp, ra, rp = f.laddr, f.lport, f.raddr, f.rport
                    if la is None or lp is None or ra is None or rp is None:
                        conn = f"{endpoint(la, lp)} > {endpoint(ra, rp)}"
                    else:
                        conn = f"{ADDR[la]}{lp} > {ADDR[ra]}{rp}"
                    line = f"{tm}.{ns // 1_000_000:03d}{cols[(f.pid, f.comm, t)]}{conn}"
                    sep = "  "
                detail = DESCRIBE.get(t, _type)(f)
                if not isinstance(f, Conclusion):
                    detail += flags(f)
                elif f.partial or f.incomplete or f.evicted:
                    detail += FLAGS[(f.partial, f.incomplete, f.evicted)]
            # the detail on the line when it fits in 80 columns (or --wide), else indented below
            if not detail:
                append(line.rstrip())
            elif wide or len(line) + 2 + len(detail) <= 79:
                append(f"{line}{sep}{detail}")
            else:
                append(line.rstrip())
                append("    " + ("\n    ".join(textwrap.wrap(detail, 76)) if len(detail) > 76
                                 else detail))
        out.append("")
        return "\n".join(out)
