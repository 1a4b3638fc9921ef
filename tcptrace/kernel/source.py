"""The kernel side from user space, as one object: the programs loaded for a plan
(kernel/loader.py), their records drained (kernel/transport.py), the steps their maps still hold
read on request (scan), and what they lost (kernel/losses.py). Everything it hands out is plain
Python: `Event` and `Lost` records (tcptrace/wire.py).
"""
import os
import time

from tcptrace import errors, states
from tcptrace.kernel import probes
from tcptrace.kernel.aggregates import Aggregates
from tcptrace.kernel.bpfsys import MapScanner
from tcptrace.kernel.loader import Programs
from tcptrace.kernel.losses import Losses
from tcptrace.kernel.transport import Drain
from tcptrace.wire import (F_SCAN, NAMES, OVERFLOWS, Sample, build_event, decoder_for,
                           iter_steps)

_OPENINGS = {(states.CLOSE, states.SYN_SENT), (states.LISTEN, states.SYN_RECV)}


def _opening_after(ev, t_ns):
    """Does the STATE record ev start with a socket's opening step (CLOSE -> SYN_SENT, LISTEN ->
    SYN_RECV) taken after t_ns?"""
    ts, _pid, old, new = next(iter(iter_steps(ev)))
    return ts > t_ns and (old, new) in _OPENINGS


class KernelSource:
    """Compiled, attached programs and their transport. `poll()` returns what arrived."""

    # Ring: 8 MB, about 40,000 records (10,000 connections), against about 8,000 records
    # between two drains at 20k conn/s. Its pages count twice in RSS once it has wrapped (the
    # kernel maps the data area twice).
    def __init__(self, plan, families=(), ports=(), ringbuf_pages=2048, perf_pages=1024,
                 wakeup_events=256, hold_ms=50, fold=False):
        tdir, note = probes.ensure_tracefs()
        self.notes = [note] if note else []
        if tdir is None:
            raise errors.Unavailable("tracefs is not mounted and could not be mounted")
        self.plan = plan
        # Tests only: a small ring, so that it overflows (tests/kernel/test_foundation.py).
        ringbuf_pages = int(os.environ.get("TCPTRACE_TEST_RING_PAGES", ringbuf_pages))
        self.progs = Programs(plan, ringbuf_pages)
        self.notes += self.progs.notes
        self.compile_s = self.progs.compile_s
        self._st, self._perm = decoder = decoder_for(self.progs.record_type())
        self._scanner = MapScanner(self.progs.table("socks").map_fd, 8, self._st.size)
        if self._scanner.values() is None:      # the map is empty now: this only asks the kernel
            self._scanner = None
            self.notes.append("BPF_MAP_LOOKUP_BATCH unsupported (kernels before 5.6): pending "
                              "transitions are read with BCC's per-entry map iteration instead")
        self._drain = Drain(self.progs, plan.transport, decoder, ringbuf_pages, perf_pages,
                            wakeup_events)
        self.notes += self._drain.notes
        self.hold_ns = hold_ms * 1_000_000 if plan.hold else 0
        self._not_due = []          # held_q entries popped before they were due (_due_held)
        # Folding needs held openings (a whole life in one record)
        self.fold = bool(fold and self.hold_ns)
        self._agg = Aggregates(self.progs.table("agg").map_fd) if self.fold else None
        self.progs.configure(families, ports, self.hold_ns // 1000, self.fold)
        self._losses = Losses(self.progs, tdir, self.notes, plan.transport == "ringbuf")
        self._overflows = self.progs.table("overflows") if plan.overflow else None
        self._overflows_seen = None     # the first reading is sent even when empty: it says
                                        # that overflows are counted per listener at all
        # The running kernel's names for the reset reasons records carry (numbers differ
        # between kernels), sent once: names()
        self._names = {"rst_reasons": {str(k): v for k, v in
                                       probes.reset_reasons()[2].items()}} \
            if plan.rst_reason else None
        self.read_ns = None

    @property
    def perf_lost_total(self):
        return self._drain.perf_lost_total

    @property
    def spilled_total(self):
        return self._losses.spilled_total

    @property
    def rescued_total(self):
        return self._losses.rescued_total

    def requeued(self):
        """(early copies refused and requeued, refused and not requeued) (bpf/hold.c)."""
        if not self.hold_ns:
            return 0, 0
        m = self.progs.table("requeued")
        return tuple(sum(m[m.Key(i)]) for i in (0, 1))

    @property
    def capacity(self):
        """Records the transport's buffer holds (transport.Drain)."""
        return self._drain.capacity

    def poll(self, timeout_ms):
        """Wait up to timeout_ms, then drain everything buffered. Returns [Event]; `read_ns` is
        then the time up to which the stream is complete (transport.Drain.poll)."""
        self.read_ns, out = self._drain.poll(timeout_ms)
        return out

    def scan(self, upto_ns):
        """The steps still pending in the kernel's `socks` map (sockets resting between the
        states at which the kernel sends them), as STATE Events flagged F_SCAN. Steps already
        taken this way are skipped when the record carrying them arrives (tcptrace/lifecycle).
        The pipeline takes only those stamped up to upto_ns (the end of its ordering window)
        and leaves the rest to a later scan."""
        out = []
        chunks = self._scanner.values() if self._scanner is not None else None
        if chunks is None:
            self._scanner = None
            socks = self.progs.table("socks")
            chunks = [b"".join(bytes(v) for v in socks.values())]
        perm, flag = self._perm, F_SCAN
        # Folding: a socket whose opening is younger than half the hold time may yet be folded
        # whole (bpf/aggregate.c), and then no record of it comes: user space must not learn
        # of it from a scan either. The next scan shows it again if it is still there.
        young = time.monotonic_ns() - self.hold_ns // 2 if self.fold else 0
        for raw in chunks:
            for t in self._st.iter_unpack(raw):
                ev = build_event(t, perm)
                if ev.nsteps and not (young and _opening_after(ev, young)):
                    out.append(ev._replace(flags=ev.flags | flag))
        if self.hold_ns:
            out += self._due_held(upto_ns)
        return out

    # How long one scan may spend popping held sockets (a peek and a pop each; the read of each
    # one taken follows, about 6 us a socket in all on this machine kind): 12,000 openings at
    # once are all taken within a few scans, where a cap of 256 a scan took 4 s (39 s
    # emulated) and reported some that late. A fifth of the default scan interval, so that
    # the buffers are still drained in time.
    HELD_BUDGET_NS = 20_000_000

    def _due_held(self, upto_ns):
        """Held sockets (bpf/hold.c: held) that no hit has sent early: on a quiet host
        nothing runs tt_flush. Taken once they are twice hold_us old, which under traffic the
        kernel has long done; read, not sent, so they come as scans (and again with their next
        transition, which user space skips as already taken). Popped, so read once: never one
        stamped after upto_ns, which the pipeline would not take (a slow drain between the
        clock read and this scan can put the due time past it). As many as HELD_BUDGET_NS
        allows to pop; the rest wait for the next scan."""
        q, held = self.progs.table("held_q"), self.progs.table("held")
        start = time.monotonic_ns()
        due, stop = min(start - 2 * self.hold_ns, upto_ns), start + self.HELD_BUDGET_NS
        heads = [h for h in self._not_due if h.ts <= due]
        self._not_due = [h for h in self._not_due if h.ts > due]
        while True:
            try:
                if q.peek().ts > due:
                    break
                head = q.pop()
            except KeyError:        # empty, or tt_flush took the head meanwhile
                break
            # tt_flush can take the head between the peek and the pop, and the pop then gets
            # the next, which may not be due: kept for a later scan, since the kernel no
            # longer has it to send (under a storm that lost openings until their close)
            (heads if head.ts <= due else self._not_due).append(head)
            if time.monotonic_ns() >= stop:     # at least one a scan, however slow
                break
        out = []
        for head in heads:
            try:
                raw = bytes(held[held.Key(head.sk)])
            except KeyError:        # the socket moved on
                continue
            ev = build_event(self._st.unpack(raw), self._perm)
            if ev.ts_ns == head.ts:
                out.append(ev._replace(flags=ev.flags | F_SCAN))
        return out

    def aggregates(self, now_ns):
        """[Sample] of the healthy connections folded since the last call (kernel/aggregates.py);
        [] when not folding."""
        return self._agg.read(now_ns) if self._agg is not None else []

    def losses(self, now_ns):
        """Lost records for what was lost since the last call (kernel/losses.py)."""
        return self._losses.read(now_ns)

    def overflows(self, now_ns):
        """[Sample] of bpf/listen.c's `overflows` map (final ACKs each listener dropped with
        its accept queue full, counted since the entry was made) at the first call and when it
        changed since the last: [[skaddr (hex), netns, family, port, drops], ...]. A handful
        of entries, read on the loss counters' timer."""
        if self._overflows is None:
            return []
        rows = sorted([f"{k.value:x}", v.id.netns, v.id.family, v.id.port, v.drops]
                      for k, v in self._overflows.items())
        if rows == self._overflows_seen:
            return []
        self._overflows_seen = rows
        return [Sample(now_ns, OVERFLOWS, 0, {"listeners": rows})]

    def names(self, now_ns):
        """[Sample] of the kernel's names for the numbers in records (reset reasons), at the
        first call; [] after, and on kernels whose records carry none."""
        names, self._names = self._names, None
        return [Sample(now_ns, NAMES, 0, names)] if names else []

    def prog_stats(self):
        return self.progs.prog_stats()

    def close(self):
        self.requeued_at_close = self.requeued()
        self._losses.close()
        self._drain.close()
        self.progs.close()
