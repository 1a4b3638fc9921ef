"""Pairwise covering sets: few rows in which every value of every factor, and every pair of
values of any two factors, appear together at least once.

All combinations of the tracer's compile switches would take minutes to build (each compile
costs 1-2 s here, about 40 s in the emulated CI VM); a bug that needs one switch set, or two
switches set a certain way, shows in a pairwise set of them, which grows with the log of the
number of switches. The rows are found by a seeded local search, so they are the same on every
run.
"""
import itertools
import random


def covered(rows, factors):
    """The pairs ((factor, value), (factor, value)) the rows cover, in `factors` order."""
    return set().union(*(_row_pairs(r, list(factors)) for r in rows))


def all_pairs(factors):
    """Every pair to cover, in a fixed order."""
    names = list(factors)
    return [((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
            for va in factors[a] for vb in factors[b]]


def covering(factors, steps=1000, seed=1):
    """Rows ({factor: value}) covering every pair of values of any two factors. `factors` maps
    each factor to its values. Tries row counts from the least possible (the two largest
    domains' product) up, each with a bounded search: start from random rows, and until every
    pair is covered, take an uncovered pair and write it into the row where that leaves the
    fewest pairs uncovered."""
    names = list(factors)
    if len(names) < 2:
        return [{n: v} for n in names for v in factors[n]]
    rnd = random.Random(seed)
    sizes = sorted(len(v) for v in factors.values())
    n = sizes[-1] * sizes[-2]
    while True:
        rows = _search(factors, names, n, steps, rnd)
        if rows is not None:
            return rows
        n += 1


def _search(factors, names, n, steps, rnd):
    rows = [{m: rnd.choice(factors[m]) for m in names} for _ in range(n)]
    count = {}
    for r in rows:
        for p in _row_pairs(r, names):
            count[p] = count.get(p, 0) + 1
    every = all_pairs(factors)
    todo = [p for p in every if p not in count]
    for _ in range(steps):
        if not todo:
            return rows
        (a, va), (b, vb) = rnd.choice(todo)
        gain = []
        for i, r in enumerate(rows):
            new = dict(r, **{a: va, b: vb})
            old_p, new_p = _touching(r, names, a, b), _touching(new, names, a, b)
            lost = sum(1 for p in old_p - new_p if count[p] == 1)
            won = sum(1 for p in new_p - old_p if p not in count)
            gain.append((won - lost, rnd.random(), i, new))
        _g, _r, i, new = max(gain)
        for p in _touching(rows[i], names, a, b):
            count[p] -= 1
            if not count[p]:
                del count[p]
        for p in _touching(new, names, a, b):
            count[p] = count.get(p, 0) + 1
        rows[i] = new
        todo = [p for p in every if p not in count]
    return rows if not todo else None


def _row_pairs(r, names):
    return {((a, r[a]), (b, r[b])) for a, b in itertools.combinations(names, 2)}


def _touching(r, names, a, b):
    """The pairs of row r that involve factor a or b."""
    return {(x, y) if names.index(x[0]) < names.index(y[0]) else (y, x)
            for x in ((a, r[a]), (b, r[b])) for y in ((m, r[m]) for m in names) if y != x}
