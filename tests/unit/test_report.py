import collections

from tcptrace.output.report import log2_bucket, log2_rows, percentile


def test_percentile_nearest_rank():
    vals = list(range(1, 101))
    assert [percentile(vals, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None


def test_log2_histogram_buckets_in_microseconds():
    hist = log2_rows(collections.Counter(
        log2_bucket(v) for v in [1_000, 1_500, 3_000, 1_000_000]))   # 1us, 1us, 3us, 1000us
    assert hist[0] == (0, 1, 2)
    assert hist[1] == (2, 3, 1)
    assert hist[-1] == (512, 1023, 1)
    assert sum(n for _, _, n in hist) == 4


def test_sample_is_exact_up_to_its_cap_then_bounded_and_unbiased():
    import random
    from tcptrace.output.report import Sample
    s = Sample(random.Random(1))
    for v in (5, 3, 9):
        s.add(v)
    assert (sorted(s.vals), s.n, s.max) == ([3, 5, 9], 3, 9)
    vals = list(range(1, 200_001))
    random.Random(2).shuffle(vals)
    s = Sample(random.Random(1))
    for v in vals:
        s.add(v)
    assert (len(s.vals), s.n, s.max) == (Sample.cap, 200_000, 200_000)
    srt = sorted(s.vals)
    for p in (50, 90, 99):
        assert abs(percentile(srt, p) - p * 2000) < 4000      # within 2 points of rank


def test_report_counts_and_histogram_stay_exact_past_the_sample_cap():
    from tcptrace.findings import Finding
    from tcptrace.output.report import Report
    r = Report()
    n = 25_000
    for i in range(n):
        r.add(Finding("connect", i, 1, "c", 2, "10.0.0.1", 5, "10.0.0.2", 80,
                      handshake_ns=1000 + (i % 1000), syn_retransmits=0, role="active"))
    s = r.summary(None, 0)
    (row,) = s["connects"]
    assert (row["count"], row["max_ns"]) == (n, 1999)
    assert 1400 <= row["p50_ns"] <= 1600
    assert sum(h["count"] for h in s["handshake_histogram_us"]) == n
    assert len(r.handshakes[("10.0.0.2", 80, "c")].vals) == 10_000
