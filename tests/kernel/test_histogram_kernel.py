"""The kernel's handshake buckets (bpf/histogram.c, used by bpf/aggregate.c) equal
tcptrace/histogram.py's, value for value: around every bucket bound (the bound, one below),
at the ends, and at random. A folded connection's time then counts in the bucket a connection
sent one by one would, so the report and /metrics read both the same way. The C is compiled
with the loader's own -D macros and run by a tracepoint this process fires (getppid)."""
import ctypes
import os
import random

import pytest

from tcptrace import histogram
from tcptrace.kernel import loader

pytestmark = pytest.mark.kernel
N = 512           # values tried
# One value per run of the program: in a loop, the verifier walks every path through each
# iteration's branches (the octave search, the thresholds) and gives up

PROGRAM = r"""
#include "histogram.c"
BPF_ARRAY(input, u64, 1);
BPF_ARRAY(output, u32, 1);
BPF_ARRAY(target, u32, 1);

TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    u32 zero = 0;
    u32 *pid = target.lookup(&zero);
    if (!pid || *pid != (bpf_get_current_pid_tgid() >> 32))
        return 0;
    u64 *v = input.lookup(&zero);
    if (!v)
        return 0;
    u32 b = tt_hbucket(*v);
    output.update(&zero, &b);
    return 0;
}
"""


def values():
    out = [0, 1, 999, 1000, 1001, 2**63, (1000 << histogram.OCTAVES) - 1,
           1000 << histogram.OCTAVES]
    for b in range(1, histogram.N):
        lo = histogram.lower_ns(b)
        out += [lo, lo - 1]
    rng = random.Random(7)
    while len(out) < N:
        out.append(int(10 ** rng.uniform(2, 11)))
    return out[:N]


def test_kernel_buckets_equal_the_python_ones():
    bcc = pytest.importorskip("bcc")
    flags = [f"-I{loader.bpf_dir()}"] + [f"-DTT_{k}={v}"
                                         for k, v in histogram.c_defines().items()]
    b = bcc.BPF(text=PROGRAM.encode(), cflags=flags)
    try:
        vals = values()
        inp, out, tgt = b[b"input"], b[b"output"], b[b"target"]
        tgt[ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())
        got = []
        for v in vals:
            inp[ctypes.c_int(0)] = ctypes.c_uint64(v)
            out[ctypes.c_int(0)] = ctypes.c_uint32(0xFFFFFFFF)
            os.getppid()
            got.append(out[ctypes.c_int(0)].value)
    finally:
        b.cleanup()
    want = [histogram.bucket(v) for v in vals]
    bad = [(v, g, w) for v, g, w in zip(vals, got, want) if g != w]
    assert not bad, f"{len(bad)} values bucketed differently (value, C, Python): {bad[:10]}"
    assert len(set(want)) == histogram.N          # every bucket was exercised
