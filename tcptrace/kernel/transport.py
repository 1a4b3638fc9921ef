"""Records from the kernel to user space: the events map (a BPF ring buffer, or per-CPU perf
buffers) drained into `Event`s on the caller's timer.

The BPF side never wakes the reader (BPF_RB_NO_WAKEUP on the ring buffer, a high wakeup_events
on perf buffers): waking per event costs 8-10 us of the traced workload's time on small
machines. The callbacks only decode and append; everything time-based runs from the caller.
"""
import ctypes
import mmap
import os
import platform
import struct
import time

from tcptrace.wire import Event, build_event


def ring_stride(payload):
    """Bytes a record of `payload` bytes takes in a BPF ring buffer: its 8-byte header, then the
    payload padded to 8 bytes (kernel/bpf/ringbuf.c)."""
    return (8 + payload + 7) & ~7


class Pacer:
    """Spaces the ring's reads `period` apart, counting the time the caller spent on the last
    batch against the wait (a sleep of `period` after each batch would not): the ring then
    never holds much more than one period of records however long the batches take, and a
    batch that took longer than the period is followed by a read at once."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep):
        self._clock = clock
        self._sleep = sleep
        self._due = None

    def wait(self, period):
        if period > 0 and self._due is not None:
            left = self._due - self._clock()
            if left > 0:
                self._sleep(left)
        self._due = self._clock() + period


class RingReader:
    """Reads the BPF ring buffer map through its own mmap'ed pages instead of BCC's per-record
    ctypes callback, which costs more than everything else per event put together.

    Layout (uapi, kernel/bpf/ringbuf.c): page 0 holds consumer_pos (ours to write); from page 1,
    producer_pos, then the data pages mapped twice in a row, so a record that wraps is still
    contiguous. Each record is an 8-byte header (u32 length with BUSY bit 31 and DISCARD bit 30,
    u32 page offset) then the payload, padded to 8 bytes. Every record here is one tt_event, so a
    run of them decodes with one struct.iter_unpack call.

    Only on x86-64, whose loads are not reordered with other loads: the kernel publishes a record
    by clearing BUSY with a release store, and Python cannot issue the acquire barrier weaker
    memory models would need. Elsewhere BCC's reader is used.
    """
    BUSY = 1 << 31
    DISCARD = 1 << 30

    def __init__(self, map_fd, data_size, event_struct, perm):
        pg = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, pg, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(map_fd, pg + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=pg)
        self._view = memoryview(self._prod)
        self._base = pg
        self._mask = data_size - 1
        self.payload = event_struct.size
        self.stride = ring_stride(self.payload)
        pad = self.stride - 8 - self.payload
        self._st = struct.Struct("<II" + event_struct.format.lstrip("<@=") + (f"{pad}x" if pad else ""))
        self._perm = perm
        self._u64 = struct.Struct("<Q")

    def read(self, out):
        cons = self._u64.unpack_from(self._cons, 0)[0]
        prod = self._u64.unpack_from(self._prod, 0)[0]
        if cons >= prod:
            return 0
        stride, base, mask, busy = self.stride, self._base, self._mask, self.BUSY
        want = self.payload
        perm = self._perm
        new, E = tuple.__new__, Event     # Event._make less its length check: the struct's
        append = out.append               # field count is Event's by construction
        n0 = len(out)
        while cons < prod:
            off = base + (cons & mask)
            count = (prod - cons) // stride
            stop = False
            for t in self._st.iter_unpack(self._view[off: off + count * stride]):
                hdr = t[0]
                # Almost every header is the bare length (neither BUSY nor DISCARD): one compare
                if hdr != want:
                    if hdr & busy:
                        stop = True           # reserved, not yet committed: read it next time
                        break
                    if (hdr & 0x3fffffff) != want:
                        raise RuntimeError(f"ring buffer record of {hdr & 0x3fffffff} bytes, "
                                           f"expected {want}")
                    cons += stride            # discarded
                    continue
                if perm is None:
                    append(new(E, t[2:]))
                else:
                    append(build_event(t[2:], perm))
                cons += stride
            if stop or count == 0:
                break
        self._u64.pack_into(self._cons, 0, cons)
        return len(out) - n0

    def close(self):
        self._view.release()
        self._prod.close()
        self._cons.close()


class Drain:
    """The loaded program's `events` map (and, with the ring buffer, its `spill` perf buffer:
    bpf/transport.c) read into a batch of Events. `progs` is the loader's Programs;
    `decoder` is (struct, perm) from wire.decoder_for."""

    def __init__(self, progs, transport, decoder, ringbuf_pages, perf_pages, wakeup_events):
        self.b = progs.b
        self.ring_buffer = transport == "ringbuf"
        self.notes = []
        self.perf_lost_total = 0        # perf's own loss records: a late cross-check of `drops`
        self._batch = batch = []
        self._pacer = Pacer()
        st, perm = decoder
        unpack, size, string_at = st.unpack_from, st.size, ctypes.string_at
        # How many records the buffer holds (for perf, one CPU's: each fills its own), so the
        # caller can pace its reads to what is coming
        page = os.sysconf("SC_PAGE_SIZE")
        self.capacity = (ringbuf_pages * page // ring_stride(size) if self.ring_buffer
                         else perf_pages * page // (size + 16))

        def on_record(_cpu_or_ctx, data, _size):
            batch.append(build_event(unpack(string_at(data, size)), perm))
        self._cb = on_record            # keep the ctypes callback alive
        self._ring = None
        table = progs.table("events")
        if self.ring_buffer:
            if os.environ.get("TCPTRACE_RING_READER", "auto") != "bcc" \
                    and platform.machine() == "x86_64":
                try:
                    self._ring = RingReader(table.map_fd,
                                            ringbuf_pages * os.sysconf("SC_PAGE_SIZE"), st, perm)
                except (OSError, ValueError) as e:
                    self.notes.append(f"ring buffer mmap failed ({e}): using BCC's reader")
            if self._ring is None:
                table.open_ring_buffer(on_record)
            # Records the ring refused; rare, so BCC's reader will do.
            progs.table("spill").open_perf_buffer(on_record, page_cnt=64, lost_cb=self._on_lost,
                                                   wakeup_events=wakeup_events)
        else:
            table.open_perf_buffer(on_record, page_cnt=perf_pages, lost_cb=self._on_lost,
                                   wakeup_events=wakeup_events)

    def _on_lost(self, count):
        self.perf_lost_total += count

    def poll(self, timeout_ms):
        """Wait up to timeout_ms, then drain everything buffered. Returns (read_ns, [Event]):
        read_ns is the clock just before the buffers were read. Every record not returned was
        committed after it, so it is the time up to which the stream is complete (decoding a
        large batch takes long enough that the time after it would not be)."""
        b = self.b
        if self.ring_buffer:
            # Records are written without wake-ups, so epoll would sleep the whole timeout anyway.
            self._pacer.wait(timeout_ms / 1000)
            read_ns = time.monotonic_ns()
            if self._ring is not None:
                self._ring.read(self._batch)
            else:
                b.ring_buffer_consume()
            b.perf_buffer_consume()
        else:
            b.perf_buffer_poll(timeout_ms)
            read_ns = time.monotonic_ns()
            b.perf_buffer_consume()
        out = self._batch[:]
        del self._batch[:]
        return read_ns, out

    def close(self):
        if self._ring is not None:
            self._ring.close()
            self._ring = None
