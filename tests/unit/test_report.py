from tcptrace.report import log2_hist, percentile


def test_percentile_nearest_rank():
    vals = list(range(1, 101))
    assert [percentile(vals, p) for p in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None


def test_log2_histogram_buckets_in_microseconds():
    hist = log2_hist([1_000, 1_500, 3_000, 1_000_000])   # 1us, 1us, 3us, 1000us
    assert hist[0] == (0, 1, 2)
    assert hist[1] == (2, 3, 1)
    assert hist[-1] == (512, 1023, 1)
    assert sum(n for _, _, n in hist) == 4
