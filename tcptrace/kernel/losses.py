"""What the kernel side lost, as `Lost` records (tcptrace/wire.py), from counters that only grow:

  - "bpf:<kind>": outputs the buffer refused, counted by the BPF program itself (exact; perf's
    own loss records count the same drops but arrive late, so they are only a cross-check);
  - "recursion:<prog>": hits the kernel skipped because a BPF program was already running on
    that CPU (bpf_prog_info.recursion_misses), which no other tool reports, less the ones the
    program's twin took (bpf/raw.c);
  - "unseen:<tracepoint>": hits of inet_sock_set_state and tcp_retransmit_skb the kernel made
    without running the BPF program and without counting a miss either, found by counting the
    same tracepoint in a tracefs instance (kernel/tally.py).

Every pair of counters is read in the order that lets a race only under-report, never report a
loss that did not happen.
"""
import ctypes

from tcptrace.kernel.bpfsys import Counters, map_info
from tcptrace.kernel.tally import Tally
from tcptrace.wire import Kind, Lost


class Losses:
    """Deltas of the loss counters of loaded programs (`progs`: loader.Programs) since the last
    read. `spill`: the plan has the ring buffer's spill buffer (bpf/transport.c: spilled counts
    what it took). `notes` gets what cannot be counted here."""

    def __init__(self, progs, tracefs, notes, spill):
        self.progs = progs
        self.spill = spill
        self.spilled_total = 0
        self.rescued_total = 0
        self._seen_drops = {}
        self._seen_misses = {}
        self._drops_c = _counters(progs, "drops")
        self._spilled = _counters(progs, "spilled") if spill else None
        self._rescued = _counters(progs, "rescued") if progs.twins else None
        self._hits = _counters(progs, "hits")
        self.tallied = []
        for event, kind, tag in TALLIED:
            prog = progs.hook_progs.get(kind)
            if prog is None:
                continue                    # a hook this plan does not attach
            try:
                tally = Tally(tracefs, event, tag)
            except (OSError, ValueError) as e:
                notes.append(f"no tracefs count of {event} ({e}): its hits the kernel makes "
                             "without running BPF would go uncounted")
                continue
            self.tallied.append(_Tallied(self, tally, prog, kind))

    def read(self, now_ns):
        """Lost records for what was lost since the last call. The tallies first, then BPF's
        counts, then the rescues (see _misses and _Tallied)."""
        tallies = [t.tally.count() for t in self.tallied]
        if self.spill:
            self.spilled_total = sum(self._spilled.sums())
        out = self._drops(now_ns)
        stats, rescued = self.bpf_counts()
        out += self._misses(now_ns, stats, rescued)
        if self.tallied:
            hits = self._hits.sums()
            for t, count in zip(self.tallied, tallies):
                n = t.read(count, t.visible_in(hits, stats, rescued))
                if n:
                    out.append(Lost(now_ns, n, t.where))
        return out

    def bpf_counts(self):
        """({program: (runs, run time, recursion misses)} of the programs that can miss hits,
        [hits the twins rescued, per Kind] or None). Misses before rescues: a twin counts its
        rescue after the kernel counted the miss, so read in this order the difference can only
        fall short, never report a false loss."""
        stats = self.progs.prog_stats(twins=False)
        rescued = self._rescued.sums() if self._rescued is not None else None
        if rescued is not None:
            self.rescued_total = sum(rescued)
        return stats, rescued

    def _drops(self, now_ns):
        out = []
        for k, total in enumerate(self._drops_c.sums()):
            kind = Kind.NAMES.get(k, str(k))
            prev = self._seen_drops.get(kind, 0)
            if total > prev:
                out.append(Lost(now_ns, total - prev, f"bpf:{kind}"))
                self._seen_drops[kind] = total
        return out

    def _misses(self, now_ns, stats, rescued):
        # A twin is skipped only when it re-enters itself on a CPU, and then its first program
        # was not: nothing is lost (prog_stats leaves the twins out).
        twins = self.progs.twins
        out = []
        for name, (_cnt, _t, misses) in stats.items():
            if misses is None:
                continue
            kind = twins.get(name)
            if kind is not None and rescued is not None:
                misses -= rescued[kind]
            prev = self._seen_misses.get(name, 0)
            if misses > prev:
                out.append(Lost(now_ns, misses - prev, f"recursion:{name}"))
                self._seen_misses[name] = misses
        return out

    def close(self):
        for t in self.tallied:
            t.tally.close()
        self.tallied = []


# The tracepoints counted without BPF: (event, the Kind of its program's `hits` and `rescued`
# slots, the tally instance's tag). Retransmissions, because a SYN retransmission the kernel
# ran no program for leaves a failed connect's count short with nothing to say so.
TALLIED = (("sock/inet_sock_set_state", Kind.STATE, None),
           ("tcp/tcp_retransmit_skb", Kind.RETRANS, "retrans"))


def _counters(progs, name):
    """A per-CPU counter array of the loaded program, read whole (bpfsys.Counters)."""
    table = progs.table(name)
    return Counters(table.map_fd, map_info(table.map_fd)[3],
                    lambda i: sum(table[ctypes.c_int(i)]))


class _Tallied:
    """One tallied tracepoint: its hits counted in tracefs against those BPF was shown."""

    def __init__(self, losses, tally, prog, kind):
        self.losses, self.tally, self.prog, self.kind = losses, tally, prog, kind
        self.twinned = prog in losses.progs.twins
        self.where = "unseen:" + tally.event.rsplit("/", 1)[1]
        self.unseen_total = 0
        self.base = self._baseline()

    def visible_in(self, hits, stats, rescued):
        """Hits BPF was shown, from counts read after the tally: the program's runs, and the
        hits it was skipped for, which the kernel counts as misses (a regular tracepoint
        program's since 6.7: earlier kernels skip it without counting) and the twin counts as
        rescued. Where both count, the rescued are some of the misses; where only the twins do,
        they are all we know of."""
        st = stats.get(self.prog)
        misses = (st[2] or 0) if st else 0
        saved = rescued[self.kind] if self.twinned and rescued is not None else 0
        return hits[self.kind] + max(misses, saved)

    def visible(self):
        """visible_in() with counts read now."""
        losses = self.losses
        hits = losses._hits.sums()
        stats, rescued = losses.bpf_counts()
        return self.visible_in(hits, stats, rescued)

    def read(self, count, visible):
        """Hits unseen since the last read, from the tally's count and BPF's, read in that
        order (Tally: the difference can only fall short)."""
        unseen = count - visible - self.base
        if unseen <= self.unseen_total:
            return 0
        n, self.unseen_total = unseen - self.unseen_total, unseen
        return n

    def _baseline(self):
        """Tally less BPF-visible hits at start, read as BPF, tally, BPF: the first difference
        can only exceed the true one (hits that ran their program between the reads count as
        unseen), so losses measured against it can only fall short. Equal BPF reads mean no
        hit came in between: the difference is exact. A few tries for such a moment."""
        best = None
        for _ in range(8):
            v1 = self.visible()
            t = self.tally.count()
            v2 = self.visible()
            best = t - v1 if best is None else min(best, t - v1)
            if v1 == v2:
                break
        return best
