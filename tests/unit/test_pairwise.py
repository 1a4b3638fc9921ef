"""tests/pairwise.py: the covering sets that choose which compile plans the kernel tier builds
(tests/kernel/test_plans.py). A set that missed a pair would leave a combination unbuilt."""
import pytest

from pairwise import all_pairs, covered, covering

BINARY8 = {f"s{i}": [True, False] for i in range(8)}
CASES = {
    "eight on/off switches": BINARY8,
    "one three-way switch and seven on/off": dict(list(BINARY8.items())[:7],
                                                  connect=["kprobe", "syscall", "none"]),
    "four three-way": {k: [1, 2, 3] for k in "abcd"},
    "a switch with one option": {"a": [1], "b": [1, 2], "c": ["x", "y"]},
    "one switch": {"a": [1, 2, 3]},
}


@pytest.mark.parametrize("factors", CASES.values(), ids=CASES.keys())
def test_every_pair_and_every_value_is_in_some_row(factors):
    rows = covering(factors)
    assert covered(rows, factors) == set(all_pairs(factors))
    for name, values in factors.items():
        assert {r[name] for r in rows} == set(values)
        assert all(r[name] in values for r in rows)
    assert all(list(r) == list(factors) for r in rows)


def test_far_fewer_rows_than_combinations_and_the_same_every_time():
    rows = covering(BINARY8)
    assert len(rows) <= 8 < 2 ** 8           # 6 is the least possible for eight on/off
    assert rows == covering(BINARY8)


def test_all_pairs_lists_each_pair_of_two_factors_once():
    f = {"a": [1, 2], "b": [1, 2, 3], "c": [0]}
    p = all_pairs(f)
    assert len(p) == len(set(p)) == 2 * 3 + 2 * 1 + 3 * 1
    assert (("a", 2), ("b", 3)) in p and (("b", 3), ("a", 2)) not in p
    assert all(x[0] != y[0] for x, y in p)
    assert covered([{"a": 1, "b": 1, "c": 0}], f) == {(("a", 1), ("b", 1)), (("a", 1), ("c", 0)),
                                                      (("b", 1), ("c", 0))}
