"""Where findings go. Sinks only format: every decision was made by the detectors.

All sinks take `Finding`s and the wall-clock offset, write to a stream, and turn a closed pipe
into `Closed`. The pipeline flushes after every batch, i.e. at least every poll (100 ms): a log
shipper reading the pipe sees each line within that, without a write syscall per line.
"""
from tcptrace import states
from tcptrace.findings import Accept, Close, Connect, Transition, rfc3339


class Closed(Exception):
    """The reader went away (EPIPE): stop quietly."""


def _ns(v):
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


def endpoint(addr, port):
    if addr is None:
        return "*"
    return f"{_ENDS.get(addr) or _end(addr)}{port if port is not None else '*'}"


def describe(f, x=None):
    """What happened, in words, without the time/process/endpoint columns. x: f.extra, if the
    caller has it already."""
    t = f.type
    if x is None:
        x = f.extra
    if t == "connect":
        r = x.get("syn_retransmits", 0)
        return f"handshake {_ns(x['handshake_ns'])}" + (f", {r} SYN retransmit{'s' if r != 1 else ''}" if r else "")
    if t == "accept":
        return ""          # the EVENT column says it all
    if t == "refused":
        return "refused (RST to our SYN)" if not x.get("before_syn") else "refused"
    if t == "failed":
        reason = x["reason"]
        if reason == "timeout":
            return f"timed out after {x.get('syn_retransmits', 0)} SYN retransmits ({x.get('errno')})"
        if reason == "cancelled":
            return "cancelled: closed by the application in SYN_SENT"
        if x.get("before_syn"):
            return f"{reason} before any SYN ({x.get('errno')})"
        return f"{reason} ({x.get('errno')})"
    if t == "reset":
        return f"reset by {x['reset_by']} after {_ns(x.get('duration_ns'))}"
    if t == "close":
        by = x.get("closed_by")
        return f"closed after {_ns(x.get('duration_ns'))}" + (f", {by} closed first" if by else "")
    if t == "stuck":
        owner = "; orphaned (no process)" if f.pid is None else ""
        return f"STUCK {x['state']} {_ns(x['age_ns'])}: {x['blame']}{owner}"
    if t == "unstuck":
        return f"left {x['state']} after {_ns(x['duration_ns'])}"
    if t == "transition":
        return f"{x['oldstate']} -> {x['newstate']}"
    if t == "lost":
        return f"LOST {x['count']} events ({x['where']}), {x['lost_total']} so far"
    return t


class TextSink:
    """One line per finding, under 80 columns for the common case:
    TIME      PID    COMM        EVENT     LOCAL -> REMOTE  what happened

    `emit_many` is the path every batch takes: it formats the findings every connection yields
    (connect, accept, close, and transition with --transitions) from pieces cached per owner,
    type, address and second, and hands everything else to `_lines`, the general formatter,
    whose output it reproduces exactly (tests/unit/test_sinks.py holds the two together).
    Through `_lines` alone, this sink cost three times the JSON sink's per finding."""

    HEADER = f"{'TIME':<12} {'PID':>7} {'COMM':<12} {'EVENT':<8} CONNECTION / DETAIL"

    def __init__(self, stream, wall_offset_ns, wide=False):
        self.stream = stream
        self.wall_offset_ns = wall_offset_ns
        self.wide = wide
        self._header = False
        self._cols = {}         # (pid, comm, type) -> the PID, COMM and EVENT columns
        self._sec = [None, ""]  # the second last formatted, and its HH:MM:SS

    def emit(self, f):
        self.emit_many((f,))

    def _lines(self, f):
        """The line(s) of any finding, through `describe`."""
        tm = rfc3339(f.ts_ns + self.wall_offset_ns)[11:23]
        key = (f.pid, f.comm, f.type)
        conn = f"{endpoint(f.laddr, f.lport)} > {endpoint(f.raddr, f.rport)}" if f.type != "lost" else ""
        x = f.extra         # once: connection findings build it anew on each read
        flags = "".join(s for k, s in (("partial", " [partial]"), ("incomplete", " [incomplete]"))
                        if x.get(k))
        line = f"{tm:<12}{self._cols.get(key) or self._columns(key)}{conn}"
        detail = describe(f, x) + flags
        if self.wide or len(line) + 2 + len(detail) <= 79:
            return ((f"{line}  {detail}" if conn else f"{line}{detail}").rstrip(),)
        return line, f"    {detail}"

    def _second(self, sec):
        self._sec[0] = sec
        self._sec[1] = rfc3339(sec * 1_000_000_000)[11:19]
        return self._sec[1]

    def _columns(self, key):
        """The PID, COMM and EVENT columns, with the spaces around them, as HEADER has them."""
        pid, comm, t = key
        if len(self._cols) >= 10_000:
            self._cols.clear()
        c = self._cols[key] = (f" {'-' if pid is None else str(pid):>7} "
                               f"{(comm or '-')[: (16 if self.wide else 12)]:<12} {t:<8} ")
        return c

    def _ends_text(self, e):
        """A transition's PID, COMM and EVENT columns and its connection, from its Ends."""
        key = (e.pid, e.comm, "transition")
        la, lp, ra, rp = e.laddr, e.lport, e.raddr, e.rport
        return f"{self._cols.get(key) or self._columns(key)}{endpoint(la, lp)} > {endpoint(ra, rp)}"

    def emit_many(self, fs):
        if not fs:
            return
        out = []
        if not self._header:
            out.append(self.HEADER)
            self._header = True
        w = self.wall_offset_ns
        wide = self.wide
        sec_memo = self._sec
        cols = self._cols
        ends = _ENDS
        for f in fs:
            cls = type(f)
            if cls is Transition:
                # Its columns after the time come from its Ends, formatted once per connection
                e = f.ends
                mid = e.text
                if mid is None or mid[0] is not self:
                    mid = e.text = (self, self._ends_text(e))
                head, conn = mid[1], ""
                detail = _PAIRS.get(f.pair) or _pair_text(f.pair)
            else:
                if cls is Close:
                    a, by, partial, incomplete = f.parts()
                    detail = f"closed after {_ns(a)}" + (f", {by} closed first" if by else "")
                elif cls is Connect:
                    a, r, partial, incomplete = f.parts()
                    detail = f"handshake {_ns(a)}" + (
                        f", {r} SYN retransmit{'s' if r != 1 else ''}" if r else "")
                elif cls is Accept:
                    _, _, partial, incomplete = f.parts()
                    detail = ""
                else:
                    out.extend(self._lines(f))
                    continue
                la, lp, ra, rp = f.laddr, f.lport, f.raddr, f.rport
                if la is None or lp is None or ra is None or rp is None:
                    conn = f"{endpoint(la, lp)} > {endpoint(ra, rp)}"
                else:
                    conn = f"{ends.get(la) or _end(la)}{lp} > {ends.get(ra) or _end(ra)}{rp}"
                if partial:
                    detail += " [partial]"
                if incomplete:
                    detail += " [incomplete]"
                key = (f.pid, f.comm, f.type)
                head = cols.get(key) or self._columns(key)
            sec, ns = divmod(f.ts_ns + w, 1_000_000_000)
            line = (f"{sec_memo[1] if sec_memo[0] == sec else self._second(sec)}."
                    f"{ns // 1_000_000:03d}{head}{conn}")
            if not detail:
                out.append(line)
            elif wide or len(line) + 2 + len(detail) <= 79:
                out.append(f"{line}  {detail}")
            else:
                out.append(line)
                out.append(f"    {detail}")
        out.append("")
        self._write("\n".join(out))

    def _write(self, text):
        try:
            self.stream.write(text)
        except BrokenPipeError:
            raise Closed() from None

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise Closed() from None


_ENDS = {}      # address -> its text before the port: "192.0.2.7:" or "[2001:db8::1]:"


def _end(addr):
    if len(_ENDS) >= 10_000:
        _ENDS.clear()
    e = _ENDS[addr] = f"[{addr}]:" if ":" in addr else f"{addr}:"
    return e


_PAIRS = {}     # oldstate << 8 | newstate -> "OLD -> NEW"


def _pair_text(k):
    t = _PAIRS[k] = f"{states.name(k >> 8)} -> {states.name(k & 0xff)}"
    return t


class JsonSink:
    """JSON Lines: one object per finding."""

    def __init__(self, stream, wall_offset_ns):
        self.stream = stream
        self.wall_offset_ns = wall_offset_ns

    def emit(self, f):
        try:
            self.stream.write(f.to_json(self.wall_offset_ns) + "\n")
        except BrokenPipeError:
            raise Closed() from None

    def emit_many(self, fs):
        if not fs:
            return
        w = self.wall_offset_ns
        try:
            # joined by newlines, not each line copied with its own: lines are ~300 bytes
            self.stream.write("\n".join([f.to_json(w) for f in fs]) + "\n")
        except BrokenPipeError:
            raise Closed() from None

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise Closed() from None


