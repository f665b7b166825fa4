"""Search heuristics (lower is better), as in the released data generators.

The paper's appendix prints a different multiplicative formula; these are the ones that made the data.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

Heuristic = Callable[[Sequence[int], int], float]


def sum_heuristic(nums: Sequence[int], target: int) -> float:
    """Mean over numbers of ``|n - target|``."""
    if len(nums) == 1:
        return abs(nums[0] - target)
    return sum(abs(n - target) for n in nums) / len(nums)


@functools.lru_cache(maxsize=1024)
def _factor_distance_table(target: int) -> tuple[int, ...]:
    """``table[n]`` = min over factors f of target (2 <= f <= target) of ``|n - f|``, for n <= target."""
    factors = [f for f in range(2, target + 1) if target % f == 0]
    if not factors:  # target < 2: no factor in range; the released code would fail here
        raise ValueError(f"mult heuristic needs a target >= 2, got {target}")
    return tuple(min(abs(n - f) for f in factors) for n in range(target + 1))


def mult_heuristic(nums: Sequence[int], target: int) -> int:
    """Sum over numbers of the distance to the nearest factor of the target (factors 2..target)."""
    table = _factor_distance_table(target)
    # the largest factor is the target itself, so for n > target the nearest factor is the target.
    return sum(table[n] if n <= target else n - target for n in nums)


HEURISTICS: dict[str, Heuristic] = {"sum": sum_heuristic, "mult": mult_heuristic}


def get(name: str) -> Heuristic:
    if name not in HEURISTICS:
        raise ValueError(f"unknown heuristic {name!r}; choose one of {', '.join(HEURISTICS)}")
    return HEURISTICS[name]
