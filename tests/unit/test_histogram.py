"""tcptrace/histogram.py: the one bucket definition of the kernel's aggregates, the report and
/metrics. Its bounds are consistent, its octaves are the report's log2 microsecond buckets,
and a percentile read from buckets is within 4.5% of the exact one."""
import random

import pytest

from tcptrace import histogram as H
from tcptrace.output.report import log2_bucket, percentile


def test_bounds_are_consistent_and_each_value_falls_between_its_buckets_bounds():
    assert H.lower_ns(0) == 0 and H.lower_ns(1) == 1000
    for b in range(H.N - 1):
        lo, hi = H.lower_ns(b), H.upper_ns(b)
        assert lo < hi
        assert H.bucket(lo) == b and H.bucket(hi - 1) == b and H.bucket(hi) == b + 1
    assert H.upper_ns(H.N - 1) is None
    rng = random.Random(1)
    for _ in range(20_000):
        v = int(10 ** rng.uniform(0, 12))
        b = H.bucket(v)
        assert H.lower_ns(b) <= v and (H.upper_ns(b) is None or v < H.upper_ns(b))


def test_adjacent_bounds_grow_by_an_eighth_of_an_octave():
    for b in range(1, H.N - 2):
        ratio = H.upper_ns(b) / H.lower_ns(b)
        assert 2 ** (1 / 8) * 0.998 < ratio < 2 ** (1 / 8) * 1.002


def test_octaves_are_the_reports_log2_microsecond_buckets():
    rng = random.Random(2)
    for v in [0, 999, 1000, 1999, 2000] + [int(10 ** rng.uniform(2, 10)) for _ in range(5000)]:
        if v < 1000 << H.OCTAVES:
            assert H.log2_us(H.bucket(v)) == log2_bucket(v), v


@pytest.mark.parametrize("p", [50, 90, 99])
def test_a_percentile_from_buckets_is_within_4_5_percent_of_the_exact_one(p):
    rng = random.Random(p)
    for _ in range(200):
        n = rng.randint(1, 400)
        vals = sorted(int(rng.lognormvariate(10, 1.5)) + 1000 for _ in range(n))
        counts = {}
        for v in vals:
            counts[H.bucket(v)] = counts.get(H.bucket(v), 0) + 1
        exact = percentile(vals, p)
        got = H.quantile(counts, p, max_ns=vals[-1])
        assert abs(got - exact) <= 0.045 * exact, (got, exact)


def test_c_defines_carry_the_thresholds():
    d = H.c_defines()
    assert d["H_N"] == H.N and d["H_SUB"] == H.SUB
    assert [d[f"H_T{j}"] for j in range(1, H.SUB)] == list(H.THRESHOLDS)
