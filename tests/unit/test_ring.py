"""RingReader reads the BPF ring buffer's pages itself (tcptrace/kernel/transport.py). Here the pages are a
memfd laid out as the kernel maps a ring: the consumer page, the producer page, then the data area
twice in a row. Records are written as the kernel commits them: an 8-byte header (length, BUSY and
DISCARD bits) and the tt_event payload, padded to 8 bytes."""
import mmap
import os
import struct

import pytest

from tcptrace import wire
from tcptrace.wire import Kind
from tcptrace.kernel.transport import RingReader
from tcptrace.wire import decoder_for
from test_wire import header_struct

PG = mmap.PAGESIZE
DATA = 4 * PG


@pytest.fixture
def ring():
    if not hasattr(os, "memfd_create"):
        pytest.skip("no memfd_create")
    fd = os.memfd_create("tcptrace-test-ring")
    os.ftruncate(fd, 2 * PG + 2 * DATA)
    S = header_struct()
    st, perm = decoder_for(S)
    reader = RingReader(fd, DATA, st, perm)
    pages = mmap.mmap(fd, 2 * PG + 2 * DATA)

    class Ring:
        size = st.size
        stride = (8 + st.size + 7) & ~7
        prod = 0

        def put(self, raw, flags=0, pos=None):
            """Write a record at the producer position (both copies of the data area), and
            publish it unless it is BUSY."""
            pos = self.prod if pos is None else pos
            rec = struct.pack("<II", self.size | flags, 0) + bytes(raw)
            rec += bytes(self.stride - len(rec))
            for copy in (0, DATA):
                at = 2 * PG + copy + (pos % DATA)
                end = min(len(rec), 2 * PG + 2 * DATA - at)
                pages[at:at + end] = rec[:end]
            self.prod = pos + self.stride
            pages[PG:PG + 8] = struct.pack("<Q", self.prod)
            return pos

        def mark(self, pos, flags, size=None):
            for copy in (0, DATA):
                at = 2 * PG + copy + (pos % DATA)
                pages[at:at + 4] = struct.pack("<I", (size or self.size) | flags)

        def consumer(self):
            return struct.unpack_from("<Q", pages, 0)[0]

    r = Ring()
    yield r, reader, S
    reader.close()
    pages.close()
    os.close(fd)


def _state(S, i):
    raw = S(ts_ns=1000 + i, skaddr=0xffff888100000000 + 0x100 * i, pid=7, kind=Kind.STATE,
            family=2, oldstate=2, newstate=1, sport=40000 + i, dport=80, nsteps=2)
    raw.comm = b"curl"
    raw.step_ts[:2] = [900 + i, 1000 + i]
    raw.step_pid[:2] = [7, 0]
    raw.step_old[:2] = [7, 2]
    raw.step_new[:2] = [2, 1]
    return raw


def test_reads_committed_records_and_skips_discarded(ring):
    r, reader, S = ring
    for i in range(5):
        r.put(_state(S, i), flags=RingReader.DISCARD if i == 2 else 0)
    out = []
    assert reader.read(out) == 4
    assert [e.sport for e in out] == [40000, 40001, 40003, 40004]
    assert list(wire.iter_steps(out[0])) == [(900, 7, 7, 2), (1000, 0, 2, 1)]
    assert wire.comm_str(out[3].comm) == "curl"
    assert r.consumer() == 5 * r.stride          # the discarded one is consumed too


def test_stops_at_a_busy_record_and_reads_it_once_committed(ring):
    r, reader, S = ring
    r.put(_state(S, 0))
    busy = r.put(_state(S, 1), flags=RingReader.BUSY)
    r.put(_state(S, 2))                          # committed, but after a busy one
    out = []
    assert reader.read(out) == 1
    assert r.consumer() == busy
    r.mark(busy, 0)
    assert reader.read(out) == 2
    assert [e.sport for e in out] == [40000, 40001, 40002]
    assert reader.read(out) == 0


def test_record_across_the_end_of_the_data_area(ring):
    """The kernel maps the data area twice so a record that wraps is contiguous: the reader must
    read it whole and carry on at the start."""
    r, reader, S = ring
    n = DATA // r.stride
    out = []
    for i in range(n + 3):
        r.put(_state(S, i))
        if i % 7 == 6:
            reader.read(out)
    reader.read(out)
    assert [e.sport for e in out] == [40000 + i for i in range(n + 3)]
    assert [e.ts_ns for e in out] == [1000 + i for i in range(n + 3)]


def test_wrong_record_size_is_an_error_not_garbage(ring):
    r, reader, S = ring
    r.put(_state(S, 0))
    r.mark(0, 0, size=r.size + 8)          # a layout mismatch
    with pytest.raises(RuntimeError, match="record of"):
        reader.read([])


class _Clock:
    """A fake monotonic clock; sleeping advances it and is logged."""

    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.slept.append(round(s, 6))
        self.now += s


def test_reads_are_a_period_apart_whatever_the_batches_cost():
    from tcptrace.kernel.transport import Pacer
    clock = _Clock()
    p = Pacer(clock, clock.sleep)
    p.wait(0.1)                     # the first read is at once
    assert clock.slept == []
    clock.now += 0.03               # the batch took 30 ms: 70 ms of the period are left
    p.wait(0.1)
    assert clock.slept == [0.07]
    clock.now += 0.15               # longer than the period: read again at once
    p.wait(0.1)
    assert clock.slept == [0.07]
    clock.now += 0.01
    p.wait(0)                       # the final drain never waits
    assert clock.slept == [0.07]
    p.wait(0.1)                     # nothing to wait for after it either...
    assert clock.slept == [0.07]
    p.wait(0.1)                     # ...but a whole period after that read
    assert clock.slept == [0.07, 0.1]
