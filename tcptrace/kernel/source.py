"""The kernel side from user space: compile, attach, drain, count what was lost.

The only module that imports bcc. Everything it hands out is plain Python: `Event` records and
`Lost` records (tcptrace/wire.py).

Delivery: the BPF side never wakes the reader (BPF_RB_NO_WAKEUP on the ring buffer, a high
wakeup_events on perf buffers): waking per event costs 8-10 us of the traced workload's time on
small machines. The session drains on a short timer instead.

Loss accounting, all of it reported as `Lost` records:
  - "bpf:<kind>": outputs the buffer refused, counted by the BPF program itself (exact);
  - perf's own loss records are kept only as a cross-check (`perf_lost_total`): they count the
    same drops as "bpf:" and arrive late (the kernel writes one only when a later record fits);
  - "recursion:<prog>": tracepoint hits the kernel skipped because a BPF program was already
    running on that CPU (bpf_prog_info.recursion_misses), which no other tool reports, less the
    ones the raw tracepoint twins recovered (the recursion rescue, bpf/tcptrace.c);
  - "unseen:inet_sock_set_state": state transitions the kernel made without running the BPF
    program and without counting a miss either, found by counting the same tracepoint in a
    tracefs instance (Tally).
"""
import contextlib
import ctypes
import os
import platform
import struct
import time

from importlib.resources import files as _res_files

from tcptrace import errors
from tcptrace.kernel.probes import LIBC, NR_BPF, bpf
from tcptrace.wire import F_SCAN, Event, Kind, Lost, build_event, decoder_for


def bpf_dir():
    """Where bpf/*.c lives: inside the installed package, or bpf/ of a source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(os.path.dirname(here)), "bpf")
    if os.path.exists(os.path.join(checkout, "tcptrace.c")):
        return checkout
    p = str(_res_files("tcptrace.bpf"))
    if os.path.exists(os.path.join(p, "tcptrace.c")):
        return p
    raise errors.Unavailable("BPF sources not found (a broken install: bpf/tcptrace.c missing)")


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def prog_stats(fd):
    """(run_cnt, run_time_ns, recursion_misses) of a loaded program, from BPF_OBJ_GET_INFO_BY_FD.
    Offsets are those of the uapi struct bpf_prog_info (stable ABI; recursion_misses since 5.12)."""
    if NR_BPF is None:
        return None
    buf = ctypes.create_string_buffer(256)
    attr = _InfoAttr(fd, 256, ctypes.addressof(buf))
    if bpf(15, attr)[0] != 0:                                 # BPF_OBJ_GET_INFO_BY_FD
        return None
    run_time, run_cnt, misses = struct.unpack_from("<QQQ", buf, 192)
    if attr.info_len < 216:
        misses = None
    return run_cnt, run_time, misses


def release_compiler_memory():
    """Give back what compiling cost: clang/LLVM (inside libbcc) touch ~120 MB of their own code
    and data pages and leave freed heap behind, none of it needed once the programs are loaded.
    Clean file-backed pages are dropped with MADV_PAGEOUT (5.4+; they would be re-read from disk
    if ever touched again) and the heap is trimmed. Returns the bytes of mappings advised."""
    libc = LIBC
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_PAGEOUT = 21
    advised = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or not any(k in parts[5] for k in ("libbcc", "libLLVM", "libclang")):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            advised += hi - lo
    return advised


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64),
                ("keys", ctypes.c_uint64), ("values", ctypes.c_uint64),
                ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class MapScanner:
    """Every value of a hash map, read with BPF_MAP_LOOKUP_BATCH (5.6+): one bpf(2) call per
    `chunk` entries, and the values arrive as one buffer that struct.iter_unpack decodes. BCC's
    items() costs two calls and a ctypes object per entry. Returns None where the kernel has no
    batch lookup, and the caller falls back to BCC."""
    ENOENT, ENOSPC = 2, 28

    def __init__(self, map_fd, key_size, value_size, chunk=1024):
        self.fd = map_fd
        self.ksize = key_size
        self.vsize = value_size
        self._tok = (ctypes.c_uint64 * 2)()      # in_batch, out_batch: where to go on
        self._alloc(chunk)

    def _alloc(self, chunk):
        """Buffers for `chunk` entries (the continuation token is kept)."""
        self.chunk = chunk
        self._keys = ctypes.create_string_buffer(chunk * self.ksize)
        self._vals = ctypes.create_string_buffer(chunk * self.vsize)

    def values(self):
        """Raw bytes of all values (a snapshot per chunk; entries may change meanwhile)."""
        out = []
        first = True
        while True:
            a = _BatchAttr()
            a.in_batch = 0 if first else ctypes.addressof(self._tok)
            a.out_batch = ctypes.addressof(self._tok) + 8
            a.keys = ctypes.addressof(self._keys)
            a.values = ctypes.addressof(self._vals)
            a.count = self.chunk
            a.map_fd = self.fd
            r, err = bpf(24, a)                                   # BPF_MAP_LOOKUP_BATCH
            if r < 0 and err == self.ENOSPC and a.count == 0:     # a bucket larger than a chunk
                self._alloc(self.chunk * 4)
                continue
            if r < 0 and err != self.ENOENT:
                return None if first and not out else out
            if a.count:
                out.append(self._vals.raw[:a.count * self.vsize])
            if r < 0:                                             # ENOENT: that was the last
                return out
            self._tok[0] = self._tok[1]
            first = False


def _start_time(pid):
    """Field 22 of /proc/<pid>/stat, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])    # fields from 3 on, after the comm


class Tally:
    """Counts every hit of sock:inet_sock_set_state without BPF, in a tracefs instance of our
    own, so that hits the kernel makes without running any BPF program for them (and without
    counting them as recursion misses) are counted too. Such hits exist: on the 6.18 guest this
    was developed on, BPF never runs in softirqs that interrupt a thread of pid 1 (docs/bench.md,
    "Sixth session"); before 6.7 the kernel skips a tracepoint program for recursion without
    counting a miss; and the perf tracepoint path drops a hit uncounted when perf's own
    recursion guard trips.

    The instance's ring buffer is one page per CPU and does not overwrite: once full, each hit
    is refused at once and counted in "dropped events", so entries + dropped is every hit, read
    without a reader and at little cost per hit.

    The instance's probe is registered after the BPF program's, so on each hit BPF runs (or
    misses) first: read this count first and BPF's after, and their difference can only fall
    short of the truth, never report a loss that did not happen."""
    EVENT = "events/sock/inet_sock_set_state"

    def __init__(self, tracefs):
        base = os.path.join(tracefs, "instances")
        self._sweep(base)
        self.dir = os.path.join(base, self.name(os.getpid()))
        os.mkdir(self.dir)
        try:
            self._write("options/overwrite", "0")
            self._write("buffer_size_kb", "4")
            self._write(os.path.join(self.EVENT, "enable"), "1")
            self._stats = [os.path.join(self.dir, "per_cpu", d, "stats")
                           for d in os.listdir(os.path.join(self.dir, "per_cpu"))]
            self.count()
        except Exception:
            self.close()
            raise

    @staticmethod
    def name(pid):
        """tcptrace-<pid>-<start time>: with the process's start time (clock ticks since boot),
        an instance left by a dead process is told from a live one's even after its pid has
        been reused. None if the process is gone."""
        start = _start_time(pid)
        return None if start is None else f"tcptrace-{pid}-{start}"

    @staticmethod
    def stale(names):
        """Which of these instance names a tcptrace that died without closing its instance
        left: its process is gone, or its pid now belongs to a process started since. Names
        without a start time (tcptrace-<pid>, before 2026-11-21) go by the pid alone."""
        out = []
        for name in names:
            parts = name.split("-")
            if parts[0] != "tcptrace" or not all(p.isdigit() for p in parts[1:]) \
                    or len(parts) not in (2, 3):
                continue
            if len(parts) == 2:
                if not os.path.exists(f"/proc/{parts[1]}"):
                    out.append(name)
            elif Tally.name(int(parts[1])) != name:
                out.append(name)
        return out

    @staticmethod
    def _sweep(base):
        """Remove instances left by tcptrace processes that died without closing theirs."""
        for name in Tally.stale(os.listdir(base)):
            with contextlib.suppress(OSError):
                with open(os.path.join(base, name, Tally.EVENT, "enable"), "w") as f:
                    f.write("0")
                os.rmdir(os.path.join(base, name))

    def _write(self, rel, value):
        with open(os.path.join(self.dir, rel), "w") as f:
            f.write(value)

    def count(self):
        n = 0
        for path in self._stats:
            with open(path) as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in ("entries", "dropped events", "read events"):
                        n += int(v)
        return n

    def close(self):
        with contextlib.suppress(OSError):
            self._write(os.path.join(self.EVENT, "enable"), "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


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
        import mmap
        pg = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, pg, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=0)
        self._prod = mmap.mmap(map_fd, pg + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ,
                               offset=pg)
        self._view = memoryview(self._prod)
        self._base = pg
        self._mask = data_size - 1
        self.payload = event_struct.size
        self.stride = (8 + self.payload + 7) & ~7
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


# The recursion rescue's raw tracepoint twins: (hook in bpf/tcptrace.c's tt_rescue_<hook> and
# tt_rescue2_<hook>, raw tracepoint, the tracepoint program they stand in for, the Kind whose
# `rescued` counter they keep, the plan's hook name or None when always attached).
STATE_PROG = "tracepoint__sock__inet_sock_set_state"     # BCC's name for it
TWINS = (
    ("state", "inet_sock_set_state", STATE_PROG, Kind.STATE, None),
    ("recv_reset", "tcp_receive_reset", "tracepoint__tcp__tcp_receive_reset", Kind.RECV_RESET,
     "tcp:tcp_receive_reset"),
    ("sock_error", "inet_sk_error_report", "tracepoint__sock__inet_sk_error_report",
     Kind.SOCK_ERROR, "sock:inet_sk_error_report"),
    ("retrans", "tcp_retransmit_skb", "tracepoint__tcp__tcp_retransmit_skb", Kind.RETRANS,
     "tcp:tcp_retransmit_skb"),
)


@contextlib.contextmanager
def _stdout_to_stderr():
    """BCC and clang may print to fd 1; the JSON stream must never see it."""
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class KernelSource:
    """Compiled, attached programs and their transport. `poll()` returns what arrived."""

    # Ring: 8 MB, about 40,000 records (10,000 connections), against about 8,000 records
    # between two drains at 20k conn/s. Its pages count twice in RSS once it has wrapped (the
    # kernel maps the data area twice).
    def __init__(self, plan, families=(), ports=(), ringbuf_pages=2048, perf_pages=1024,
                 wakeup_events=256, hold_ms=50):
        from tcptrace.kernel import probes
        tdir, note = probes.ensure_tracefs()
        self.notes = [note] if note else []
        if tdir is None:
            raise errors.Unavailable("tracefs is not mounted and could not be mounted")
        try:
            import bcc
        except ImportError:
            raise errors.Unavailable("python3 module 'bcc' missing: apt-get install python3-bpfcc")
        self.plan = plan
        # Tests only: a small ring, so that it overflows (tests/kernel/test_foundation.py).
        ringbuf_pages = int(os.environ.get("TCPTRACE_TEST_RING_PAGES", ringbuf_pages))
        src = os.path.join(bpf_dir(), "tcptrace.c")
        cflags = [f"-I{bpf_dir()}", f"-DTT_RINGBUF_PAGES={ringbuf_pages}",
                  "-Wno-macro-redefined", "-Wno-unused-function"] + plan.cflags()
        if plan.rescue and os.environ.get("TCPTRACE_TEST_RESCUE_ONLY") == "1":
            # Tests only: the twins handle every hit, so their field reads are checked against
            # real sockets (tests/kernel/test_foundation.py).
            cflags.append("-DTT_RESCUE_ONLY=1")
        t0 = time.monotonic()
        try:
            with _stdout_to_stderr():
                self.b = bcc.BPF(src_file=src.encode(), cflags=cflags)
        except Exception as e:   # BCC raises bare Exception for compile and attach failures
            raise errors.Unavailable(f"loading the BPF programs failed: {e}") from e
        self.compile_s = time.monotonic() - t0
        self._twins = {}            # tracepoint program name -> Kind its twins rescue
        self._twin_fds = []
        if plan.rescue:
            self._attach_twins(plan)
        release_compiler_memory()
        self._batch = []
        self._pacer = Pacer()
        self.perf_lost_total = 0
        self._seen_drops = {}
        self._seen_misses = {}
        self.rescued_total = 0
        self.spilled_total = 0
        table = self.b["events"]
        ctype = type(table.event(ctypes.create_string_buffer(512)))
        self.record_size = ctypes.sizeof(ctype)
        self._st, perm = decoder_for(ctype)
        self._perm = perm
        socks = self.b["socks"]
        self._scanner = MapScanner(socks.map_fd, 8, self.record_size)
        if self._scanner.values() is None:      # the map is empty now: this only asks the kernel
            self._scanner = None
            self.notes.append("BPF_MAP_LOOKUP_BATCH unsupported (kernels before 5.6): pending "
                              "transitions are read with BCC's per-entry map iteration instead")
        unpack = self._st.unpack_from
        size = self.record_size
        string_at = ctypes.string_at
        batch = self._batch

        def on_record(_cpu_or_ctx, data, _size):
            batch.append(build_event(unpack(string_at(data, size)), perm))
        self._cb = on_record            # keep the ctypes callback alive
        self._ring = None
        if plan.transport == "ringbuf":
            reader = os.environ.get("TCPTRACE_RING_READER", "auto")
            if reader != "bcc" and platform.machine() == "x86_64":
                try:
                    self._ring = RingReader(table.map_fd, ringbuf_pages * os.sysconf("SC_PAGE_SIZE"),
                                            self._st, perm)
                except (OSError, ValueError) as e:
                    self.notes.append(f"ring buffer mmap failed ({e}): using BCC's reader")
            if self._ring is None:
                table.open_ring_buffer(on_record)
            # Records the ring refused (bpf/tcptrace.c: spill); rare, so BCC's reader will do.
            self.b["spill"].open_perf_buffer(on_record, page_cnt=64, lost_cb=self._on_lost,
                                             wakeup_events=wakeup_events)
        else:
            table.open_perf_buffer(on_record, page_cnt=perf_pages, lost_cb=self._on_lost,
                                   wakeup_events=wakeup_events)
        self.hold_ns = hold_ms * 1_000_000 if plan.hold else 0
        self._configure(families, ports)
        self.unseen_total = 0
        self._tally = None
        self._state_fd = next((fn.fd for name, fn in self.b.funcs.items()
                               if (name.decode() if isinstance(name, bytes) else name)
                               == STATE_PROG), None)
        try:
            self._tally = Tally(tdir)
        except (OSError, ValueError) as e:
            self.notes.append(f"no tracefs count of inet_sock_set_state ({e}): transitions the "
                              "kernel makes without running BPF would go uncounted")
        else:
            self._tally_base = self._tally_baseline()

    def _visible(self):
        """Hits of inet_sock_set_state BPF was shown: the program's runs, and the hits it was
        skipped for, which the kernel counts as misses (since 6.7 on this path: earlier kernels
        skip without counting) and the twins count as rescued. Where both count, the rescued
        are some of the misses; where only the twins do, they are all we know of."""
        runs = sum(self.b[b"state_hits"][ctypes.c_int(0)])
        st = prog_stats(self._state_fd) if self._state_fd is not None else None
        misses = (st[2] or 0) if st else 0
        kind = self._twins.get(STATE_PROG)
        rescued = sum(self.b[b"rescued"][ctypes.c_int(kind)]) if kind is not None else 0
        return runs + max(misses, rescued)

    def _tally_baseline(self):
        """Tally less BPF-visible hits at start, read as BPF, tally, BPF: the first difference
        can only exceed the true one (hits that ran their program between the reads count as
        unseen), so losses measured against it can only fall short. Equal BPF reads mean no
        hit came in between: the difference is exact. A few tries for such a moment."""
        best = None
        for _ in range(8):
            v1 = self._visible()
            t = self._tally.count()
            v2 = self._visible()
            best = t - v1 if best is None else min(best, t - v1)
            if v1 == v2:
                break
        return best

    def _attach_twins(self, plan):
        """Attach each hook's two twins after its tracepoint program (BCC attached those while
        loading): a tracepoint calls its probes in the order they were attached, and a twin
        decides by what ran before it on the same hit."""
        import bcc
        from bcc.libbcc import lib
        hooks = set(plan.tracepoints)
        for hook, raw, prog, kind, plan_name in TWINS:
            if plan_name is not None and plan_name not in hooks:
                continue
            fds = []
            try:
                for twin in (f"tt_rescue_{hook}", f"tt_rescue2_{hook}"):
                    with _stdout_to_stderr():
                        fn = self.b.load_func(twin.encode(), bcc.BPF.RAW_TRACEPOINT)
                    # Not BPF.attach_raw_tracepoint: it keeps one program per tracepoint.
                    fd = lib.bpf_attach_raw_tracepoint(fn.fd, raw.encode())
                    if fd < 0:
                        raise OSError(ctypes.get_errno(), f"attaching {twin} failed")
                    fds.append(fd)
            except Exception as e:     # BCC raises bare Exception
                # A hit both twins cannot take is counted as a miss either way; a lone twin
                # would only make the accounting harder to state.
                self.notes.append(f"recursion rescue off for {raw}: {e}")
                for fd in fds:
                    os.close(fd)
                continue
            self._twin_fds += fds
            self._twins[prog] = kind

    def _configure(self, families, ports):
        pm = self.b["ports"]
        for p in ports:
            pm[pm.Key(p)] = pm.Leaf(1)
        cfg = self.b["config"]
        v = cfg[ctypes.c_int(0)]
        v.family = families[0] if len(families) == 1 else 0
        v.port_filter = 1 if ports else 0
        v.hold_us = self.hold_ns // 1000
        cfg[ctypes.c_int(0)] = v
        # Armed last, in its own update: the programs emit nothing until every filter is in.
        v.armed = 1
        cfg[ctypes.c_int(0)] = v

    def _on_lost(self, count):
        self.perf_lost_total += count

    def poll(self, timeout_ms):
        """Wait up to timeout_ms, then drain everything buffered. Returns [Event].

        `read_ns` is set to the clock just before the buffers were read: every record not
        returned was committed after it, so it is the time up to which the stream is complete
        (decoding a large batch takes long enough that the time after it would not be)."""
        if self.plan.transport == "ringbuf":
            # Records are written without wake-ups, so epoll would sleep the whole timeout anyway.
            self._pacer.wait(timeout_ms / 1000)
            self.read_ns = time.monotonic_ns()
            if self._ring is not None:
                self._ring.read(self._batch)
            else:
                self.b.ring_buffer_consume()
            self.b.perf_buffer_consume()
        else:
            self.b.perf_buffer_poll(timeout_ms)
            self.read_ns = time.monotonic_ns()
            self.b.perf_buffer_consume()
        out = self._batch[:]
        del self._batch[:]
        return out

    def scan(self):
        """The steps still pending in the kernel's `socks` map (sockets resting between the
        states at which the kernel sends them), as STATE Events flagged F_SCAN. Steps already
        taken this way are skipped when the record carrying them arrives (lifecycle.py)."""
        out = []
        chunks = self._scanner.values() if self._scanner is not None else None
        if chunks is None:
            self._scanner = None
            socks = self.b["socks"]
            chunks = [b"".join(bytes(v) for v in socks.values())]
        perm, flag = self._perm, F_SCAN
        for raw in chunks:
            for t in self._st.iter_unpack(raw):
                ev = build_event(t, perm)
                if ev.nsteps:
                    out.append(ev._replace(flags=ev.flags | flag))
        if self.hold_ns:
            out += self._due_held()
        return out

    def _due_held(self, most=256):
        """Held sockets (bpf/tcptrace.c: held) that no hit has sent early: on a quiet host
        nothing runs tt_flush. Taken once they are twice hold_us old, which under traffic the
        kernel has long done; read, not sent, so they come as scans (and again with their next
        transition, which user space skips as already taken)."""
        q, held = self.b["held_q"], self.b["held"]
        due = time.monotonic_ns() - 2 * self.hold_ns
        out = []
        for _ in range(most):
            try:
                if q.peek().ts > due:
                    break
                head = q.pop()
            except KeyError:        # empty, or tt_flush took the head meanwhile
                break
            try:
                raw = bytes(held[held.Key(head.sk)])
            except KeyError:        # the socket moved on
                continue
            ev = build_event(self._st.unpack(raw), self._perm)
            if ev.ts_ns == head.ts:
                out.append(ev._replace(flags=ev.flags | F_SCAN))
        return out

    def losses(self, now_ns):
        """Lost records for what was lost since the last call (deltas of monotonic counters)."""
        out = []
        if self.plan.transport == "ringbuf":
            self.spilled_total = sum(sum(v) for _k, v in self.b["spilled"].items())
        drops = self.b["drops"]
        for k, v in drops.items():
            total = sum(v)
            kind = Kind.NAMES.get(k.value, str(k.value))
            prev = self._seen_drops.get(kind, 0)
            if total > prev:
                out.append(Lost(now_ns, total - prev, f"bpf:{kind}"))
                self._seen_drops[kind] = total
        # Misses before rescues: a twin counts its rescue after the kernel counted the miss, so
        # read in this order the difference can only fall short, never report a false loss.
        stats = self.prog_stats()
        rescued = {}
        if self._twins:
            for k, v in self.b["rescued"].items():
                rescued[k.value] = sum(v)
            self.rescued_total = sum(rescued.values())
        for name, (_cnt, _t, misses) in stats.items():
            if misses is None or name.startswith("tt_rescue"):
                # A twin is skipped only when it re-enters itself on a CPU, and then the
                # tracepoint program was not blocked: nothing is lost.
                continue
            kind = self._twins.get(name)
            if kind is not None:
                misses -= rescued.get(kind, 0)
            prev = self._seen_misses.get(name, 0)
            if misses > prev:
                out.append(Lost(now_ns, misses - prev, f"recursion:{name}"))
                self._seen_misses[name] = misses
        if self._tally is not None:
            # The tally first, BPF's count after (Tally: the difference can only fall short)
            t = self._tally.count()
            unseen = t - self._visible() - self._tally_base
            if unseen > self.unseen_total:
                out.append(Lost(now_ns, unseen - self.unseen_total, "unseen:inet_sock_set_state"))
                self.unseen_total = unseen
        return out

    def prog_stats(self):
        out = {}
        for name, fn in self.b.funcs.items():
            st = prog_stats(fn.fd)
            if st is not None:
                out[name.decode() if isinstance(name, bytes) else name] = st
        return out

    def close(self):
        if self._tally is not None:
            self._tally.close()
            self._tally = None
        for fd in self._twin_fds:
            os.close(fd)
        self._twin_fds = []
        if self._ring is not None:
            self._ring.close()
        with contextlib.suppress(Exception):
            self.b.cleanup()
