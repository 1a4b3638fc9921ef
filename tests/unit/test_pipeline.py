"""The pipeline writes findings in time order, fed as the live loop feeds it: records from the
buffers each tick, and records read from the kernel's maps (scans), which arrive late."""
import io
import json

from tcptrace import states as S
from tcptrace.output.jsonl import JsonSink
from tcptrace.wire import F_SCAN, Batch, Kind
from tcptrace.options import Options
from tcptrace.session import Pipeline
from streams import MS, SEC, active_open, ev, grouped, state

WALL = 1_700_000_000 * SEC


def _run(opts, scan_delay_ns, tick_ms=None):
    """A connection opened at 1 s and left open, whose opening steps the tracer takes from the
    kernel's held map (a quiet host: kernel/source.py: KernelSource._due_held) scan_delay_ns later, and a
    refused connect 10 ms after it, whose record comes through the buffer at once. Fed in ticks
    of tick_ms (opts.tick_ms: 100 ms), as the live loop does. Returns the pipeline and the
    findings' (time, type)."""
    t0 = SEC
    opening, = grouped(active_open(t0, 0x1000, 40000, 443, comm="long"))
    early = opening._replace(flags=opening.flags | F_SCAN)
    refused = grouped([state(t0 + 10 * MS, 0x2000, S.CLOSE, S.SYN_SENT, comm="curl", rport=81),
                       ev(Kind.RECV_RESET, t0 + 11 * MS - 10, 0x2000, pid=0, lport=40001,
                          rport=81),
                       state(t0 + 11 * MS, 0x2000, S.SYN_SENT, S.CLOSE, pid=0, comm="swapper/0",
                             lport=40001, rport=81)])
    out = io.StringIO()
    pipe = Pipeline(opts, JsonSink(out, WALL))
    queue = sorted(refused, key=lambda r: r.ts_ns)
    scan_at = opening.ts_ns + scan_delay_ns
    tick = tick_ms or opts.tick_ms
    for now in sorted({t0 + i * tick * MS for i in range(1, 21)} | {scan_at}):
        pipe.feed(Batch([r for r in queue if r.ts_ns <= now], now,
                        [early] if now == scan_at else ()))
        queue = [r for r in queue if r.ts_ns > now]
    pipe.finish()
    found = [json.loads(line) for line in out.getvalue().splitlines()]
    return pipe, [(f["time"], f["type"]) for f in found]


def test_a_held_opening_taken_from_the_map_on_a_quiet_host_is_still_written_in_order():
    opts = Options(json=True)
    # The latest it can come: due at twice the hold time, then taken by a scan, which runs
    # after a poll: up to a scan interval and a tick after that.
    worst = (2 * opts.hold_ms + opts.scan_ms + opts.tick_ms) * MS
    pipe, found = _run(opts, worst)
    assert [t for _, t in found] == ["connect", "refused"]
    assert found == sorted(found)
    assert pipe._held.late == 0
    assert "out of time order" not in pipe.summary_line()


def test_in_order_too_where_report_drains_at_its_quiet_pace():
    """`report --interval` is written in time order, and drains every quiet tick while little
    comes (kernel/live.py: next_tick_ms); a scan then runs every quiet tick, after a poll."""
    opts = Options(report=True, interval=2.0)
    quiet = opts.quiet_tick_ms
    assert quiet == 500
    worst = (2 * opts.hold_ms + quiet + quiet) * MS
    pipe, found = _run(opts, worst, tick_ms=quiet)
    assert found == sorted(found) and len(found) == 2
    assert pipe._held.late == 0


def test_a_finding_later_than_the_output_window_is_written_and_counted():
    opts = Options(json=True)
    pipe, found = _run(opts, 2 * SEC // 3)      # far later than any scan would take it
    assert sorted(t for _, t in found) == ["connect", "refused"]
    assert found != sorted(found)
    assert pipe._held.late == 1
    assert "1 findings written out of time order" in pipe.summary_line()


def _held_source(ages_ns):
    """A KernelSource whose kernel holds one opening per age in ages_ns (their sockets 0x1000,
    0x1001, ... held that long ago, queued oldest first), over fake held and held_q maps.
    Returns (source, now, the queue)."""
    import collections
    import time
    from types import SimpleNamespace
    from test_wire import header_struct
    from tcptrace.kernel.source import KernelSource
    from tcptrace.wire import decoder_for

    S = header_struct()
    now = time.monotonic_ns()
    held, q = {}, collections.deque()
    for i, age in enumerate(ages_ns):
        sk = 0x1000 + i
        raw = S(ts_ns=now - age, skaddr=sk, sport=40000, dport=443, kind=int(Kind.STATE),
                family=2, oldstate=2, newstate=1, nsteps=1)
        raw.step_ts[0], raw.step_old[0], raw.step_new[0] = now - age, 2, 1
        held[sk] = bytes(raw)
        q.append(SimpleNamespace(sk=sk, ts=now - age))

    class Queue:
        def peek(self):
            if not q:
                raise KeyError
            return q[0]

        def pop(self):
            if not q:
                raise KeyError
            return q.popleft()

    class Held(dict):
        Key = staticmethod(lambda sk: sk)

    src = KernelSource.__new__(KernelSource)
    src.progs = SimpleNamespace(table={"held_q": Queue(), "held": Held(held)}.get)
    src._st, src._perm = decoder_for(S)
    src.hold_ns = 50 * MS
    src._not_due = []
    return src, now, q


def test_a_held_opening_is_popped_only_once_the_pipeline_will_take_it():
    """KernelSource._due_held pops held openings from the kernel's queue: read once. It must
    not pop one stamped after the end of the pipeline's ordering window, which the pipeline
    would drop (the drain before a scan can take longer than the hold time in a slow VM:
    the CI VM's eviction test then waited 900 s for an opening popped and dropped)."""
    src, now, q = _held_source([900 * MS, 200 * MS])    # both past twice the hold time
    # the clock read before the drain was 300 ms ago; the window is 20 ms before that
    got = src._due_held(upto_ns=now - 320 * MS)
    assert [e.skaddr for e in got] == [0x1000]
    assert [x.sk for x in q] == [0x1001]                 # still queued for a later scan
    assert [e.skaddr for e in src._due_held(upto_ns=now)] == [0x1001]


def test_a_backlog_of_held_openings_is_taken_as_fast_as_the_scan_budget_allows():
    """Thousands of connections opened at once on a host that then goes quiet: every opening is
    taken by user space's scans. A scan takes what its time budget allows, not a fixed count
    (256 a scan reported the last of 12,000 four seconds late, 39 s in the emulated VM); what
    the budget leaves stays queued for the next scan, and each is taken once."""
    n = 3000
    src, now, q = _held_source([n * MS - i * 100 for i in range(n)])
    src.HELD_BUDGET_NS = 60 * SEC                       # a scan with time for all of them
    assert [e.skaddr for e in src._due_held(upto_ns=now)] == [0x1000 + i for i in range(n)]
    assert not q

    src, now, q = _held_source([n * MS - i * 100 for i in range(n)])
    src.HELD_BUDGET_NS = 1                              # time for (about) one
    first = src._due_held(upto_ns=now)
    assert 1 <= len(first) < n
    src.HELD_BUDGET_NS = 60 * SEC
    rest = src._due_held(upto_ns=now)
    assert [e.skaddr for e in first + rest] == [0x1000 + i for i in range(n)]


def test_a_held_opening_popped_before_it_is_due_waits_for_a_later_scan():
    """The kernel's tt_flush can pop the head of held_q between user space's peek and pop; the
    pop then returns the next entry, which may not be due. It must not come out stamped past
    the pipeline's window (dropped there, and gone from the kernel's queue: reported only at
    its close, as under a 100k-connection storm), but at a later scan."""
    src, now, q = _held_source([900 * MS, 150 * MS])
    peek = q[0]
    flusher_took_head = [True]

    class Racing:
        def peek(self):
            if not q:
                raise KeyError
            return peek

        def pop(self):
            if flusher_took_head and flusher_took_head.pop():
                q.popleft()                             # tt_flush sent it meanwhile
            if not q:
                raise KeyError
            return q.popleft()
    tables = {"held_q": Racing(), "held": src.progs.table("held")}
    src.progs = type(src.progs)(table=tables.get)
    # the pipeline's window ends 320 ms ago (as above): the second is not due yet
    assert src._due_held(upto_ns=now - 320 * MS) == []
    assert not q                                        # out of the kernel's queue
    later = src._due_held(upto_ns=now + 200 * MS)
    assert [e.skaddr for e in later] == [0x1001]
