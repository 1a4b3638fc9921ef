"""Handshake-time buckets, one definition for the kernel's aggregates (bpf/aggregate.c), the
report and the metrics endpoint, so that a connection counts in the same bucket whichever way
it arrived.

Log-linear: the microsecond octaves of bcc's log2 histograms ([1, 2) us, [2, 4) us, ...) each
cut in SUB buckets whose bounds grow by 2^(1/SUB): 9% apart for SUB = 8, so a quantile taken at
a bucket's geometric middle is within 4.5% of the true value. Bucket 0 holds what is under
1 us, the last what is 2^OCTAVES us (67 s) or more.

Integer arithmetic only, the same in C and here: for v ns >= 1000, octave o = floor(log2(v //
1000)) and mantissa m = (v << 10) // (1000 << o), in [1024, 2048); the bucket is
1 + o * SUB + (how many of THRESHOLDS m reaches). The kernel gets the thresholds as -D macros
(c_defines), as it gets the lifecycle rules.
"""
import math

SUB = 8
OCTAVES = 26
N = 2 + OCTAVES * SUB
# m >= THRESHOLDS[j - 1]: at least j sub-buckets up (1024 * 2^(j/SUB), rounded up)
THRESHOLDS = tuple(math.ceil(1024 * 2 ** (j / SUB)) for j in range(1, SUB))
_LIMIT_NS = 1000 << OCTAVES


def bucket(v_ns):
    """The bucket of a handshake time in ns."""
    if v_ns < 1000:
        return 0
    if v_ns >= _LIMIT_NS:
        return N - 1
    o = (v_ns // 1000).bit_length() - 1
    m = (v_ns << 10) // (1000 << o)
    sub = 0
    for t in THRESHOLDS:
        if m >= t:
            sub += 1
    return 1 + o * SUB + sub


def lower_ns(b):
    """The smallest time (ns) bucket b holds."""
    if b <= 0:
        return 0
    if b >= N - 1:
        return _LIMIT_NS
    o, sub = divmod(b - 1, SUB)
    m = 1024 if sub == 0 else THRESHOLDS[sub - 1]
    # smallest v with (v << 10) // (1000 << o) >= m
    return -(-(m * (1000 << o)) // 1024)


def upper_ns(b):
    """The first time (ns) above bucket b (None for the last, unbounded one)."""
    return None if b >= N - 1 else lower_ns(b + 1)


def middle_ns(b):
    """A bucket's representative time: its geometric middle (its bound for the end buckets)."""
    lo, hi = lower_ns(b), upper_ns(b)
    if hi is None:
        return lo
    if lo == 0:
        return hi
    return int(math.sqrt(lo * hi))


def log2_us(b):
    """The log2 microsecond bucket (report.log2_bucket) every time in bucket b falls in."""
    return 0 if b == 0 else (b - 1) // SUB


def quantile(counts, p, max_ns=None):
    """The nearest-rank p-th percentile of {bucket: count}, as its bucket's middle, never above
    max_ns (the largest time seen, when known)."""
    total = sum(counts.values())
    if not total:
        return None
    rank = max(1, -(-total * p // 100))
    seen = 0
    for b in sorted(counts):
        seen += counts[b]
        if seen >= rank:
            v = middle_ns(b)
            return min(v, max_ns) if max_ns is not None else v
    return None


def c_defines():
    """The -D macros bpf/aggregate.c computes the same buckets with."""
    out = {"H_SUB": SUB, "H_OCTAVES": OCTAVES, "H_N": N}
    for j, t in enumerate(THRESHOLDS, 1):
        out[f"H_T{j}"] = t
    return out
