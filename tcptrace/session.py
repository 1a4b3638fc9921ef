"""Run the pipeline: source -> order -> lifecycle -> filter -> sinks, live or from a recording.

kernel (poll) -> Reorderer -> Tracker -> Filter -> sink / Report
The poll loop owns time: the perf/ring callbacks only append records, and everything time-based
(stuck detection, interval reports, loss counters) runs from here.
"""
import json
import operator
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from tcptrace import errors, events
from tcptrace.events import Lost, Kind, F_SCAN, F_SYSCALL
from tcptrace.filters import Filter
from tcptrace.lifecycle import Tracker
from tcptrace.order import Reorderer, by_ts
from tcptrace.report import Report
from tcptrace.sinks import Closed, JsonSink, TextSink

countOf = operator.countOf
_kind = operator.attrgetter("kind")


@dataclass
class Options:
    transitions: bool = False
    json: bool = False
    report: bool = False
    interval: float = None
    duration: float = None
    stuck_after: float = 30.0
    ready_file: str = None
    record: str = None
    transport: str = "auto"
    wide: bool = False
    filter: Filter = field(default_factory=Filter)
    # How often the buffers are drained. Each drain has a fixed cost (a timer wake-up, the
    # pipeline's bookkeeping, and code and data gone cold in the CPU caches while asleep), so
    # draining less often is cheaper per connection: at 5k connections/s, 100 ms took 10-15%
    # less CPU than 25 ms. 100 ms of records is about a fifth of the 8 MB ring at 20k
    # connections/s (kernel.Pacer keeps it to one period), and output is held about that
    # long for time order anyway.
    tick_ms: int = 100
    scan_ms: int = 100        # how often pending steps are read from the kernel's socks map
    # How long the kernel holds an ESTABLISHED socket's steps for its close to join them in one
    # record (bpf/tcptrace.c: held). Findings are held for order longer than this anyway.
    hold_ms: int = 50
    window_ms: int = 20
    max_conns: int = 262_144
    seed: bool = True


class _Stop:
    def __init__(self):
        self.flag = False
        self.signal = None

    def __call__(self, signum, _frame):
        self.flag = True
        self.signal = signum


class Pipeline:
    """Shared by live and replay runs: everything after the source."""

    def __init__(self, opts, out, wall_offset_ns, confirm=None, resolve_owner=None):
        self.opts = opts
        self.wall_offset_ns = wall_offset_ns
        self.order = Reorderer(opts.window_ms * 1_000_000)
        self.tracker = Tracker(stuck_after_ns=int(opts.stuck_after * 1e9),
                               transitions=opts.transitions, max_conns=opts.max_conns,
                               confirm=confirm, resolve_owner=resolve_owner)
        self.report = Report() if opts.report else None
        if opts.report:
            self.sink = None
        elif opts.json:
            self.sink = JsonSink(out, wall_offset_ns)
        else:
            self.sink = TextSink(out, wall_offset_ns, wide=opts.wide)
        self.out = out
        self.emitted = 0
        # Findings wait here until nothing earlier can still be concluded (a closed connection
        # waits out the tracker's grace), so output is in time order: the same hold-and-release
        # by timestamp as for the events, one grace period longer.
        # Steps read from the kernel's socks map arrive up to one scan interval late (a scan
        # runs after a poll, so up to a tick more), and a held socket's opening steps on a quiet
        # host up to twice the hold time later still (kernel.KernelSource._due_held): held
        # that much longer too. A finding later than this is still written, and counted.
        self._held = Reorderer(self.tracker.grace_ns + self.order.window_ns
                               + (2 * opts.hold_ms + opts.scan_ms + opts.tick_ms) * 1_000_000)

    def feed(self, recs, horizon_ns):
        self.order.push_many(recs)
        self.advance(horizon_ns)

    def advance(self, horizon_ns):
        tr = self.tracker
        for r in self.order.release(horizon_ns):
            tr.process(r)
        tr.tick(horizon_ns - self.order.window_ns)
        self.flush()

    def flush(self, final=False):
        found = self.tracker.take()
        if not self.opts.filter.empty():
            match = self.opts.filter.match
            found = [f for f in found if match(f)]
        if self.report is not None:
            # Aggregates do not depend on the order findings arrive in: no holding back.
            self.emitted += len(found)
            add = self.report.add
            for f in found:
                add(f)
            return
        self._held.push_many(found)
        out = self._held.drain() if final else self._held.release(self.tracker.now_ns)
        if not out:
            return
        self.emitted += len(out)
        self.sink.emit_many(out)
        self.sink.flush()

    def feed_scan(self, recs, now_ns):
        """Steps read from the kernel's `socks` map. Only those older than the ordering window
        are taken, in time order: by then every record before them has been processed."""
        horizon = now_ns - self.order.window_ns
        tr = self.tracker
        for r in sorted((r for r in recs if r.ts_ns <= horizon), key=by_ts):
            tr.process(r)
        self.flush()

    def finish(self):
        tr = self.tracker
        for r in self.order.drain():
            tr.process(r)
        tr.finish()
        self.flush(final=True)

    def print_report(self, interval=None):
        if self.report is None:
            return
        try:
            if self.opts.json:
                self.out.write(json.dumps(self.report.summary(self.tracker, self.wall_offset_ns,
                                                              interval),
                                          separators=(",", ":")) + "\n")
            else:
                self.out.write(self.report.tables(self.tracker, self.wall_offset_ns, interval) + "\n")
            self.out.flush()
        except BrokenPipeError:
            raise Closed() from None

    def summary_line(self):
        st = self.tracker.stats
        parts = [f"{st.events} events", f"{self.emitted} findings",
                 f"{st.lost_total} lost" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(st.lost.items()))})"
                                            if st.lost_total else "")]
        if st.evicted:
            parts.append(f"{st.evicted} connections evicted (cap {self.tracker.max_conns})")
        if self.order.late:
            parts.append(f"{self.order.late} events later than the {self.opts.window_ms} ms "
                         "ordering window")
        if self._held.late:
            parts.append(f"{self._held.late} findings written out of time order (later than "
                         f"the {self._held.window_ns // 1_000_000} ms output window)")
        return ", ".join(parts)


class Recorder:
    """--record: the raw stream (events, losses, seeds, clock ticks) as JSON Lines."""

    def __init__(self, path, wall_offset_ns, plan_summary):
        try:
            self.f = open(path, "w")
        except OSError as e:
            raise errors.NoInput(f"cannot write recording {path}: {e.strerror}") from None
        self._line(json.dumps(events.recording_header(wall_offset_ns, plan=plan_summary)))

    def _line(self, s):
        self.f.write(s + "\n")

    def event(self, ev):
        self._line(events.event_to_json(ev))

    def lost(self, lost):
        self._line(events.lost_to_json(lost))

    def tick(self, ts_ns):
        self._line(json.dumps({"kind": "tick", "ts_ns": ts_ns}))

    def seed(self, ts_ns, sock, owner):
        fam, la, lp, ra, rp, st, _ino = sock
        pid, comm, fd = owner or (None, None, None)
        self._line(json.dumps({"kind": "seed", "ts_ns": ts_ns, "family": fam, "laddr": la,
                               "lport": lp, "raddr": ra, "rport": rp, "state": st, "pid": pid,
                               "comm": comm, "fd": fd}))

    def flush(self):
        self.f.flush()

    def close(self):
        self.f.close()


def _wall_offset():
    return time.time_ns() - time.monotonic_ns()


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


def _tune_gc():
    """Make Python's cyclic collector run less often. The tracer allocates a few container
    objects per record (tuples, records, findings), almost none in cycles, so the young
    generation filled every 700 allocations and its collections, walking what survived, cost
    13-15% of the tracer's CPU at 5k-20k connections/s (29.2 -> 24.8 ms per 1,000 connections).
    What exists after start-up (BCC's objects included) is frozen out of every collection."""
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def run_live(opts, plan, diag):
    """diag: callable(str) for stderr diagnostics."""
    from tcptrace import kernel, owners   # kernel imports bcc lazily inside KernelSource

    stop = _Stop()
    _install_signals(stop)
    out = _protect_stdout()
    diag(f"compiling and attaching BPF programs ({plan.describe()})")
    for n in plan.notes:
        diag(n)
    src = kernel.KernelSource(plan, families=opts.filter.kernel_families(),
                              ports=sorted(opts.filter.ports), hold_ms=opts.hold_ms)
    _tune_gc()
    for n in src.notes:
        diag(n)
    wall = _wall_offset()
    view = owners.KernelView()
    pipe = Pipeline(opts, out, wall, confirm=view.confirm, resolve_owner=view.resolve)
    rec = Recorder(opts.record, wall, plan.describe()) if opts.record else None
    try:
        # Seed after attaching, so a socket changing state now is either in the snapshot or in the
        # buffer (or both: the tracker tolerates that).
        if opts.seed:
            now = time.monotonic_ns()
            socks = owners.all_sockets()
            own = owners.inode_owners({s[6] for s in socks})
            for s in socks:
                o = own.get(s[6])
                pipe.tracker.seed(s[0], s[1], s[2], s[3], s[4], s[5], now, o)
                if rec:
                    rec.seed(now, s, o)
        if opts.ready_file:
            with open(opts.ready_file + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "plan": plan.describe(),
                           "transport": plan.transport, "compile_s": round(src.compile_s, 3)}, f)
            os.rename(opts.ready_file + ".tmp", opts.ready_file)
        diag(f"tracing (compiled in {src.compile_s:.1f}s); Ctrl-C to stop")
        started = time.monotonic()
        deadline = started + opts.duration if opts.duration else None
        next_loss = next_tick = next_interval = next_scan = 0.0
        if opts.interval:
            next_interval = started + opts.interval
        while not stop.flag:
            evs = src.poll(opts.tick_ms)
            now_ns = src.read_ns
            now = now_ns / 1e9
            # connect() returns from the syscall hook include non-TCP sockets; they are rare, so
            # the batch is first counted in C (a Python test per record cost 1.4% of the CPU).
            if plan.connect_hook == "syscall" and countOf(map(_kind, evs), Kind.CONNECT_RET):
                evs = [e for e in evs if not (e.kind == Kind.CONNECT_RET and e.flags & F_SYSCALL
                                              and owners.fd_is_tcp(e.pid, e.aux) is False)]
            if now >= next_loss:
                evs.extend(src.losses(now_ns))
                next_loss = now + 0.1
            if rec:
                for e in evs:
                    (rec.lost if isinstance(e, Lost) else rec.event)(e)
                rec.flush()
                if now >= next_tick:
                    rec.tick(now_ns)
                    next_tick = now + 0.1     # replay judges stuck sockets on these
            pipe.feed(evs, now_ns)
            if now >= next_scan:
                scanned = src.scan()
                if rec and scanned:
                    rec.tick(now_ns)          # so replay takes them against the same horizon
                    for e in scanned:
                        rec.event(e)
                pipe.feed_scan(scanned, now_ns)
                next_scan = now + opts.scan_ms / 1000
            if opts.interval and now >= next_interval:
                pipe.print_report(opts.interval)
                pipe.report.reset()
                next_interval += opts.interval
            if deadline and now >= deadline:
                break
        # Drain what is still in the buffers, then everything the reorderer holds.
        evs = src.poll(0)
        now_ns = src.read_ns
        evs.extend(src.losses(now_ns))
        if rec:
            for e in evs:
                (rec.lost if isinstance(e, Lost) else rec.event)(e)
            rec.tick(now_ns)
        pipe.feed(evs, now_ns)
        pipe.finish()
        if not opts.interval or pipe.report is None or pipe.report.counts:
            pipe.print_report(opts.interval)
    except Closed:
        # The reader went away: nothing more can be written there. Point fd 1 at /dev/null so
        # the interpreter's final flush cannot fail either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
    finally:
        if rec:
            rec.close()
        src.close()
        if src.perf_lost_total:
            diag(f"perf reported {src.perf_lost_total} lost (cross-check of the bpf: counts)")
        if src.spilled_total:
            diag(f"{src.spilled_total} records the ring buffer refused went through the "
                 "spill buffer instead")
        if src.rescued_total:
            diag(f"{src.rescued_total} hits the kernel skipped (BPF recursion) were recovered "
                 "by the raw tracepoint twins")
        diag(pipe.summary_line())
    return pipe


def replay(path, opts, out, diag):
    """Re-run the analysis on a recording. A malformed line stops reading there: what came
    before is still analysed and reported, then DataError names the line."""
    try:
        f = open(path)
    except OSError as e:
        raise errors.NoInput(f"cannot read recording {path}: {e.strerror}") from None
    bad = None
    with f:
        first = f.readline()
        try:
            head = json.loads(first)
            if head.get("format") != events.RECORDING_MAGIC:
                raise ValueError("not a tcptrace recording")
            if head.get("version") not in events.RECORDING_VERSIONS:
                raise ValueError(f"recording version {head.get('version')} is not one of "
                                 f"{', '.join(map(str, events.RECORDING_VERSIONS))}")
            wall = int(head["wall_offset_ns"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise errors.DataError(f"{path}:1: {e if str(e) else 'bad header'}") from None
        pipe = Pipeline(opts, out, wall)
        newest = 0
        batch = []          # fed in batches, as the live loop does
        try:
            for lineno, line in enumerate(f, start=2):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    kind = d["kind"]
                    ts = int(d["ts_ns"])
                    if kind == "tick":
                        newest = max(newest, ts)
                        pipe.feed(batch, newest)
                        batch = []
                        continue
                    if kind == "seed":
                        pipe.tracker.seed(int(d["family"]), d["laddr"], int(d["lport"]),
                                          d["raddr"], int(d["rport"]), int(d["state"]), ts,
                                          (d["pid"], d["comm"], d["fd"]) if d.get("pid") else None)
                        continue
                    rec = events.from_json_obj(d)
                    if not line.endswith("\n"):
                        raise ValueError("truncated line")
                    if not isinstance(rec, Lost) and rec.flags & F_SCAN:
                        # read from the kernel's map after everything before it: as live
                        pipe.feed(batch, newest)
                        batch = []
                        pipe.feed_scan([rec], newest)
                        continue
                except (ValueError, KeyError, TypeError) as e:
                    bad = f"{path}:{lineno}: malformed record ({e})"
                    break
                newest = max(newest, rec.ts_ns)
                batch.append(rec)
                if len(batch) >= 1000:
                    pipe.feed(batch, newest)
                    batch = []
            pipe.feed(batch, newest)
            pipe.finish()
            pipe.print_report()
        except Closed:
            pass
    diag(pipe.summary_line())
    if bad:
        raise errors.DataError(bad + "; everything before it was analysed")
    return pipe
