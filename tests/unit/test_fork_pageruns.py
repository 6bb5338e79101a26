"""Sets of pages as runs (sflib.fork.pageruns), checked against Python sets."""

from __future__ import annotations

import itertools
import random

from sflib.fork import pageruns
from sflib.fork.pageruns import Runs


def pages(runs: Runs) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


def test_free_pages_are_taken_out_of_the_runs_to_write() -> None:
    runs = [(0, 10), (20, 5), (30, 1)]
    assert pageruns.subtract(runs, []) == runs
    assert pageruns.subtract(runs, [(3, 2), (8, 14), (30, 1)]) == [(0, 3), (5, 3), (22, 3)]
    assert pageruns.subtract(runs, [(0, 100)]) == []
    assert pageruns.subtract([(5, 5)], [(7, 1), (0, 6)]) == [(6, 1), (8, 2)]  # any order
    left = pageruns.subtract(runs, [(21, 1), (3, 2)])
    assert pages(left) == pages(runs) - {3, 4, 21}


def test_union_joins_runs_that_meet_or_overlap() -> None:
    assert pageruns.union([(0, 2)], [(2, 3)], [(10, 1)]) == [(0, 5), (10, 1)]
    assert pageruns.union([(5, 10)], [(6, 2)]) == [(5, 10)]  # one inside another
    assert pageruns.union([(4, 2), (0, 1)]) == [(0, 1), (4, 2)]
    assert pageruns.union([], [(3, 0)]) == []  # an empty run is no page
    assert pageruns.complement([(0, 2), (5, 1)], 8) == [(2, 3), (6, 2)]
    assert pageruns.complement([], 0) == []
    assert pageruns.count([(0, 2), (5, 1)]) == 3


def random_runs(rnd: random.Random, total: int) -> Runs:
    chosen = sorted(rnd.sample(range(total), rnd.randrange(total)))
    return pageruns.union([(p, 1) for p in chosen])


def test_the_operations_agree_with_sets() -> None:
    rnd = random.Random(11)
    for _ in range(300):
        a, b = random_runs(rnd, 60), random_runs(rnd, 60)
        assert pages(pageruns.subtract(a, b)) == pages(a) - pages(b)
        assert pages(pageruns.intersect(a, b)) == pages(a) & pages(b)
        assert pages(pageruns.union(a, b)) == pages(a) | pages(b)
        assert pages(pageruns.complement(a, 60)) == set(range(60)) - pages(a)
        for result in (pageruns.intersect(a, b), pageruns.union(a, b)):
            assert result == sorted(result)
            assert all(f + n < g for (f, n), (g, _) in itertools.pairwise(result))  # joined
