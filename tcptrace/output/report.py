"""`tcptrace report`: aggregate findings into the tables an SRE asks for.

A Report only reads findings and the tracker's counters; `tables()` and `summary()` are two
formats of the same numbers. ReportSink is the sink that feeds one and prints it.
"""
import collections
import json
import random

from tabulate import tabulate

from tcptrace import SCHEMA_VERSION, histogram, states
from tcptrace.findings import rfc3339
from tcptrace.output import Sink
from tcptrace.output.text import endpoint, ns_text as _ns


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, -(-len(sorted_vals) * p // 100) - 1))
    return sorted_vals[int(k)]


def log2_bucket(v_ns):
    """Power-of-two microsecond bucket of a duration, like bcc's histograms."""
    return max(1, v_ns // 1000).bit_length() - 1


def log2_rows(buckets):
    """{bucket: count} -> [(low_us, high_us, count)], empty buckets in between included."""
    if not buckets:
        return []
    lo, hi = min(buckets), max(buckets)
    return [(1 << b if b else 0, (1 << (b + 1)) - 1, buckets.get(b, 0)) for b in range(lo, hi + 1)]


class Sample:
    """Values kept for percentiles: all of them up to `cap`, then a uniform random sample of
    `cap` (reservoir sampling), so a long `report` holds bounded memory (a list of every
    handshake grew by about 36 bytes per connection, 650 MB an hour at 5k/s) and percentiles
    stay unbiased. Count and maximum are exact. Seeded: the same input gives the same report."""
    __slots__ = ("vals", "n", "max", "_rng")
    cap = 10_000

    def __init__(self, rng):
        self.vals = []
        self.n = 0
        self.max = None
        self._rng = rng

    def add(self, v):
        self.n += 1
        if self.max is None or v > self.max:
            self.max = v
        if len(self.vals) < self.cap:
            self.vals.append(v)
        else:
            j = self._rng.randrange(self.n)
            if j < self.cap:
                self.vals[j] = v


class TimeWaitTable:
    """TIME_WAIT per endpoint: "to" a destination our connects closed first to, "at" a local
    service of ours that closed first. Now and peak from the samples' time_wait records (the
    latest of each namespace, which stays until the namespace says otherwise: records come
    only when something changed), entries from close findings with time_wait."""

    def __init__(self):
        self.latest = {}                          # netns -> {(side, addr, port): (n, share)}
        self.reset()

    def reset(self):
        self.entries = collections.Counter()      # (side, addr, port) -> closes into TIME_WAIT
        self.peak = collections.Counter()
        for key in self._keys():
            self.peak[key] = self.now(key)

    def _keys(self):
        return {k for rows in self.latest.values() for k in rows}

    def now(self, key):
        return sum(rows[key][0] for rows in self.latest.values() if key in rows)

    def share(self, key):
        got = [rows[key][1] for rows in self.latest.values()
               if key in rows and rows[key][1] is not None]
        return max(got) if got else None

    def close(self, f, n=1):
        """n closes into TIME_WAIT like f (a close finding, or folded ones: an aggregate)."""
        if f.role == "active":
            self.entries[("to", f.raddr, f.rport)] += n
        else:
            self.entries[("at", f.laddr, f.lport)] += n

    def sample(self, f):
        rows = {}
        for d in f.destinations:
            key = ("to", d["raddr"], d["rport"])
            n, share = rows.get(key, (0, 0.0))
            rows[key] = (n + d["time_wait"], max(share, d["port_share"]))
        for d in f.services:
            rows[("at", d["laddr"], d["lport"])] = (d["time_wait"], None)
        self.latest[f.netns] = rows
        for key in rows:
            self.peak[key] = max(self.peak[key], self.now(key))

    def rows(self, duration_ns):
        secs = duration_ns / 1e9
        out = []
        for key in self._keys() | set(self.entries):
            # a destination no sample lists now has nothing in TIME_WAIT (0% of the ports);
            # a service's share of the range means nothing
            share = self.share(key) or 0.0 if key[0] == "to" and self.latest else None
            out.append({"side": key[0], "addr": key[1], "port": key[2],
                        "now": self.now(key) if self.latest else None,
                        "peak": self.peak[key] if self.latest else None,
                        "port_share": share,
                        "entries": self.entries[key],
                        "entries_per_s": round(self.entries[key] / secs, 1) if secs else None})
        out.sort(key=lambda r: (-(r["now"] or 0), -r["entries"], r["side"], str(r["addr"]),
                                r["port"] or 0))
        return out


class Report:
    def __init__(self):
        self.time_wait = TimeWaitTable()
        self.reset()

    def reset(self):
        self._rng = random.Random(0)
        self.handshakes = {}                              # (raddr, rport, comm) -> Sample
        # Folded connections (detect/folded.py): (raddr, rport, comm) -> [count, max ns,
        # {histogram bucket: n}]; a key with any is given percentiles from buckets, its
        # one-by-one handshakes added to them
        self.folded = {}
        self.hist = collections.Counter()                 # log2 bucket -> handshakes (exact)
        self.accepts = collections.Counter()              # (lport, comm) -> n
        self.failures = collections.Counter()             # (raddr, rport, comm, cause) -> n
        self.resets = collections.Counter()               # (raddr, rport, comm, by) -> n
        self.closes = collections.Counter()               # closed_by -> n
        self.counts = collections.Counter()               # finding type -> n
        self.lost = collections.Counter()
        self.evicted = 0                                  # connections dropped (--max-conns)
        self.tw_overflow = 0                              # closes that left no timewait sock
        self.time_wait.reset()
        self.first_ns = self.last_ns = None

    def add(self, f):
        t = f.type
        ts = f.ts_ns
        if self.first_ns is None or ts < self.first_ns:
            self.first_ns = ts
        if self.last_ns is None or ts > self.last_ns:
            self.last_ns = ts
        if t == "aggregate":            # folded connections: counted as what they stand for
            self.fold(f)
            return
        self.counts[t] += 1
        if t == "connect":
            v = f.handshake_ns
            key = (f.raddr, f.rport, f.comm)
            smp = self.handshakes.get(key)
            if smp is None:
                smp = self.handshakes[key] = Sample(self._rng)
            smp.add(v)
            self.hist[log2_bucket(v)] += 1
        elif t == "accept":
            self.accepts[(f.lport, f.comm)] += 1
        elif t == "refused" or t == "failed":
            self.failures[(f.raddr, f.rport, f.comm, f.reason)] += 1
        elif t == "reset":
            self.resets[(f.raddr, f.rport, f.comm, f.reset_by)] += 1
        elif t == "close":
            self.closes[getattr(f, "closed_by", None) or "unknown"] += 1
            if getattr(f, "time_wait", False):
                self.time_wait.close(f)
        elif t == "time_wait":
            self.time_wait.sample(f)
        elif t == "time_wait_overflow":
            self.tw_overflow += f.count
        elif t == "lost":
            self.lost[f.where] += f.count
        elif t == "evicted":
            self.evicted += f.count

    def fold(self, f):
        """Connections the kernel folded: what their findings one by one would have added."""
        n = f.count
        counts = self.counts
        if f.role == "active":
            counts["connect"] += n
            got = self.folded.get((f.raddr, f.rport, f.comm))
            if got is None:
                got = self.folded[(f.raddr, f.rport, f.comm)] = [0, 0, collections.Counter()]
            got[0] += n
            got[1] = max(got[1], f.handshake_max_ns)
            got[2].update(f.handshake_buckets)
            for b, k in f.handshake_buckets.items():
                self.hist[histogram.log2_us(b)] += k
        else:
            counts["accept"] += n
            self.accepts[(f.lport, f.comm)] += n
        if f.closed_by == "local":
            self.time_wait.close(f, n)
        counts["close"] += n
        self.closes[f.closed_by] += n

    # -- numbers -----------------------------------------------------------------------------
    def _latency_rows(self, groups):
        """(key, count, p50, p90, p99, max) per key: exact from the values kept, or, for a key
        with folded connections, from histogram buckets (within histogram.py's error)."""
        rows = []
        for key in list(groups) + [k for k in self.folded if k not in groups]:
            smp, fold = groups.get(key), self.folded.get(key)
            if fold is None:
                s = sorted(smp.vals)
                rows.append((key, smp.n, percentile(s, 50), percentile(s, 90),
                             percentile(s, 99), smp.max))
                continue
            n, mx, buckets = fold[0], fold[1], collections.Counter(fold[2])
            if smp is not None:
                # the one-by-one ones, into the same buckets (all of them, when the sample
                # kept all; else the sample stands for them in proportion)
                w = smp.n / len(smp.vals) if smp.vals else 0
                for v in smp.vals:
                    buckets[histogram.bucket(v)] += w
                n += smp.n
                mx = max(mx, smp.max)
            rows.append((key, n) + tuple(histogram.quantile(buckets, p, mx) for p in (50, 90, 99))
                        + (mx,))
        rows.sort(key=lambda r: -r[1])
        return rows

    def summary(self, tracker, wall_offset_ns, interval=None, start_ns=None, end_ns=None,
                matrix=None, listeners0=None):
        """The numbers of the window [start_ns, end_ns) (default: the first finding's time, and
        the newest time the tracker has seen); matrix: the transitions of that window;
        listeners0: listener_counts() at its start."""
        stuck = tracker.stuck_now() if tracker else []
        now = end_ns if end_ns is not None else (tracker.now_ns if tracker else (self.last_ns or 0))
        start = start_ns if start_ns is not None else (self.first_ns if self.first_ns is not None
                                                       else now)
        if matrix is None:
            matrix = tracker.stats.matrix if tracker else {}
        return {
            "schema": SCHEMA_VERSION, "type": "summary",
            "time": rfc3339(now + wall_offset_ns),
            "start": rfc3339(start + wall_offset_ns),
            "duration_ns": max(0, now - start),
            "interval_s": interval,
            "counts": dict(self.counts),
            "connects": [{"raddr": k[0], "rport": k[1], "comm": k[2], "count": n,
                          "p50_ns": p50, "p90_ns": p90, "p99_ns": p99, "max_ns": mx}
                         for k, n, p50, p90, p99, mx in self._latency_rows(self.handshakes)],
            "accepts": [{"lport": k[0], "comm": k[1], "count": n}
                        for k, n in self.accepts.most_common()],
            "failures": [{"raddr": k[0], "rport": k[1], "comm": k[2], "cause": k[3], "count": n}
                         for k, n in self.failures.most_common()],
            "resets": [{"raddr": k[0], "rport": k[1], "comm": k[2], "reset_by": k[3], "count": n}
                       for k, n in self.resets.most_common()],
            "closes": dict(self.closes),
            "stuck": [{"pid": c.pid, "comm": c.comm, "fd": c.fd, "laddr": c.laddr, "lport": c.lport,
                       "raddr": c.raddr, "rport": c.rport, "state": states.name(c.state),
                       "age_ns": now - c.since_ns} for c in stuck],
            "transitions": [{"old": states.name(o), "new": states.name(n), "count": k}
                            for (o, n), k in sorted(matrix.items())],
            "handshake_histogram_us": [{"low": lo, "high": hi, "count": n}
                                       for lo, hi, n in log2_rows(self.hist)],
            "lost": {"total": sum(self.lost.values()), "by_source": dict(self.lost)},
            "evicted": self.evicted,
            "time_wait": self.time_wait.rows(max(0, now - start)),
            "time_wait_overflow": self.tw_overflow,
            "listeners": listener_rows(tracker, listeners0),
        }

    def tables(self, tracker, wall_offset_ns, interval=None, start_ns=None, end_ns=None,
               matrix=None, listeners0=None):
        s = self.summary(tracker, wall_offset_ns, interval, start_ns, end_ns, matrix, listeners0)
        out = [f"REPORT {s['start'][:10]} {s['start'][11:23]} .. {s['time'][11:23]} UTC "
               f"({_ns(s['duration_ns'])})"]

        def section(title, rows, headers, colalign=None):
            out.append(f"\n{title}")
            out.append(tabulate(rows, headers=headers, colalign=colalign) if rows else "  (none)")

        section("CONNECTS (handshake SYN_SENT -> ESTABLISHED)",
                [(endpoint(r["raddr"], r["rport"]), r["comm"], r["count"], _ns(r["p50_ns"]),
                  _ns(r["p90_ns"]), _ns(r["p99_ns"]), _ns(r["max_ns"])) for r in s["connects"]],
                ["DESTINATION", "COMM", "COUNT", "P50", "P90", "P99", "MAX"])
        section("ACCEPTS",
                [(r["lport"], r["comm"] or "-", r["count"]) for r in s["accepts"]],
                ["LPORT", "COMM", "COUNT"])
        section("FAILED CONNECTS",
                [(endpoint(r["raddr"], r["rport"]), r["comm"], r["cause"], r["count"])
                 for r in s["failures"]], ["DESTINATION", "COMM", "CAUSE", "COUNT"])
        section("STUCK HALF-CLOSES (oldest first)",
                [(r["state"], _ns(r["age_ns"]), r["pid"] if r["pid"] is not None else "-",
                  r["comm"] or "-", endpoint(r["laddr"], r["lport"]),
                  endpoint(r["raddr"], r["rport"])) for r in s["stuck"]],
                ["STATE", "AGE", "PID", "COMM", "LOCAL", "REMOTE"])
        section("RESETS",
                [(endpoint(r["raddr"], r["rport"]), r["comm"], r["reset_by"], r["count"])
                 for r in s["resets"]], ["PEER", "COMM", "RESET BY", "COUNT"])
        out.append("\nLISTENERS (counts in this window; * namespace-wide)")
        out.append(_columns(LISTENER_COLUMNS, [_listener_row(r)
                                               for r in s["listeners"][:LISTENER_ROWS]])
                   if s["listeners"] else "  (none)")
        if s["listeners"]:
            more = len(s["listeners"]) - LISTENER_ROWS
            out.append(LISTENER_LEGEND + (f"\n({more} quieter listeners not shown; --json "
                                          "has them all)" if more > 0 else ""))
        section("TIME_WAIT (to: destinations we closed first; at: our ports that closed "
                "first)",
                [(r["side"], endpoint(r["addr"], r["port"]), _or_dash(r["now"]),
                  _or_dash(r["peak"]),
                  "-" if r["port_share"] is None else f"{r['port_share']:.0%}",
                  _or_dash(r["entries_per_s"])) for r in s["time_wait"]],
                ["SIDE", "ENDPOINT", "NOW", "PEAK", "PORTS", "ENTRIES/S"])
        if s["time_wait_overflow"]:
            out.append(f"  {s['time_wait_overflow']} closes got no timewait sock: "
                       "tcp_max_tw_buckets reached")
        section("HANDSHAKE LATENCY (log2 histogram)", _hist_rows(s["handshake_histogram_us"]),
                ["USECS", "COUNT", "DISTRIBUTION"])
        m = {(STATE_BY_NAME[t["old"]], STATE_BY_NAME[t["new"]]): t["count"]
             for t in s["transitions"]}
        cols = _matrix_cols(m)
        # aligned explicitly: tabulate guesses a column of counts and blanks to be numbers
        # from 0.9 on and text before, so the table would depend on the installed version
        section("TRANSITIONS (row: old state, column: new state)", _matrix_rows(m),
                ["OLD"] + cols, ("left",) + ("right",) * len(cols))
        if m:
            out.append(LEGEND)
        lost = s["lost"]
        out.append(f"\nLOST EVENTS: {lost['total']}" +
                   ("".join(f"\n  {k}: {v}" for k, v in sorted(lost["by_source"].items()))))
        if s["evicted"]:
            out.append(f"EVICTED CONNECTIONS: {s['evicted']} (over --max-conns "
                       f"{tracker.max_conns if tracker else '?'}; their later findings are "
                       "marked [evicted])")
        return "\n".join(out).lstrip("\n")


def _or_dash(v):
    return "-" if v is None else v


LISTENER_ROWS = 20
LISTENER_COLUMNS = ("LISTENER", "OWNER", "Q", "OVF", "HALF", "SA", "RQ/AQ/OTH", "COOKIES")
LISTENER_LEGEND = (
    "Q accept queue now/backlog, OVF overflows at the final ACK (-: this kernel does\n"
    "not count them per listener), HALF half-open now (?: not counted lately)/peak,\n"
    "SA SYN-ACKs retransmitted, RQ/AQ/OTH SYNs dropped with the request queue full/\n"
    "the accept queue full/other, COOKIES SYN cookies sent/validated/failed")


def _columns(headers, rows):
    """A table as tabulate's simple format lays it out, without its padding around each
    column: the LISTENERS table has more columns than 80 characters leave room for."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line("-" * w for w in widths)] + [line(r) for r in rows])


def listener_counts(tracker):
    """{listener: its counts since tracing began} of every listener the tracker knows: a
    report window's counts are the growth of these (detect/listen.py: Listeners.table)."""
    d = tracker.listeners() if tracker else None
    return {lst: lst.totals + lst.counts for lst in d.table()} if d else {}


def listener_rows(tracker, since=None):
    """The LISTENERS rows: every listener the tracker knows (and those closed in the window
    with counts), with its queues now and its counts since `since` (listener_counts() at the
    window's start), the busiest first."""
    d = tracker.listeners() if tracker else None
    if d is None:
        return []
    since = since or {}
    closed = set(d.past)
    rows = []
    for lst, total in listener_counts(tracker).items():
        c = total - since.get(lst, collections.Counter())
        if lst in closed and not c:
            continue
        named = lst.lport is not None
        rows.append({
            "netns": lst.netns, "family": states.FAMILY_NAMES.get(lst.family),
            "laddr": lst.laddr, "lport": lst.lport, "pid": lst.pid, "comm": lst.comm,
            "closed": lst in closed, "under_pressure": lst.since_ns is not None,
            "accept_queue": lst.accept_queue if named else None,
            "backlog": lst.backlog if named else None,
            "half_open": lst.half_open if named else None,
            "half_open_peak": lst.peak if named else None,
            "synack_retransmits": c["synack_retransmits"],
            "overflows": c["overflows"] if d.per_listener_overflows else None,
            "drops": {"total": c["dropped"], "request_queue_full": c["request_queue_full"],
                      "accept_queue_full": c["accept_queue_full"],
                      "other": max(0, c["dropped"] - c["request_queue_full"]
                                   - c["accept_queue_full"])},
            "cookies": {"sent": c["cookies_sent"], "validated": c["cookies_validated"],
                        "failed": c["cookies_failed"]},
            "resets": c["resets"], "counters": lst.counted})
    rows.sort(key=lambda r: (-r["drops"]["total"] - r["synack_retransmits"]
                             - (r["overflows"] or 0), -(r["accept_queue"] or 0),
                             r["lport"] or 0))
    return rows


def _listener_row(r):
    ns = "*" if r["counters"] == "namespace" else ""
    d, k = r["drops"], r["cookies"]
    named = r["lport"] is not None
    return (endpoint(r["laddr"], r["lport"]) + (" (closed)" if r["closed"] else "")
            if named else f"netns {r['netns']}",
            f"{r['comm'] or '-'} {r['pid'] or ''}".strip(),
            f"{r['accept_queue']}/{r['backlog']}" if named else "-",
            "-" if r["overflows"] is None else r["overflows"],
            f"{'?' if r['half_open'] is None else r['half_open']}/{r['half_open_peak']}"
            if named else "-",
            r["synack_retransmits"],
            f"{d['request_queue_full']}/{d['accept_queue_full']}/{d['other']}{ns}",
            f"{k['sent']}/{k['validated']}/{k['failed']}{ns}")


def _hist_rows(hist):
    if not hist:
        return []
    peak = max(h["count"] for h in hist) or 1
    return [(f"{h['low']} -> {h['high']}", h["count"], "*" * round(30 * h["count"] / peak))
            for h in hist]


_ORDER = [states.CLOSE, states.LISTEN, states.SYN_SENT, states.SYN_RECV, states.ESTABLISHED,
          states.FIN_WAIT1, states.FIN_WAIT2, states.CLOSE_WAIT, states.LAST_ACK, states.CLOSING,
          states.TIME_WAIT]
# Short enough that the matrix of every state fits 80 columns (see the legend printed under it).
_ABBR = {states.CLOSE: "CLOSE", states.LISTEN: "LSTN", states.SYN_SENT: "SYNS",
         states.SYN_RECV: "SYNR", states.ESTABLISHED: "ESTB", states.FIN_WAIT1: "FW1",
         states.FIN_WAIT2: "FW2", states.CLOSE_WAIT: "CLWT", states.LAST_ACK: "LACK",
         states.CLOSING: "CLSG", states.TIME_WAIT: "TW"}
LEGEND = ("LSTN LISTEN, SYNS SYN_SENT, SYNR SYN_RECV, ESTB ESTABLISHED,\n"
          "FW1/FW2 FIN_WAIT1/2, CLWT CLOSE_WAIT, LACK LAST_ACK, CLSG CLOSING, TW TIME_WAIT.\n"
          "TW is inferred, the kernel reports no step into or out of it: -> TW counts\n"
          "closes that left a timewait sock, TW -> CLOSE those a dump (or 60 s) saw leave.")


STATE_BY_NAME = states.BY_NAME


def _used(m):
    olds = [s for s in _ORDER if any(o == s for o, _ in m)]
    news = [s for s in _ORDER if any(n == s for _, n in m)]
    return olds, news


def _matrix_cols(m):
    return [_ABBR[s] for s in _used(m)[1]]


def _matrix_rows(m):
    olds, news = _used(m)
    return [[_ABBR[o]] + [m.get((o, n), "") for n in news] for o in olds]


class ReportSink(Sink):
    """Aggregates findings into a Report, printed as tables or one JSON summary object: once
    at the end, or, with `interval`, for every window of that length, each saying when it
    began and how long it really was (the last one is usually shorter). Windows are cut by
    the findings' own times, so a backlog read late still lands in the window it happened in;
    with an interval the pipeline therefore delivers findings in time order."""

    def __init__(self, stream, wall_offset_ns, as_json=False, interval=None, start_ns=None):
        super().__init__(stream, wall_offset_ns)
        self.as_json = as_json
        self.interval = interval
        self.interval_ns = int(interval * 1e9) if interval else None
        self.ordered = self.interval_ns is not None
        self.report = Report()
        self.start_ns = start_ns      # the window's start (None: its first finding's time)
        self.tracker = None
        self._mx0 = None              # the tracker's transition counts at the window's start
        self._lst0 = None             # its listeners' counts then (listener_counts)

    def bind(self, tracker):
        self.tracker = tracker
        self._mx0 = list(tracker.stats.mx)
        self._lst0 = listener_counts(tracker)

    def emit_many(self, findings):
        add = self.report.add
        for f in findings:
            if self.interval_ns is not None:
                self._roll(f.ts_ns)
            add(f)

    def advance(self, released_ns):
        if self.interval_ns is not None:
            self._roll(released_ns)

    def _roll(self, t):
        """Print and restart every window that ended at or before t."""
        if self.start_ns is None:
            self.start_ns = t
            return
        while t >= self.start_ns + self.interval_ns:
            end = self.start_ns + self.interval_ns
            self.print(end)
            self.report.reset()
            self.start_ns = end
            self._mx0 = list(self.tracker.stats.mx)
            self._lst0 = listener_counts(self.tracker)

    def close(self, end_ns):
        """The last window (or the whole run): printed even when nothing happened in it."""
        self.print(max(end_ns, self.start_ns or end_ns))

    def print(self, end_ns):
        r, tr = self.report, self.tracker
        mx = tr.stats.mx
        matrix = {(i >> 4, i & 15): n - self._mx0[i] for i, n in enumerate(mx)
                  if n - self._mx0[i]}
        args = (tr, self.wall_offset_ns, self.interval, self.start_ns, end_ns, matrix,
                self._lst0)
        if self.as_json:
            text = json.dumps(r.summary(*args), separators=(",", ":"))
        else:
            text = r.tables(*args) + "\n"
        self.write(text + "\n")
        self.flush()
