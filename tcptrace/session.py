"""Run the pipeline: source -> order -> lifecycle (detectors) -> filter -> sink, one loop for a
live run and a replay alike.

    source (kernel/live.py or recording.py) --Batch--> Pipeline --findings--> sink (output/)

A source yields Batches: records plus the horizon up to which the stream is complete. The
pipeline owns time from there: records wait in the Reorderer until nothing earlier can come,
the tracker concludes what the horizon allows, and findings wait again until nothing earlier
can still be concluded, so sinks see them in time order.
"""
import contextlib
import json
import os
import signal
import sys
import tempfile

from tcptrace import errors
from tcptrace.detect import timewait
from tcptrace.lifecycle import Tracker
from tcptrace.order import Reorderer, by_ts
from tcptrace.output import Closed, make_sink
from tcptrace.recording import Recorder, RecordingSource


class Pipeline:
    """Everything after the source."""

    def __init__(self, opts, sink, confirm=None, resolve_owner=None):
        self.opts = opts
        self.sink = sink
        self.order = Reorderer(opts.window_ns)
        self.tracker = Tracker(stuck_after_ns=int(opts.stuck_after * 1e9),
                               pressure_interval_ns=int(opts.pressure_interval * 1e9),
                               transitions=opts.transitions, max_conns=opts.max_conns,
                               confirm=confirm, resolve_owner=resolve_owner,
                               port_pressure=opts.port_pressure,
                               follow_time_wait=opts.report or opts.transitions,
                               time_wait_sampling=timewait.sample_options(
                                   opts.report, opts.interval, opts.port_pressure,
                                   opts.transitions))
        self.emitted = 0
        sink.bind(self.tracker)
        # Findings wait here until nothing earlier can still be concluded (a closed connection
        # waits out the tracker's grace), so output is in time order: the same hold-and-release
        # by timestamp as for the events, longer. Steps read from the kernel's socks map arrive
        # up to one scan interval late (a scan runs after a poll, so up to a tick more; where
        # the source drains at a quiet pace, polls and so scans are a quiet tick apart), and a
        # held socket's opening steps on a quiet host up to twice the hold time later still
        # (kernel/source.py: KernelSource._due_held). A finding later than this is still
        # written, and counted.
        tick = opts.quiet_tick_ms           # never under tick_ms
        self._held = Reorderer(self.tracker.grace_ns + self.order.window_ns
                               + (2 * opts.hold_ms + max(opts.scan_ms, tick) + tick) * 1_000_000)

    def feed(self, batch):
        tr = self.tracker
        for s in batch.seeds:
            tr.seed(*s)
        self.order.push_many(batch.records)
        horizon = batch.horizon_ns
        for r in self.order.release(horizon):
            tr.process(r)
        tr.tick(horizon - self.order.window_ns)
        self.flush()
        if batch.scanned:
            # Steps read from the kernel's maps: only those older than the ordering window are
            # taken, in time order: by then every record before them has been processed.
            cut = horizon - self.order.window_ns
            for r in sorted((r for r in batch.scanned if r.ts_ns <= cut), key=by_ts):
                tr.process(r)
            self.flush()

    def flush(self, final=False):
        found = self.tracker.take()
        if not self.opts.filter.empty():
            match = self.opts.filter.match
            found = [f for f in found if match(f)]
        if not self.sink.ordered:
            self.emitted += len(found)
            self.sink.emit_many(found)
            self.sink.advance(self.tracker.now_ns)
            return
        self._held.push_many(found)
        out = self._held.drain() if final else self._held.release(self.tracker.now_ns)
        if out:
            self.emitted += len(out)
            self.sink.emit_many(out)
        self.sink.advance(self._held.released_ns)
        if out:
            self.sink.flush()

    def finish(self):
        tr = self.tracker
        for r in self.order.drain():
            tr.process(r)
        tr.finish()
        self.flush(final=True)
        self.sink.close(tr.now_ns)

    def summary_line(self):
        st = self.tracker.stats
        parts = [f"{st.events} events", f"{self.emitted} findings",
                 f"{st.lost_total} lost" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(st.lost.items()))})"
                                            if st.lost_total else "")]
        if st.folded:
            parts.append(f"{st.folded} healthy sockets folded in the kernel (counted, not "
                         "listed)")
        if st.unfollowed:
            parts.append(f"{st.unfollowed} timewait socks not followed to their exit (over "
                         f"{timewait.MAX_WAITING:,} at once)")
        evicted = self.tracker.table.evicted
        if evicted:
            parts.append(f"{evicted} connections evicted (cap {self.tracker.max_conns})")
        if self.order.late:
            parts.append(f"{self.order.late} events later than the {self.opts.window_ms} ms "
                         "ordering window")
        if self._held.late:
            parts.append(f"{self._held.late} findings written out of time order (later than "
                         f"the {self._held.window_ns // 1_000_000} ms output window)")
        return ", ".join(parts)


def shown_types(opts):
    """The finding types this run's output shows (None: all of them). A recording is for any
    view later: all."""
    if opts.record:
        return None
    if opts.filter.types:
        return opts.filter.types
    if opts.metrics:
        from tcptrace.output.metrics import Metrics
        return Metrics.READS
    return None


def samplers_for(detectors, shown=None, **scope):
    """One of each sampler the detectors ask for (their SAMPLERS), each made with `scope`:
    what the kernel-side filters keep (ports, families), so that a dump keeps the same. With
    `shown` (the finding types the output will show; None: all), only those of detectors whose
    samples change one of them (SAMPLED_FOR): in a long storm, a dump of every TIME_WAIT socket
    costs more than all the rest of `report` (docs/bench.md), for nothing shown.
    A detector's `sampler_options` (a dict) are passed to its samplers too."""
    wanted = {}
    for d in detectors:
        if shown is not None and not shown & getattr(d, "SAMPLED_FOR", frozenset()):
            continue
        for make in getattr(d, "SAMPLERS", ()):
            wanted.setdefault(make, getattr(d, "sampler_options", {}))
    return [make(**scope, **options) for make, options in wanted.items()]


def run(source, pipe, recorder=None):
    """Feed the pipeline every batch the source yields, then finish it."""
    for batch in source.batches():
        if recorder:
            recorder.write(batch)
        pipe.feed(batch)
    pipe.finish()


class _Stop:
    def __init__(self):
        self.flag = False
        self.signal = None

    def __call__(self, signum, _frame):
        self.flag = True
        self.signal = signum


def _install_signals(stop):
    # Set explicitly: a tracer started with `cmd &` from a script inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _protect_stdout():
    """Give our output its own descriptor and point fd 1 at stderr, so nothing BCC, clang or
    libbpf prints can land in the data stream."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    # Block-buffered: the pipeline flushes after every batch (each poll, 100 ms), so readers see
    # every line within that, without a write(2) per line.
    return os.fdopen(fd, "w", buffering=1 << 16, encoding="utf-8", errors="replace")


GC_YOUNG = 100_000      # allocations between collections of the young generation (_tune_gc)


def _tune_gc():
    """Make Python's cyclic collector run less often. The tracer allocates a few container
    objects per record (tuples, records, findings), almost none in cycles, so the young
    generation filled every 700 allocations and its collections, walking what survived, cost
    13-15% of the tracer's CPU at 5k-20k connections/s (docs/bench.md). A collection walks the
    young objects still alive, and findings live for the output window (a third of a second,
    Pipeline._held): under --transitions at 10k connections/s some 35k of them, so at every
    20k allocations a collection walked nearly each one. Every 100k, most have been written
    and freed by then. What exists after start-up (BCC's objects included) is frozen out of
    every collection."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 20, 20)


class ReadyFile:
    """--ready-file: written once tracing runs (the option's check made sure PATH is a regular
    file or nothing yet), through a temporary file in the same directory so a reader never
    sees half of it, and removed at exit."""

    def __init__(self, path):
        self.path = path
        self.written = False

    def write(self, content):
        d = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tcptrace-ready-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(content, f)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.written = True

    def remove(self):
        if self.written:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _silence(fd):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def run_live(opts, plan, diag):
    """diag: callable(str) for stderr diagnostics."""
    from tcptrace.host import owners
    from tcptrace.kernel.live import LiveSource

    stop = _Stop()
    _install_signals(stop)
    out = _protect_stdout()
    sink = None
    if opts.metrics:
        # Listening first: a port in use fails before anything is compiled
        from tcptrace.output.metrics import MetricsSink, serve
        sink = MetricsSink(out, 0, by=opts.by)
        try:
            serve(sink.metrics, *opts.listen)
        except OSError as e:
            raise errors.OutputError(f"cannot serve metrics on {opts.listen[0]}:"
                                     f"{opts.listen[1]}: {e.strerror}") from None
        diag(f"serving /metrics on http://{opts.listen[0]}:{opts.listen[1]}/metrics")
    diag(f"compiling and attaching BPF programs ({plan.describe()})")
    for n in plan.notes:
        diag(n)
    src = LiveSource(plan, opts, stop)
    plan = src.plan             # the one it could attach
    _tune_gc()
    for n in src.notes:
        diag(n)
    view = owners.KernelView()
    if sink is not None:
        sink.wall_offset_ns = src.wall_offset_ns
    pipe = Pipeline(opts, sink or make_sink(opts, out, src.wall_offset_ns, src.armed_ns),
                    confirm=view.confirm, resolve_owner=view.resolve)
    src.samplers = samplers_for(pipe.tracker.detectors, shown_types(opts),
                                ports=sorted(opts.filter.ports),
                                families=opts.filter.kernel_families())
    ready = ReadyFile(opts.ready_file) if opts.ready_file else None
    rec = None

    def on_ready():
        if ready:
            try:
                ready.write({"pid": os.getpid(), "plan": plan.describe(),
                             "transport": plan.transport, "compile_s": round(src.compile_s, 3)})
            except OSError as e:
                raise errors.OutputError(f"cannot write --ready-file {ready.path}: "
                                         f"{e.strerror}") from None
        diag(f"tracing (compiled in {src.compile_s:.1f}s); Ctrl-C to stop")
    src.on_ready = on_ready
    try:
        if stop.flag:       # stopped while compiling: nothing began, nothing is written
            raise errors.Interrupted("interrupted before tracing began")
        rec = Recorder(opts.record, src.wall_offset_ns, plan.describe()) if opts.record else None
        run(src, pipe, rec)
        if src.started_ns is None:
            raise errors.Interrupted("interrupted before tracing began")
    except Closed:
        # The reader went away: nothing more can be written there. Point fd 1 at /dev/null so
        # the interpreter's final flush cannot fail either.
        _silence(out.fileno())
    except errors.OutputError:
        _silence(out.fileno())
        raise
    finally:
        if ready:
            ready.remove()
        try:
            if rec:
                rec.close()
        finally:
            for n in src.close():
                diag(n)
            if src.started_ns is not None:
                diag(pipe.summary_line())
    return pipe


def replay(path, opts, out, diag):
    """Re-run the analysis on a recording. A malformed line stops reading there: what came
    before is still analysed and reported, then DataError names the line."""
    src = RecordingSource(path)
    pipe = Pipeline(opts, make_sink(opts, out, src.wall_offset_ns))
    try:
        run(src, pipe)
    except Closed:
        pass
    finally:
        src.close()
    if src.error:
        raise errors.DataError(f"{src.error}; everything before it was analysed "
                               f"({pipe.summary_line()})")
    diag(pipe.summary_line())
    return pipe
