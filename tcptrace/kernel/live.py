"""The running kernel as a source of Batches (tcptrace/wire.py), paced the way the pipeline
wants it: the transport drained every tick, the loss counters read every 100 ms, and the steps
the kernel's maps hold read every scan interval.

The perf/ring callbacks only append records; everything time-based runs from here or from the
pipeline, on the clock read just before each drain. Samplers (host/samplers.py) run on threads
of their own; their readings join the batch of the next drain.
"""
import operator
import sys
import time

from tcptrace import errors
from tcptrace.host import owners
from tcptrace.kernel import probes
from tcptrace.host.samplers import Background
from tcptrace.wire import F_SYSCALL, Batch, Kind

countOf = operator.countOf
_kind = operator.attrgetter("kind")

# How long the poll loop keeps the GIL while another thread waits for it. The samplers' threads
# (and the metrics server's) make many short system calls, and give the GIL up for each; while
# the loop is busy (a storm), each waits the whole interval to take it back: with the default
# 5 ms a listen reading that meets a new listener took 2.0 s instead of 3.2 ms alone (57 ms at
# 0.5 ms; docs/bench.md, "the GIL convoy"). The loop pays for a switch only while another
# thread is waiting.
SWITCH_INTERVAL_S = 0.0005


def next_tick_ms(opts, records, since_ms, capacity):
    """The wait before the next drain: opts.quiet_tick_ms while records come slowly enough that
    a quiet tick of them, at the rate the last drain saw (`records` in `since_ms`), fills under
    a quarter of the buffer (`capacity` records); else opts.tick_ms, so a burst is read at the
    pace the buffer was sized for."""
    quiet = opts.quiet_tick_ms
    if quiet == opts.tick_ms or records * quiet * 4 > capacity * max(since_ms, opts.tick_ms):
        return opts.tick_ms
    return quiet


class LiveSource:
    def __init__(self, plan, opts, stop, samplers=()):
        self.opts = opts
        self.stop = stop
        try:
            self.src = self._source(plan)
        except errors.Unavailable as e:
            if plan.connect_hook != "kprobe" or "kprobe" not in str(e):
                raise
            # kprobes that exist but cannot be attached (without CAP_SYS_ADMIN, some kernels
            # refuse a kprobe's perf event where they allow tracepoints'): the syscall hook
            # stands in, as where there are no kprobes at all
            cs = [c if c.name != "kprobes" else
                  probes.Check("kprobes", probes.UNSUPPORTED, "present but not attachable")
                  for c in probes.checks()]
            plan = probes.plan(opts.transport, cs)
            self.src = self._source(plan)
            self.src.notes.insert(0, f"kprobes could not be attached ({e}): tracing with "
                                     f"{plan.describe()}")
        self.plan = plan
        self.armed_ns = time.monotonic_ns()     # records can exist from here on
        self.notes = self.src.notes
        self.compile_s = self.src.compile_s
        self.wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.started_ns = None
        self.on_ready = None        # called once the sockets that existed before are seeded
        self.samplers = list(samplers)      # host/samplers.py: what the detectors asked for
        self.sampling = None                # their thread, once tracing runs

    def _source(self, plan):
        from tcptrace.kernel.source import KernelSource
        opts = self.opts
        return KernelSource(plan, families=opts.filter.kernel_families(),
                            ports=sorted(opts.filter.ports), hold_ms=opts.hold_ms,
                            fold=opts.fold)

    def _seeds(self):
        """Sockets that existed before start, read after attaching, so a socket changing state
        now is in the snapshot, in the buffer, or both (the tracker tolerates that). Their
        owners are handed to the samplers too: one scan of every process's descriptors. Each
        names its namespace as the kernel side names it in records (0 if it does not)."""
        now = time.monotonic_ns()
        spaces = owners.all_sockets()
        inodes = {s[6] for socks in spaces.values() for s in socks}
        own = owners.inode_owners(inodes)
        for s in self.samplers:
            s.known_owners({ino: own.get(ino) for ino in inodes})
        named = self.plan.sock_id
        return [(s[0], s[1], s[2], s[3], s[4], s[5], now, own.get(s[6]), ns if named else 0)
                for ns, socks in spaces.items() for s in socks]

    def _not_tcp(self, evs):
        """connect() returns from the syscall hook include non-TCP sockets: dropped here. They
        are rare, so the batch is first counted in C (a Python test per record cost 1.4% of
        the CPU)."""
        if self.plan.connect_hook != "syscall" or not countOf(map(_kind, evs), Kind.CONNECT_RET):
            return evs
        return [e for e in evs if not (e.kind == Kind.CONNECT_RET and e.flags & F_SYSCALL
                                       and owners.fd_is_tcp(e.pid, e.aux) is False)]

    def batches(self):
        src, opts, stop = self.src, self.opts, self.stop
        seeds = self._seeds() if opts.seed else []
        if stop.flag:
            return
        if self.on_ready:
            self.on_ready()
        self.started_ns = time.monotonic_ns()
        deadline = self.started_ns + int(opts.duration * 1e9) if opts.duration else None
        next_loss = next_scan = next_agg = 0
        scan_every = opts.scan_ms * 1_000_000
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        sampling = self.sampling = Background(self.samplers)
        sampling.start()
        tick, last = opts.tick_ms, None
        while not stop.flag:
            got = src.poll(tick)
            now = src.read_ns
            tick = next_tick_ms(opts, len(got), (now - last) / 1e6 if last else 0, src.capacity)
            last = now
            evs = self._not_tcp(got)
            if now >= next_loss:
                evs.extend(src.names(now))
                evs.extend(src.losses(now))
                evs.extend(src.overflows(now))
                next_loss = now + 100_000_000
            if now >= next_agg:
                evs.extend(src.aggregates(now))
                next_agg = now + 1_000_000_000
            evs.extend(sampling.take(now))
            scanned = ()
            if now >= next_scan:
                # the pipeline takes scanned steps up to its ordering window (session.py)
                scanned = src.scan(now - opts.window_ns)
                next_scan = now + scan_every
            yield Batch(evs, now, scanned, seeds)
            seeds = ()
            if deadline and now >= deadline:
                break
        # Drain what is still in the buffers, and take the samplers' last readings.
        last = sampling.finish()
        evs = self._not_tcp(src.poll(0))
        now = src.read_ns
        evs.extend(r for r in last if r.ts_ns <= now)
        evs.extend(src.losses(now))
        evs.extend(src.overflows(now))
        evs.extend(src.aggregates(now))
        yield Batch(evs, now, (), seeds)

    def close(self):
        """Detach; returns what is worth saying about the run's delivery."""
        src = self.src
        src.close()
        notes = self.sampling.close() if self.sampling else []
        if src.perf_lost_total:
            notes.append(f"perf reported {src.perf_lost_total} lost (cross-check of the bpf: "
                         "counts)")
        if src.spilled_total:
            notes.append(f"{src.spilled_total} records the ring buffer refused went through "
                         "the spill buffer instead")
        again, dropped = src.requeued_at_close
        if again or dropped:
            notes.append(f"{again + dropped} early copies of held openings were refused by full "
                         f"buffers: {again} went back in the queue to be sent again"
                         + (f", {dropped} could not (their connections were reported with "
                            "their next transition)" if dropped else ""))
        if src.rescued_total:
            notes.append(f"{src.rescued_total} hits the kernel skipped (BPF recursion) were "
                         "recovered by the raw tracepoint twins")
        return notes
