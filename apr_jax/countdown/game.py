"""Countdown rules: legal moves, an exhaustive solver, and the exact verifier of a solution path.

A move takes two numbers ``a, b`` of the current list (pairs in index order ``i < j``) and replaces them by
one result appended at the END of the remaining list. Results, in this order: ``a+b``, ``a*b``,
larger-minus-smaller (0 allowed), larger/smaller when it divides exactly and the divisor is not 0.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from apr_jax.countdown import traces


def combine(a: int, b: int) -> list[tuple[int, str]]:
    """All results of one move on ``a`` (earlier in the list) and ``b``, with their operation text."""
    out = [(a + b, f"{a}+{b}={a + b}"), (a * b, f"{a}*{b}={a * b}")]
    big, small = (b, a) if a <= b else (a, b)
    out.append((big - small, f"{big}-{small}={big - small}"))
    if small != 0 and big % small == 0:
        out.append((big // small, f"{big}/{small}={big // small}"))
    return out


def successors(nums: Sequence[int]) -> list[tuple[list[int], str]]:
    """Every (resulting list, operation) of one move, in the solvers' generation order."""
    out = []
    n = len(nums)
    for i, j in itertools.combinations(range(n), 2):
        rest = [nums[k] for k in range(n) if k != i and k != j]
        for result, op in combine(nums[i], nums[j]):
            out.append((rest + [result], op))
    return out


def solve(nums: Sequence[int], target: int) -> list[str] | None:
    """First solution (list of operations) of an exhaustive depth-first search, or None."""
    nums = list(nums)
    if len(nums) == 1:
        return [] if nums[0] == target else None
    for new_nums, op in successors(nums):
        if _reaches(tuple(new_nums), target):  # prune: the first solvable successor holds the first solution
            return [op] + solve(new_nums, target)
    return None


def _values(a: int, b: int) -> tuple[int, ...]:
    big, small = (b, a) if a <= b else (a, b)
    if small and big % small == 0:
        return a + b, a * b, big - small, big // small
    return a + b, a * b, big - small


def _partners(z: int, target: int) -> set[int]:
    """Every v such that one move on (v, z) can give ``target`` (the inverse of :func:`_values`)."""
    out = {target - z, target + z, z - target}
    if z:
        out.add(target * z)
        if target % z == 0:
            out.add(target // z)
    if target and z % target == 0 and z:
        out.add(z // target)
    return out


def _reaches(nums: tuple[int, ...], target: int) -> bool:
    n = len(nums)
    if n == 1:
        return nums[0] == target
    if n == 2:
        return target in _values(nums[0], nums[1])
    if n == 3:
        a, b, c = nums
        for x, y, z in ((a, b, c), (a, c, b), (b, c, a)):
            partners = _partners(z, target)
            if any(v in partners for v in _values(x, y)):
                return True
        return False
    for i, j in itertools.combinations(range(n), 2):
        rest = tuple(nums[k] for k in range(n) if k != i and k != j)
        for v in _values(nums[i], nums[j]):
            if _reaches(rest + (v,), target):
                return True
    return False


def solvable(nums: Sequence[int], target: int) -> bool:
    """Whether some sequence of moves reaches ``target`` (same search as :func:`solve`, no text)."""
    return _reaches(tuple(nums), target)


# ----------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Verdict:
    """Outcome of a verification: ``ok`` and, when not ok, the reason in words."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def _apply(x: int, op: str, y: int) -> tuple[int | None, str]:
    if op == "+":
        return x + y, ""
    if op == "*":
        return x * y, ""
    if op == "-":
        if x < y:
            return None, f"negative result {x}-{y}"
        return x - y, ""
    if y == 0:
        return None, f"division by zero {x}/{y}"
    if x % y:
        return None, f"inexact division {x}/{y}"
    return x // y, ""


def _step(current: list[int], x: int, op: str, y: int, z: int) -> tuple[list[int] | None, str]:
    """The sorted numbers after the stated operation ``x op y = z`` on ``current``, or None and the reason."""
    pool = list(current)
    for operand in (x, y):
        if operand not in pool:
            return None, f"operand {operand} not in current numbers {current}"
        pool.remove(operand)
    value, why = _apply(x, op, y)
    if value is None:
        return None, why
    if value != z:
        return None, f"wrong arithmetic {x}{op}{y}={z} (is {value})"
    return sorted(pool + [value]), ""


def replay_operations(nums: Sequence[int], ops: Sequence[str]) -> list[int] | None:
    """The numbers left after applying ``ops`` (``'a+b=c'`` strings) in order to ``nums``, sorted; None when
    an operation uses a number not present, breaks the rules or states a wrong result."""
    current = sorted(nums)
    for op in ops:
        try:
            current, _ = _step(current, *traces.parse_operation(op))
        except traces.TraceFormatError:
            return None
        if current is None:
            return None
    return current


def verify_path(nums: Sequence[int], target: int, path: str) -> Verdict:
    """Replay a solution path from ``nums``; ok only if it ends at a ``Goal Reached`` line with ``[target]``.

    Every ``Exploring Operation`` line must use two numbers of the current multiset (each removed once),
    exact arithmetic and the stated resulting list; every ``Current State`` line must name ``target`` and
    the current multiset. Never raises: garbage gives a reason.
    """
    try:
        return _verify_path(list(nums), int(target), path)
    except Exception as err:  # defensive: a verifier must not crash on model output
        return Verdict(False, f"unverifiable text ({type(err).__name__}: {err})")


def _verify_path(nums: list[int], target: int, path: str) -> Verdict:
    if not isinstance(path, str) or not path.strip():
        return Verdict(False, "empty solution path")
    current = sorted(nums)
    steps = 0
    for text in path.split("\n"):
        try:
            line = traces.parse_line(text)
        except traces.TraceFormatError:
            if text.startswith((traces.CURRENT_STATE, traces.EXPLORING)) or traces.GOAL_REACHED in text:
                return Verdict(False, f"malformed line {text!r}")
            continue  # lines outside the grammar carry no arithmetic
        if line.kind == "state":
            state_target, state, _ = line.fields
            if state_target != target:
                return Verdict(False, f"state names target {state_target}, expected {target}")
            if sorted(state) != current:
                return Verdict(False, f"state {list(state)} is not the current numbers {current}")
        elif line.kind == "exploring":
            pool, why = _step(current, *traces.parse_operation(line.fields[0]))
            if pool is None:
                return Verdict(False, why)
            if sorted(line.fields[1]) != pool:
                return Verdict(False, f"resulting numbers {list(line.fields[1])} should be {pool}")
            current = pool
            steps += 1
        elif line.kind == "goal":
            if steps == 0:
                return Verdict(False, "goal claimed before any operation")
            if line.fields != (target, target):
                return Verdict(False, f"goal line {text!r} does not name the target {target}")
            if current != [target]:
                return Verdict(False, f"goal claimed with numbers {current}, not [{target}]")
            return Verdict(True, "valid")
    return Verdict(False, "truncated: no Goal Reached line")
