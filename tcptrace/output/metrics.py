"""Metrics for fleets: findings folded into Prometheus counters, gauges and histograms and
served on /metrics in the text exposition format (prometheus_client).

Labels are bounded by design: no pid and no ephemeral port; a destination only as --by asks
(dest: "addr:port" of connects and the local port of accepts; port: the service port alone;
comm: the command name), at most MAX_SERIES values per metric, the rest counted under "other"
and in tcptrace_label_overflow_total. Served on 127.0.0.1 unless told otherwise: the numbers
name the hosts and services this one talks to, and an exporter has no authentication.

The sink runs on the pipeline's thread and only increments plain dicts; the HTTP server's thread
copies them when scraped (a dict copy is one step under the GIL, so no lock is needed), and
renders them again only if they changed since the last scrape (`_Exposition`).
"""
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


def _labelled(family, name, doc, labels, values):
    """A metric family with a sample per label value in `values` ({value or tuple of values:
    number}), read from a copy: the pipeline's thread may add to it meanwhile."""
    fam = family(name, doc, labels=labels)
    for k, n in dict(values).items():
        fam.add_metric(list(k) if isinstance(k, tuple) else [k], n)
    return fam


class Collector:
    """prometheus_client's view of a Metrics, made at each scrape from copies."""

    def __init__(self, m):
        self.m = m

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily as Counter,
                                            GaugeMetricFamily as Gauge, HistogramMetricFamily)
        m = self.m
        label = {"dest": "dest", "port": "port", "comm": "comm"}[m.by]
        svc = "comm" if m.by == "comm" else "port"
        yield _labelled(Counter, "tcptrace_connects", "Connects that completed (SYN_SENT to "
                        "ESTABLISHED).", [label], m.connects)
        h = HistogramMetricFamily("tcptrace_handshake_seconds", "Handshake time of completed "
                                  "connects (SYN_SENT to ESTABLISHED).", labels=[label])
        for k, counts in dict(m.handshakes).items():
            counts = list(counts)
            cum, buckets = 0, []
            for le, n in zip(BUCKETS_S + (float("inf"),), counts[:-1]):
                cum += n
                buckets.append((repr(le) if le != float("inf") else "+Inf", cum))
            h.add_metric([k], buckets, counts[-1])
        yield h
        yield _labelled(Counter, "tcptrace_accepts", "Accepted connections.", [svc], m.accepts)
        yield _labelled(Counter, "tcptrace_connect_failures", "Connects that failed, by cause "
                        "(refused, timeout, unreachable, cancelled, ...).", ["cause", label],
                        m.failures)
        yield _labelled(Counter, "tcptrace_resets", "Established connections ended by a reset, "
                        "by which side sent it.", ["by"], m.resets)
        yield _labelled(Counter, "tcptrace_closes", "Connections closed normally, by which side "
                        "closed first.", ["closed_by"], m.closes)
        yield _labelled(Gauge, "tcptrace_stuck_sockets", "Sockets reported stuck in a "
                        "half-closed state now.", ["state"], m.stuck)
        yield _labelled(Counter, "tcptrace_lost_events", "Kernel events tcptrace could not "
                        "see, by where they were lost.", ["source"], m.lost)
        yield Counter("tcptrace_evicted_connections", "Connections dropped to stay within "
                      "--max-conns.", value=m.evicted)
        yield Counter("tcptrace_folded_sockets", "Healthy short-lived sockets the kernel "
                      "counted instead of sending (included in the counts above).",
                      value=m.folded)
        yield Counter("tcptrace_label_overflow", "Label values beyond the cap, counted under "
                      "\"other\".", value=m.overflow)


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
    was last rendered: 210 buckets per histogram series take about 10 ms to collect and format
    here, and over a second in an emulated guest, where a scrape outlasting Prometheus's
    scrape_timeout makes every series stale. The process's few metrics are rendered each time."""

    def __init__(self, metrics):
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector
        self.m = metrics
        self.ours = CollectorRegistry()
        self.ours.register(Collector(metrics))
        self.process = CollectorRegistry()
        ProcessCollector(namespace="tcptrace", registry=self.process)
        self.rendered = None          # Metrics.changes when `text` was rendered
        self.text = b""

    def render(self):
        from prometheus_client import generate_latest
        n = self.m.changes            # read first: a change while rendering renders again
        if n != self.rendered:
            self.text = generate_latest(self.ours)
            self.rendered = n
        return self.text + generate_latest(self.process)

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
    import sys
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):       # a line per scrape on stderr helps nobody
            pass

    # A scrape's thread takes the GIL back after each socket call. While the pipeline or a
    # sampler thread computes, each such take waits out the switch interval (5 ms by default),
    # and a scrape makes a few hundred: over a second on a slow machine, past a 1 s scrape
    # timeout. A shorter interval bounds that wait.
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    exposition = _Exposition(metrics)
    httpd = make_server(addr, port, exposition.app, server_class=Server, handler_class=Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return exposition
