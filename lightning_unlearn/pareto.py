"""The Pareto front of (model_utility, forget_quality) points: the evaluations no other evaluation
beats on both at once, i.e. the trade-offs worth choosing between (both maximised)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points not dominated by another, both coordinates maximised: j
    dominates i when x_j >= x_i and y_j >= y_i with one strict. Equal points are all kept; points
    with a nan or None coordinate are on no front. O(n log n): sorted by x descending, a point is
    on the front when it has the highest y of its x and beats every y at larger x."""
    valid = [i for i, (x, y) in enumerate(points) if _number(x) and _number(y)]
    order = sorted(valid, key=lambda i: (-points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf  # the highest y among points of larger x
    for _, same_x in itertools.groupby(order, key=lambda i: points[i][0]):
        group = list(same_x)  # highest y first
        top = points[group[0]][1]
        if top > best_y:
            front += [i for i in group if points[i][1] == top]
            best_y = top
    return sorted(front)


def _number(v: float | None) -> bool:
    return v is not None and not math.isnan(v)
