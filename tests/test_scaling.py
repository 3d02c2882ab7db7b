"""mix and pack at scale: the faster structures give exactly what the simple ones gave."""

from __future__ import annotations

import bisect

import numpy as np

from friction.packing import best_fit_rows


def sorted_list_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """best-fit-decreasing over a sorted Python list of (space left, row): pack's algorithm before it had to scale."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            rows.append([index])
            space, row = capacity - lengths[index], len(rows) - 1
        else:
            space, row = free.pop(slot)
            rows[row].append(index)
            space -= lengths[index]
        bisect.insort(free, (space, row))
    return rows


def test_best_fit_structure_places_every_example_as_the_sorted_list_did() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):  # ties, empty inputs, zero lengths and lengths over capacity included
        capacity = int(rng.integers(1, 60))
        lengths = rng.integers(0, capacity + 10, int(rng.integers(0, 80)))
        assert best_fit_rows(lengths, capacity) == sorted_list_best_fit(lengths.tolist(), capacity)
    lengths = rng.integers(150, 1024, 20_000)  # demo-like lengths, many rows open at once
    assert best_fit_rows(lengths, 1024) == sorted_list_best_fit(lengths.tolist(), 1024)
