"""Metrics for fleets: findings folded into Prometheus counters, gauges and histograms and
served on /metrics in the Prometheus text format.

Labels are bounded by design: no pid and no ephemeral port; a destination only as --by asks
(dest: "addr:port" of connects and the local port of accepts; port: the service port alone;
comm: the command name), at most MAX_SERIES values per metric, the rest counted under "other"
and in tcptrace_label_overflow_total. Served on 127.0.0.1 unless told otherwise: the numbers
name the hosts and services this one talks to, and an exporter has no authentication.

The sink runs on the pipeline's thread and only increments plain dicts; a scrape's thread
copies them (a dict copy is one step under the GIL, so no lock is needed), and renders them
(`render`) again only if they changed since the last scrape (`_Exposition`).
"""
import itertools

from tcptrace import histogram
from tcptrace.output import Sink

MAX_SERIES = 1000
# Handshake times: tcptrace/histogram.py's buckets (the kernel's aggregates use the same), 8 per
# power of two from 1 us to 67 s; each bucket's upper bound is its `le`. Adjacent bounds differ
# by 9%, so a quantile interpolated within a bucket is off by at most that much.
BUCKETS_S = tuple(histogram.upper_ns(b) / 1e9 for b in range(histogram.N - 1))


class _Labels:
    """Label values of one metric: at most MAX_SERIES, then "other" (counted)."""

    def __init__(self, owner):
        self.owner = owner
        self.seen = set()

    def __call__(self, value):
        if value in self.seen:
            return value
        if len(self.seen) >= MAX_SERIES:
            self.owner.overflow += 1
            return "other"
        self.seen.add(value)
        return value


class Metrics:
    """The numbers /metrics shows, kept as plain dicts."""
    # The finding types it reads (stuck sockets come from the tracker, on the sink's tick)
    READS = frozenset(("connect", "accept", "refused", "failed", "reset", "close", "stuck",
                       "lost", "evicted"))

    def __init__(self, by="dest"):
        self.by = by
        self.overflow = 0
        self.connects = {}            # label -> count
        self.handshakes = {}          # label -> [bucket counts..., sum in seconds]
        self.accepts = {}
        self.failures = {}            # (cause, label) -> count
        self.resets = {}              # reset_by -> count
        self.closes = {}              # closed_by -> count
        self.lost = {}                # source -> events
        self.evicted = 0
        self.folded = 0               # sockets the kernel counted instead of sending
        self.stuck = {}               # state -> sockets now (set by the sink on its tick)
        self.changes = 0              # grows with every change: /metrics renders anew then
        self._dest = _Labels(self)
        self._svc = _Labels(self)

    def dest(self, f):
        """The label of a connect's (or failed connect's) other end, as --by asks."""
        if self.by == "comm":
            return self._dest(f.comm or "")
        if self.by == "port":
            return self._dest(str(f.rport))
        return self._dest(f"[{f.raddr}]:{f.rport}" if f.raddr and ":" in f.raddr
                          else f"{f.raddr}:{f.rport}")

    def service(self, f):
        """The label of an accepted connection: its listener's port, or the command."""
        return self._svc(f.comm or "" if self.by == "comm" else str(f.lport))

    def _handshakes(self, key):
        """A label's handshake histogram: a count per histogram.py bucket, then the sum (s)."""
        h = self.handshakes.get(key)
        if h is None:
            h = self.handshakes[key] = [0] * (histogram.N + 1)
        return h

    def fold(self, f):
        """Connections the kernel folded (detect/folded.py): n connects or accepts, and closes,
        and the connects' handshake buckets."""
        n = f.count
        self.folded += n
        if f.role == "active":
            key = self._dest("other") if f.other else self.dest(f)
            self.connects[key] = self.connects.get(key, 0) + n
            h = self._handshakes(key)
            for b, k in f.handshake_buckets.items():
                h[b] += k
            h[-1] += f.handshake_sum_ns / 1e9
        else:
            key = self._svc("other") if f.other else self.service(f)
            self.accepts[key] = self.accepts.get(key, 0) + n
        self.closes[f.closed_by] = self.closes.get(f.closed_by, 0) + n

    def add(self, f):
        self.changes += 1
        t = f.type
        if t == "connect":
            key = self.dest(f)
            self.connects[key] = self.connects.get(key, 0) + 1
            h = self._handshakes(key)
            h[histogram.bucket(f.handshake_ns)] += 1
            h[-1] += f.handshake_ns / 1e9
        elif t == "aggregate":
            self.fold(f)
        elif t == "accept":
            key = self.service(f)
            self.accepts[key] = self.accepts.get(key, 0) + 1
        elif t == "refused" or t == "failed":
            key = (f.reason, self.dest(f))
            self.failures[key] = self.failures.get(key, 0) + 1
        elif t == "reset":
            self.resets[f.reset_by] = self.resets.get(f.reset_by, 0) + 1
        elif t == "close":
            by = getattr(f, "closed_by", None) or "unknown"
            self.closes[by] = self.closes.get(by, 0) + 1
        elif t == "lost":
            self.lost[f.where] = self.lost.get(f.where, 0) + f.count
        elif t == "evicted":
            self.evicted += f.count


def _escape(value):
    """A label value as the text format quotes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v):
    return repr(v) if isinstance(v, float) else str(v)


# Each histogram bucket's `le` label and the space before its value, rendered once
_LE = tuple(f',le="{le!r}"}} ' for le in BUCKETS_S) + (',le="+Inf"} ',)

# What /metrics shows of a Metrics, in order: (name, type, help, label names or a function of
# the Metrics that gives them, the samples: {label value or tuple: number} or one number).
FAMILIES = (
    ("tcptrace_connects_total", "counter", "Connects that completed (SYN_SENT to ESTABLISHED).",
     lambda m: (m.by,), lambda m: m.connects),
    ("tcptrace_handshake_seconds", "histogram", "Handshake time of completed connects "
     "(SYN_SENT to ESTABLISHED).", lambda m: (m.by,), lambda m: m.handshakes),
    ("tcptrace_accepts_total", "counter", "Accepted connections.",
     lambda m: ("comm" if m.by == "comm" else "port",), lambda m: m.accepts),
    ("tcptrace_connect_failures_total", "counter", "Connects that failed, by cause (refused, "
     "timeout, unreachable, cancelled, ...).", lambda m: ("cause", m.by),
     lambda m: m.failures),
    ("tcptrace_resets_total", "counter", "Established connections ended by a reset, by which side "
     "sent it.", lambda m: ("by",), lambda m: m.resets),
    ("tcptrace_closes_total", "counter", "Connections closed normally, by which side closed first.",
     lambda m: ("closed_by",), lambda m: m.closes),
    ("tcptrace_stuck_sockets", "gauge", "Sockets reported stuck in a half-closed state now.",
     lambda m: ("state",), lambda m: m.stuck),
    ("tcptrace_lost_events_total", "counter", "Kernel events tcptrace could not see, by where they "
     "were lost.", lambda m: ("source",), lambda m: m.lost),
    ("tcptrace_evicted_connections_total", "counter", "Connections dropped to stay within "
     "--max-conns.", lambda m: (), lambda m: m.evicted),
    ("tcptrace_folded_sockets_total", "counter", "Healthy short-lived sockets the kernel counted "
     "instead of sending (included in the counts above).", lambda m: (), lambda m: m.folded),
    ("tcptrace_label_overflow_total", "counter", "Label values beyond the cap, counted under "
     "\"other\".", lambda m: (), lambda m: m.overflow),
)


def render(m):
    """Metrics m in the Prometheus text format (0.0.4), read from copies: the pipeline's thread
    may add to the dicts meanwhile. Written out here rather than through prometheus_client's
    collectors, which format each of a histogram's 210 samples through a generic path: 8.1 ms
    a scrape for six destinations on a 2-core Xeon test host, where this takes 0.48 ms, and
    over a second in an emulated guest, past Prometheus's scrape timeout."""
    out = []
    for name, kind, doc, names, values in FAMILIES:
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        names, values = names(m), values(m)
        if not names:
            out.append(f"{name} {_number(values)}\n")
            continue
        for k, v in dict(values).items():
            k = k if isinstance(k, tuple) else (k,)
            labels = ",".join(f'{n}="{_escape(x)}"' for n, x in zip(names, k))
            if kind != "histogram":
                out.append(f"{name}{{{labels}}} {_number(v)}\n")
                continue
            v = list(v)
            cum = list(itertools.accumulate(v[:-1]))
            head = f"{name}_bucket{{{labels}"
            out.extend(f"{head}{le}{n}\n" for le, n in zip(_LE, cum))
            out.append(f"{name}_count{{{labels}}} {cum[-1]}\n"
                       f"{name}_sum{{{labels}}} {_number(float(v[-1]))}\n")
    return "".join(out)


class MetricsSink(Sink):
    """Folds findings into Metrics; /metrics is served from them (serve())."""
    ordered = False

    def __init__(self, stream, wall_offset_ns, by="dest"):
        super().__init__(stream, wall_offset_ns)
        self.metrics = Metrics(by)
        self.tracker = None

    def bind(self, tracker):
        self.tracker = tracker

    def emit_many(self, findings):
        add = self.metrics.add
        for f in findings:
            add(f)

    def advance(self, released_ns):
        if self.tracker is not None:
            stuck = {}
            for c in self.tracker.stuck_now():
                name = c.stuck_state
                stuck[name] = stuck.get(name, 0) + 1
            from tcptrace import states
            stuck = {states.name(k): n for k, n in stuck.items()}
            if stuck != self.metrics.stuck:
                self.metrics.stuck = stuck
                self.metrics.changes += 1

    def close(self, end_ns):
        self.advance(end_ns)


class _Exposition:
    """The text /metrics serves. Ours is rendered again only when the metrics changed since it
    was last rendered, by one scrape at a time: others wait for it and serve what it rendered.
    Without that, scrapes that outlast Prometheus's timeout pile up (it asks again each scrape
    interval, and the server takes each on a thread of its own), all render at once, each
    slower for the others: in an emulated guest no scrape finished for minutes after a storm.
    The process's few metrics (prometheus_client's) are rendered each time."""

    def __init__(self, metrics):
        import threading
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector
        self.m = metrics
        self.process = CollectorRegistry()
        ProcessCollector(namespace="tcptrace", registry=self.process)
        self.rendered = None          # Metrics.changes when `text` was rendered
        self.renders = 0
        self.text = b""
        self._lock = threading.Lock()

    def render(self):
        from prometheus_client import generate_latest
        with self._lock:
            n = self.m.changes        # read first: a change while rendering renders again
            if n != self.rendered:
                self.text = render(self.m).encode()
                self.rendered = n
                self.renders += 1
            text = self.text
        return text + generate_latest(self.process)

    def app(self, environ, start_response):
        from prometheus_client import CONTENT_TYPE_LATEST
        if environ.get("PATH_INFO") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics\n"]
        body = self.render()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST),
                                  ("Content-Length", str(len(body)))])
        return [body]


def serve(metrics, addr, port):
    """Start the HTTP server on its own thread; returns its _Exposition."""
    import socket
    import socketserver
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):       # a line per scrape on stderr helps nobody
            pass

    exposition = _Exposition(metrics)
    httpd = make_server(addr, port, exposition.app, server_class=Server, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return exposition
