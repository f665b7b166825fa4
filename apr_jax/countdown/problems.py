"""Countdown problems: seeded generation, solvability, and disjoint train/validation splits.

Every random draw comes from a ``random.Random`` seeded by ``derive_seed(seed, *tags)``, a hash of the root
seed and the draw's identity (split, problem index, attempt). A problem therefore does not depend on which
worker made it or on how many workers there are: the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Iterable, Sequence

from apr_jax.countdown.game import solvable, solve


def derive_seed(seed: int, *tags: object) -> int:
    """A 64-bit seed that is a pure function of ``seed`` and ``tags`` (stable across runs and machines)."""
    text = ":".join([str(int(seed))] + [str(t) for t in tags])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def rng_for(seed: int, *tags: object) -> random.Random:
    return random.Random(derive_seed(seed, *tags))


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """How problems are drawn (paper: 4 numbers in 1..99, target in 10..100)."""

    num_inputs: int = 4
    max_num: int = 99
    min_target: int = 10
    max_target: int = 100

    def __post_init__(self):
        if self.num_inputs < 2:
            raise ValueError(f"num_inputs must be >= 2, got {self.num_inputs}")
        if self.max_num < 1:
            raise ValueError(f"max_num must be >= 1, got {self.max_num}")
        if not 2 <= self.min_target <= self.max_target:
            raise ValueError(f"need 2 <= min_target <= max_target, got {self.min_target}..{self.max_target}")


def key_of(nums: Sequence[int], target: int) -> tuple:
    """Identity of a problem for de-duplication: (sorted numbers, target)."""
    return tuple(sorted(nums)), int(target)


def draw_problem(spec: ProblemSpec, rng: random.Random, max_tries: int = 100_000) -> dict:
    """Draw a target, then numbers until an exhaustive search finds a solution (as the release does)."""
    target = rng.randint(spec.min_target, spec.max_target)
    for _ in range(max_tries):
        nums = [rng.randint(1, spec.max_num) for _ in range(spec.num_inputs)]
        if solvable(nums, target):
            return {"nums": nums, "target": target, "solution": solve(nums, target), "start_size": spec.num_inputs}
    raise RuntimeError(f"no solvable problem in {max_tries} draws for target {target} with {spec}")


def candidate(spec: ProblemSpec, seed: int, split: str, index: int, attempt: int = 0) -> dict:
    """Problem ``index`` of ``split``; ``attempt`` > 0 redraws it after a collision."""
    return draw_problem(spec, rng_for(seed, "problem", split, index, attempt))


def resolve_collisions(spec: ProblemSpec, seed: int, split: str, drawn: Sequence[dict],
                       taken: set | None = None, max_attempts: int = 10_000) -> tuple[list[dict], set]:
    """Walk the problems in index order and redraw any whose key is already taken (by this split or by
    ``taken``, e.g. the training keys when making the validation split). Sequential and deterministic. A
    problem still colliding after ``max_attempts`` redraws means the task has too few distinct problems left:
    an error, not an endless loop."""
    taken = set() if taken is None else set(taken)
    own: set = set()
    out = []
    for index, problem in enumerate(drawn):
        attempt = 0
        key = key_of(problem["nums"], problem["target"])
        while key in taken or key in own:
            attempt += 1
            if attempt > max_attempts:
                raise ValueError(f"split {split!r}: problem {index} still repeats a taken problem after "
                                 f"{max_attempts:,} redraws; {spec} has too few distinct problems for "
                                 f"{len(drawn):,} more beside the {len(taken):,} taken: ask for fewer")
            problem = candidate(spec, seed, split, index, attempt)
            key = key_of(problem["nums"], problem["target"])
        own.add(key)
        out.append(problem)
    return out, own


def split_keys(problems: Iterable[dict]) -> set:
    return {key_of(p["nums"], p["target"]) for p in problems}


def finish_split(spec: ProblemSpec, seed: int, split: str, drawn: Sequence[dict], taken: set) -> list[dict]:
    """A split's problems from its drawn candidates (index order): collisions with ``taken`` and with each other
    redrawn (:func:`resolve_collisions`), ids 0..n-1. What every split goes through, the dataset's and held-out."""
    problems, _ = resolve_collisions(spec, seed, split, drawn, taken)
    return [{**p, "id": i} for i, p in enumerate(problems)]


def heldout_problems(spec: ProblemSpec, seed: int, split: str, n: int, taken: set) -> list[dict]:
    """``n`` problems of a new ``split`` (e.g. ``"test"``), drawn as the dataset's splits are and disjoint from
    ``taken`` (the keys of the splits a model saw or was selected on), with ids 0..n-1. A pure function of its
    arguments: the same seed and split name give the same problems."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return finish_split(spec, seed, split, [candidate(spec, seed, split, i) for i in range(n)], taken)
