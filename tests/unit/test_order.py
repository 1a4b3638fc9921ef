import random

from tcptrace.order import Reorderer
from streams import state, MS


def test_out_of_order_input_comes_out_ordered():
    rnd = random.Random(7)
    recs = [state(1000 + i * 10_000, sk=i, old=7, new=2) for i in range(2000)]
    shuffled = recs[:]
    # Per-CPU buffers drained one CPU at a time: displacement bounded by the window.
    for i in range(0, len(shuffled) - 50, 50):
        chunk = shuffled[i:i + 50]
        rnd.shuffle(chunk)
        shuffled[i:i + 50] = chunk
    r = Reorderer(window_ns=2 * MS)
    out = []
    for rec in shuffled:
        r.push(rec)
        out.extend(r.release(rec.ts_ns))
    out.extend(r.drain())
    assert [x.ts_ns for x in out] == sorted(x.ts_ns for x in recs)
    assert r.late == 0


def test_nothing_leaves_before_the_window_passes():
    r = Reorderer(window_ns=5 * MS)
    r.push(state(10 * MS, 1, 7, 2))
    assert r.release(14 * MS) == []
    assert len(r.release(15 * MS)) == 1


def test_late_records_are_counted_not_dropped():
    r = Reorderer(window_ns=1 * MS)
    r.push(state(10 * MS, 1, 7, 2))
    assert len(r.release(20 * MS)) == 1
    r.push(state(5 * MS, 2, 7, 2))           # arrived after its slot was released
    assert r.late == 1
    assert [x.skaddr for x in r.drain()] == [2]


def test_equal_timestamps_keep_arrival_order():
    r = Reorderer(window_ns=0)
    recs = [state(100, sk, 7, 2) for sk in (3, 1, 2)]
    for x in recs:
        r.push(x)
    assert [x.skaddr for x in r.release(100)] == [3, 1, 2]
