"""Symbolic solvers that write the demonstrations: SoS+ (serial stream of search with sub-searches) and
APR (the same beam search whose level-0 expansions spawn parallel child threads).

Both follow the public APR release's generators (best-first beam search; the kept successors of a node are
the ``beam`` best by heuristic, stable-sorted, then SHUFFLED; node ids count only non-terminal kept
children). Randomness comes only from the ``random.Random`` passed in, so a problem's demonstration is a
pure function of its seed. All text comes from :mod:`apr_jax.countdown.traces`.

One deliberate difference from the release, switchable with ``release_compat=True``: after a failed spawn
the release prints ``Moving to Node #<id>`` for the wrong node (its loop index is shadowed by the spawn
loops), or omits the line; by default we print the node that is actually explored next.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
from typing import Sequence

from apr_jax.countdown import traces
from apr_jax.countdown.game import successors
from apr_jax.countdown.heuristics import Heuristic


class Node:
    """A search node. Ordered by heuristic only, so sorts are stable and heap ties keep insertion logic."""

    __slots__ = ("idx", "parent", "nums", "ops", "h")

    def __init__(self, idx: str | None, parent: "Node | None", nums: list[int], ops: list[str], h: float):
        self.idx, self.parent, self.nums, self.ops, self.h = idx, parent, nums, ops, h

    def __lt__(self, other: "Node") -> bool:
        return self.h < other.h


def _expand(node: Node, target: int, beam: int, heuristic: Heuristic, rng: random.Random):
    """Kept successors of ``node``: the ``beam`` best (stable by heuristic), shuffled."""
    gen = [(heuristic(nums, target), nums, op) for nums, op in successors(node.nums)]
    gen.sort(key=lambda g: g[0])
    kept = [Node(None, node, nums, node.ops + [op], h) for h, nums, op in gen[:beam]]
    rng.shuffle(kept)
    return kept


@dataclasses.dataclass
class _Expansion:
    """Text of one node's expansion, the goal if a kept successor reached it, and its open children."""

    text: str
    goal: Node | None
    children: list[Node]


def _expand_and_print(node: Node, target: int, beam: int, heuristic: Heuristic, rng: random.Random):
    out = [traces.state_line(target, node.nums, node.ops)]
    children: list[Node] = []
    for child in _expand(node, target, beam, heuristic, rng):
        child.idx = f"{node.idx},{len(children)}"
        out.append(traces.exploring_line(child.ops[-1], child.nums))
        if len(child.nums) == 1:
            out.append(traces.terminal_line(child.nums[0], target))
            if child.nums[0] == target:
                return _Expansion("".join(out), child, children)
        else:
            out.append(traces.generated_line(child.idx, target, child.nums, child.ops[-1]))
            children.append(child)
    children.sort()  # stable by heuristic
    return _Expansion("".join(out), None, children)


# --------------------------------------------------------------------------------------------------------
# SoS+
# --------------------------------------------------------------------------------------------------------


def _sosp_search(target, start, root, beam, heuristic, rng, subsearch_prob, level) -> tuple[str, bool]:
    out: list[str] = []
    open_set = [(start.h, start)]
    while open_set:
        batch = [heapq.heappop(open_set) for _ in range(min(beam, len(open_set)))]
        for pos, (_, node) in enumerate(batch):
            exp = _expand_and_print(node, target, beam, heuristic, rng)
            out.append(exp.text)
            if exp.goal is not None:
                out.append(_path_from(exp.goal, root, target))
                return "".join(out), True
            if rng.random() < subsearch_prob:
                for child in exp.children:
                    sub, found = _sosp_search(target, child, root, beam, heuristic, rng, subsearch_prob, level + 1)
                    out.append(traces.sos_start_line(level + 1, child.idx) + sub + traces.sos_exit_line(level + 1))
                    if found:
                        return "".join(out), True
                    out.append(traces.sos_failed_line())
            else:
                for child in exp.children:
                    heapq.heappush(open_set, (child.h, child))
            if pos < len(batch) - 1:
                out.append(traces.moving_line(batch[pos + 1][1].idx))
        if open_set:
            out.append(traces.moving_line(open_set[0][1].idx))
    out.append(traces.no_solution_line())
    return "".join(out), False


def _path_from(goal: Node, start: Node, target: int) -> str:
    chain = [goal]
    node = goal
    while node is not start and node.idx != start.idx:
        node = node.parent
        if node is None:
            raise RuntimeError("goal does not descend from the start node")
        chain.append(node)
    chain.reverse()
    steps = [traces.PathStep(n.idx, tuple(n.nums), tuple(n.ops)) for n in chain]
    return traces.path_summary(target, steps)


def sosp(nums: Sequence[int], target: int, beam: int, heuristic: Heuristic, rng: random.Random,
         subsearch_prob: float = 0.5) -> str:
    """SoS+ demonstration: one string (its first line is the SoS+ prompt)."""
    root = Node("0", None, list(nums), [], heuristic(nums, target))
    text, _ = _sosp_search(target, root, root, beam, heuristic, rng, subsearch_prob, 0)
    return text


# --------------------------------------------------------------------------------------------------------
# APR
# --------------------------------------------------------------------------------------------------------


def _apr_search(target, start, beam, sub_beam, heuristic, rng, spawn_prob, level, release_compat):
    """Returns (trace_dict, goal node or None). ``main_calls[-1]`` is the text being written."""
    calls = [traces.moving_line(start.idx)]
    spawns: list[list[dict]] = []
    open_set = [(start.h, start)]
    while open_set:
        batch = [heapq.heappop(open_set) for _ in range(min(beam, len(open_set)))]
        for pos, (_, node) in enumerate(batch):
            exp = _expand_and_print(node, target, beam, heuristic, rng)
            calls[-1] += exp.text
            if exp.goal is not None:
                calls[-1] += _path_from(exp.goal, start, target)
                return {"main_calls": calls, "sub_calls": spawns}, exp.goal
            spawn = level == 0 and len(exp.children) > 1 and rng.random() < spawn_prob
            next_pos = pos
            if spawn:
                results = [
                    _apr_search(target, child, sub_beam, sub_beam, heuristic, rng, spawn_prob, level + 1,
                                release_compat)
                    for child in exp.children
                ]
                spawns.append([r[0] for r in results])
                pre_spawn = calls[-1]
                calls[-1] += traces.spawn_block(level + 1, [c.idx for c in exp.children])
                returns = [_path_from(g, c, target) if g else None for c, (_, g) in zip(exp.children, results)]
                calls.append(pre_spawn + traces.join_block(level + 1, list(zip([c.idx for c in exp.children], returns))))
                for _, goal in results:
                    if goal is not None:
                        calls[-1] += traces.terminal_line(goal.nums[0], target) + _path_from(goal, start, target)
                        return {"main_calls": calls, "sub_calls": spawns}, goal
                if release_compat:
                    next_pos = len(exp.children) - 1
            else:
                for child in exp.children:
                    heapq.heappush(open_set, (child.h, child))
            if next_pos < len(batch) - 1:
                calls[-1] += traces.moving_line(batch[next_pos + 1][1].idx)
        if open_set:
            calls[-1] += traces.moving_line(open_set[0][1].idx)
    calls[-1] += traces.no_solution_line()
    return {"main_calls": calls, "sub_calls": spawns}, None


def apr(nums: Sequence[int], target: int, beam: int, sub_beam: int, heuristic: Heuristic, rng: random.Random,
        spawn_prob: float = 0.9, release_compat: bool = False) -> dict:
    """APR demonstration as the release's ``trace_dict = {"main_calls": [...], "sub_calls": [[...]]}``."""
    root = Node("0", None, list(nums), [], heuristic(nums, target))
    trace_dict, _ = _apr_search(target, root, beam, sub_beam, heuristic, rng, spawn_prob, 0, release_compat)
    return trace_dict

