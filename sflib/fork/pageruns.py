"""Sets of pages as sorted runs, (first, count) pairs: what a fork writes into an
image, what the guest reported free, what an image holds as zeros (pure).

Every function takes and returns runs sorted by first page, not overlapping, so
a set of a million pages in a few runs costs a few tuples.
"""

from __future__ import annotations

Runs = list[tuple[int, int]]


def count(runs: Runs) -> int:
    """How many pages."""
    return sum(pages for _, pages in runs)


def subtract(runs: Runs, minus: Runs) -> Runs:
    """The pages of runs that are in none of minus's runs (minus in any order)."""
    cuts = sorted(minus)
    out: Runs = []
    i = 0
    for run_first, pages in runs:
        first, end = run_first, run_first + pages
        while i < len(cuts) and cuts[i][0] + cuts[i][1] <= first:
            i += 1  # cuts wholly before this run: none of the later runs reaches them
        j = i
        while first < end and j < len(cuts) and cuts[j][0] < end:
            cut_first, cut_end = cuts[j][0], cuts[j][0] + cuts[j][1]
            if cut_first > first:
                out.append((first, cut_first - first))
            first = max(first, cut_end)
            j += 1
        if first < end:
            out.append((first, end - first))
    return out


def intersect(a: Runs, b: Runs) -> Runs:
    """The pages in both."""
    return subtract(a, subtract(a, b))


def union(*sets: Runs) -> Runs:
    """The pages in any of them, runs that meet or overlap joined."""
    out: Runs = []
    for first, pages in sorted(run for runs in sets for run in runs):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_pages = out[-1]
            out[-1] = (last_first, max(last_pages, first + pages - last_first))
        elif pages > 0:
            out.append((first, pages))
    return out


def complement(runs: Runs, total: int) -> Runs:
    """The pages of 0..total that are in none of runs."""
    return subtract([(0, total)], runs) if total > 0 else []
