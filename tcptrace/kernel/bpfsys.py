"""bpf(2) through ctypes, for what BCC does not expose: program run statistics and batched map
reads. No bcc here: `doctor` asks the kernel through this before anything is compiled.

The attr structs are prefixes of the uapi `union bpf_attr` (stable ABI); the kernel zero-fills
what a shorter struct leaves out.
"""
import ctypes
import os
import platform
import struct

LIBC = ctypes.CDLL(None, use_errno=True)
NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_MAP_LOOKUP_BATCH = 24
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23


def bpf(cmd, attr):
    """bpf(2) with a ctypes attr struct: (result, errno)."""
    r = LIBC.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return r, (ctypes.get_errno() if r < 0 else 0)


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def _obj_info(fd, size):
    """(the kernel's info struct of the object behind fd as bytes, the length it filled) from
    BPF_OBJ_GET_INFO_BY_FD, or None."""
    if NR_BPF is None:
        return None
    buf = ctypes.create_string_buffer(size)
    attr = _InfoAttr(fd, size, ctypes.addressof(buf))
    if bpf(BPF_OBJ_GET_INFO_BY_FD, attr)[0] != 0:
        return None
    return buf.raw, attr.info_len


def prog_stats(fd):
    """(run_cnt, run_time_ns, recursion_misses) of a loaded program. Offsets are those of the
    uapi struct bpf_prog_info (stable ABI; recursion_misses since 5.12, None before)."""
    got = _obj_info(fd, 256)
    if got is None:
        return None
    run_time, run_cnt, misses = struct.unpack_from("<QQQ", got[0], 192)
    return run_cnt, run_time, (misses if got[1] >= 216 else None)


def map_info(fd):
    """(type, key_size, value_size, max_entries) of a map (uapi struct bpf_map_info's first
    members), or None."""
    got = _obj_info(fd, 80)
    if got is None:
        return None
    typ, _id, ksize, vsize, entries = struct.unpack_from("<5I", got[0], 0)
    return typ, ksize, vsize, entries


def possible_cpus():
    """How many CPUs a per-CPU map keeps a value for: those /sys/devices/system/cpu/possible
    lists ("0-3,5")."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class _LoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32)]


def load_typed_tracepoint(insns, name, btf_id):
    """A BTF-typed tracepoint program (tp_btf: BPF_PROG_TYPE_TRACING attached as
    BPF_TRACE_RAW_TP) from compiled bytecode (map fds in it) and the vmlinux BTF id of the
    tracepoint's `btf_trace_<name>` typedef: its fd. OSError if the kernel refuses it, with the
    verifier's last line."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _LoadAttr(prog_type=BPF_PROG_TYPE_TRACING, insn_cnt=len(insns) // 8,
                     insns=ctypes.addressof(buf), license=ctypes.addressof(lic),
                     prog_name=name.encode()[:15], expected_attach_type=BPF_TRACE_RAW_TP,
                     attach_btf_id=btf_id)
    fd, err = bpf(BPF_PROG_LOAD, attr)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(1 << 20)        # again, for what the verifier said
    attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    fd2, _ = bpf(BPF_PROG_LOAD, attr)
    if fd2 >= 0:                                      # a second try passed: keep it
        return fd2
    lines = [ln for ln in log.value.decode(errors="replace").splitlines()
             if ln and not ln.startswith("processed ")]
    raise OSError(err, f"{os.strerror(err)}: {lines[-1] if lines else 'no verifier log'}")


class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32)]


def attach_typed_tracepoint(prog_fd):
    """Attach a program from load_typed_tracepoint() to its tracepoint (named by its BTF id):
    the link's fd, which detaches it when closed. OSError if refused."""
    fd, err = bpf(BPF_RAW_TRACEPOINT_OPEN, _RawTpAttr(0, prog_fd))
    if fd < 0:
        raise OSError(err, os.strerror(err))
    return fd


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
        got = self.items()
        return None if got is None else [v for _, v in got]

    def items(self):
        """[(raw keys, raw values)] of every entry, a pair of buffers per chunk; None where the
        kernel has no batch lookup."""
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
            r, err = bpf(BPF_MAP_LOOKUP_BATCH, a)
            if r < 0 and err == self.ENOSPC and a.count == 0:     # a bucket larger than a chunk
                self._alloc(self.chunk * 4)
                continue
            if r < 0 and err != self.ENOENT:
                return None if first and not out else out
            if a.count:
                out.append((self._keys.raw[:a.count * self.ksize],
                            self._vals.raw[:a.count * self.vsize]))
            if r < 0:                                             # ENOENT: that was the last
                return out
            self._tok[0] = self._tok[1]
            first = False


class Counters:
    """A per-CPU array of u64 counters (bpf/*.c: drops, spilled, rescued, hits), each slot summed
    over the CPUs, read with one BPF_MAP_LOOKUP_BATCH (arrays: 5.6+) instead of BCC's lookup
    and ctypes array per slot: the loss counters are read on every drain, about 10 times a
    second even when idle. `fallback(i)`: a slot's sum by other means, used where the kernel
    has no batch lookup."""

    def __init__(self, map_fd, entries, fallback):
        self.entries = entries
        self.fallback = fallback
        self.ncpu = possible_cpus()
        self._scan = MapScanner(map_fd, 4, 8 * self.ncpu, chunk=entries)
        self._sum = struct.Struct(f"<{self.ncpu}Q")
        self._batch = True

    def sums(self):
        """[sum over CPUs of slot i for i in range(entries)]."""
        got = self._scan.items() if self._batch else None
        if got is None:
            self._batch = False
            return [self.fallback(i) for i in range(self.entries)]
        out = []
        for _keys, vals in got:
            out.extend(sum(v) for v in self._sum.iter_unpack(vals))
        return out
