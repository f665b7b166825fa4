"""THE trace language: every line, block, prompt and return of SoS+ and APR traces, and their parsers.

Solvers, the inference runtime and the RL code all build and parse trace text through this module, so the
demonstrations the model is trained on and the prompts it is given at run time come from one
implementation. Formats follow the public APR release byte for byte (spec: Pan et al. 2025, section 3).

APR in one picture (``...`` elides search lines)::

    Moving to Node #0                                  <- parent prompt (no trailing newline)
    Current State: 27:[22, 26, 31, 53], Operations: []
    ...
    Generated Node #0,0: 27:[26, 31, 31] Operation: 53-22=31
    <Calling Sub Searches>                              <- spawn block: the parent call ends here (EOS)
    <Start Sub Search 0 at level 1> Moving to Node #0,0
    <End Calling Sub Searches>

    child prompt:  Moving to Node #0,0\\nCurrent State: 27:[26, 31, 31], Operations: ['53-22=31']
    child return:  its solution path (text after its second-to-last ``Goal Reached`` line), or nothing

    parent continuation = pre-spawn text + join block:
    <Sub Searches>
    <Goal Reached in Sub Search 0 at level 1 at Node #0,0>
    Moving to Node #0,0
    ...
    27,27 equal: Goal Reached
    <End Sub Searches>
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator, Sequence

# --------------------------------------------------------------------------------------------------------
# Fixed phrases of the grammar (the tokenizer makes each one a single token).
# --------------------------------------------------------------------------------------------------------

MOVING = "Moving to Node #"
CURRENT_STATE = "Current State: "
OPERATIONS = ", Operations: "
EXPLORING = "Exploring Operation: "
RESULTING = ", Resulting Numbers: "
GENERATED = "Generated Node #"
OPERATION = " Operation: "
UNEQUAL = " unequal: No Solution"
EQUAL = " equal: Goal Reached"
GOAL_REACHED = "Goal Reached"
NO_SOLUTION = "No solution found."
SOS_START = "Start Sub Search at level "
SOS_EXIT = "Exit Sub Search at level "
SOS_FAILED = "No solution found in sub search"
SPAWN_OPEN = "<Calling Sub Searches>"
SPAWN_CLOSE = "<End Calling Sub Searches>"
SPAWN_ITEM = "<Start Sub Search "
JOIN_OPEN = "<Sub Searches>"
JOIN_CLOSE = "<End Sub Searches>"
JOIN_GOAL = "<Goal Reached in Sub Search "
JOIN_FAIL = "<No Solution in Sub Search "
AT_LEVEL = " at level "
AT_NODE = " at Node #"
SUB_CALL_BUDGET = "Sub Call Budget: "
TOKEN_BUDGET = "Token Budget: "

#: Every multi-character phrase of the grammar, longest first (the tokenizer's fixed-phrase vocabulary).
PHRASES: tuple[str, ...] = tuple(
    sorted(
        {
            MOVING, CURRENT_STATE, OPERATIONS, EXPLORING, RESULTING, GENERATED, OPERATION, UNEQUAL, EQUAL,
            NO_SOLUTION, SOS_START, SOS_EXIT, SOS_FAILED, SPAWN_OPEN, SPAWN_CLOSE, SPAWN_ITEM, JOIN_OPEN,
            JOIN_CLOSE, JOIN_GOAL, JOIN_FAIL, AT_LEVEL, AT_NODE, SUB_CALL_BUDGET, TOKEN_BUDGET,
        },
        key=lambda s: (-len(s), s),
    )
)


class TraceFormatError(ValueError):
    """Text that does not follow the trace grammar where a structure was required."""


# --------------------------------------------------------------------------------------------------------
# Line builders. Lists print as Python reprs: numbers ``[26, 31, 31]``, operations ``['53-22=31']``.
# --------------------------------------------------------------------------------------------------------


def fmt_nums(nums: Sequence[int]) -> str:
    """``[26, 31, 31]`` (the Python list repr, also for numpy integers)."""
    return str(list(map(int, nums)))


def fmt_ops(ops: Sequence[str]) -> str:
    """``['53-22=31', '31/31=1']``."""
    return "[" + ", ".join(f"'{op}'" for op in ops) + "]"


def moving_line(node_id: str) -> str:
    return f"{MOVING}{node_id}\n"


def state_line(target: int, nums: Sequence[int], ops: Sequence[str]) -> str:
    return f"{CURRENT_STATE}{target}:{fmt_nums(nums)}{OPERATIONS}{fmt_ops(ops)}\n"


def exploring_line(op: str, nums: Sequence[int]) -> str:
    return f"{EXPLORING}{op}{RESULTING}{fmt_nums(nums)}\n"


def generated_line(node_id: str, target: int, nums: Sequence[int], op: str) -> str:
    return f"{GENERATED}{node_id}: {target}:{fmt_nums(nums)}{OPERATION}{op}\n"


def terminal_line(value: int, target: int) -> str:
    """``v,T equal: Goal Reached`` or ``v,T unequal: No Solution``."""
    return f"{value},{target}{EQUAL if value == target else UNEQUAL}\n"


def no_solution_line() -> str:
    return f"{NO_SOLUTION}\n"


def sos_start_line(level: int, node_id: str) -> str:
    return f"{SOS_START}{level}: {MOVING}{node_id}\n"


def sos_exit_line(level: int) -> str:
    return f"{SOS_EXIT}{level}\n"


def sos_failed_line() -> str:
    return f"{SOS_FAILED}\n"


@dataclasses.dataclass(frozen=True)
class PathStep:
    """One node on a solution path: its id (None for the goal, which is never printed), numbers, ops."""

    node_id: str | None
    nums: tuple[int, ...]
    ops: tuple[str, ...]


def path_summary(target: int, steps: Sequence[PathStep]) -> str:
    """The path from ``steps[0]`` to the goal ``steps[-1]``, ending with ``T,T equal: Goal Reached``."""
    if len(steps) < 2:
        raise ValueError("a solution path needs a start node and a goal")
    out = []
    for node, nxt in zip(steps[:-1], steps[1:]):
        out.append(moving_line(node.node_id))
        out.append(state_line(target, node.nums, node.ops))
        out.append(exploring_line(nxt.ops[-1], nxt.nums))
        if nxt is not steps[-1]:
            out.append(generated_line(nxt.node_id, target, nxt.nums, nxt.ops[-1]))
    out.append(terminal_line(steps[-1].nums[0], target))
    return "".join(out)


# --------------------------------------------------------------------------------------------------------
# Prompts and conditioning prefixes.
# --------------------------------------------------------------------------------------------------------


def sosp_prompt(nums: Sequence[int], target: int) -> str:
    """SoS+ prompt: ``Current State: T:[nums], Operations: []`` (no trailing newline)."""
    return state_line(target, nums, ())[:-1]


def apr_prompt(nums: Sequence[int], target: int) -> str:
    """APR parent prompt: ``Moving to Node #0\\nCurrent State: ...`` (no trailing newline)."""
    return moving_line("0") + sosp_prompt(nums, target)


def sub_call_budget_prefix(n: int) -> str:
    return f"{SUB_CALL_BUDGET}{n} "


def token_budget(num_tokens: int, context: int, quantum: int = 512) -> int:
    """``ceil(num_tokens / quantum) * quantum`` capped at the context size."""
    return min(int(math.ceil(num_tokens / quantum)) * quantum, context)


def token_budget_prefix(budget: int) -> str:
    return f"{TOKEN_BUDGET}{budget} "


_PREFIX_RE = re.compile(rf"^(?:{re.escape(SUB_CALL_BUDGET)}|{re.escape(TOKEN_BUDGET)})\d+ ")


def strip_condition_prefix(text: str) -> tuple[str, str]:
    """Split a conditioning prefix (``Sub Call Budget: n `` / ``Token Budget: b ``) from a text."""
    m = _PREFIX_RE.match(text)
    return (m.group(0), text[m.end():]) if m else ("", text)


# --------------------------------------------------------------------------------------------------------
# Spawn: parent call -> children.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpawnItem:
    index: int
    level: int
    node_id: str


def spawn_block(level: int, node_ids: Sequence[str]) -> str:
    """The block that ends a spawning parent call."""
    items = "".join(f"{SPAWN_ITEM}{i}{AT_LEVEL}{level}> {MOVING}{nid}\n" for i, nid in enumerate(node_ids))
    return f"{SPAWN_OPEN}\n{items}{SPAWN_CLOSE}\n"


_SPAWN_ITEM_RE = re.compile(rf"{re.escape(SPAWN_ITEM)}(\d+){AT_LEVEL}(\d+)> {re.escape(MOVING)}([0-9,]+)")


def ends_with_spawn(text: str) -> bool:
    """True when a parent call ended at a spawn point (its last line is ``<End Calling Sub Searches>``)."""
    return text.rstrip("\n").endswith(SPAWN_CLOSE)


def split_spawn(text: str) -> tuple[str, str]:
    """Split a spawning call into (pre-spawn text, spawn block). Raises TraceFormatError if unclosed."""
    start = text.rfind(SPAWN_OPEN + "\n")
    if start < 0 or (start > 0 and text[start - 1] != "\n"):
        raise TraceFormatError("no '<Calling Sub Searches>' line in the call")
    block = text[start:]
    if not block.rstrip("\n").endswith(SPAWN_CLOSE):
        raise TraceFormatError("spawn block is never closed with '<End Calling Sub Searches>'")
    return text[:start], block


def parse_spawn(text: str) -> list[SpawnItem]:
    """The children named by the spawn block that ends ``text``, checked for order and well-formedness."""
    _, block = split_spawn(text)
    lines = block.rstrip("\n").split("\n")[1:-1]
    if not lines:
        raise TraceFormatError("spawn block names no child")
    items = []
    for k, line in enumerate(lines):
        m = _SPAWN_ITEM_RE.fullmatch(line)
        if not m:
            raise TraceFormatError(f"malformed spawn line {line!r}")
        if int(m.group(1)) != k:
            raise TraceFormatError(f"spawn line {k} is numbered {m.group(1)}")
        items.append(SpawnItem(k, int(m.group(2)), m.group(3)))
    return items


_GENERATED_RE = re.compile(rf"{re.escape(GENERATED)}([0-9,]+): (\d+):\[([0-9, ]*)\]{OPERATION}(\S+)")
_STATE_OPS_RE = re.compile(rf"{re.escape(CURRENT_STATE)}(\d+):\[[0-9, ]*\]{OPERATIONS}\[(.*)\]")


def _parse_ops(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    parts = text.split(", ")
    if not all(len(p) >= 2 and p[0] == "'" and p[-1] == "'" for p in parts):
        raise TraceFormatError(f"malformed operations list [{text}]")
    return tuple(p[1:-1] for p in parts)


def child_prompt(parent_text: str, node_id: str) -> str:
    """Prompt of the child that explores ``node_id``, from the parent's ``Generated Node`` line.

    The child's operations are those of the ``Current State`` line the node was generated under, plus the
    node's own operation. The LAST ``Generated Node #id`` line before the spawn block is used.
    """
    lines = parent_text.split("\n")
    for k in range(len(lines) - 1, -1, -1):
        m = _GENERATED_RE.fullmatch(lines[k])
        if not m or m.group(1) != node_id:
            continue
        target, nums, op = int(m.group(2)), m.group(3), m.group(4)
        for j in range(k - 1, -1, -1):
            s = _STATE_OPS_RE.fullmatch(lines[j])
            if s:
                ops = _parse_ops(s.group(2)) + (op,)
                return f"{MOVING}{node_id}\n{CURRENT_STATE}{target}:[{nums}]{OPERATIONS}{fmt_ops(ops)}"
        raise TraceFormatError(f"node #{node_id} has no 'Current State' line above it")
    raise TraceFormatError(f"parent never generated node #{node_id}")


def child_prompts(parent_text: str) -> list[tuple[SpawnItem, str]]:
    """Every child of the spawn block ending ``parent_text`` with its prompt."""
    pre, _ = split_spawn(parent_text)
    return [(item, child_prompt(pre, item.node_id)) for item in parse_spawn(parent_text)]


# --------------------------------------------------------------------------------------------------------
# Returns and joins: children -> parent continuation.
# --------------------------------------------------------------------------------------------------------

_GOAL_LINE_RE = re.compile(r"^\d+,\d+ equal: Goal Reached$", re.M)


def is_goal_line(line: str) -> bool:
    """True for a ``T,T equal: Goal Reached`` line (without its newline), as :func:`solution_path` finds them."""
    return _GOAL_LINE_RE.fullmatch(line) is not None


def solution_path(text: str) -> str | None:
    """The final solution path of a thread: the text after its second-to-last ``Goal Reached`` line, up to
    and including the last one. ``None`` when the text holds fewer than two ``Goal Reached`` lines."""
    goals = list(_GOAL_LINE_RE.finditer(text))
    if len(goals) < 2:
        return None
    start = goals[-2].end() + 1  # skip the newline that ends the second-to-last goal line
    end = goals[-1].end()
    path = text[start:end]
    return path + "\n" if start <= end else None


def path_operations(path: str | None) -> tuple[str, ...]:
    """The operations (``'53-22=31'``) of a solution path's ``Exploring Operation`` lines, in order; lines
    outside the grammar (model output may hold any) are skipped. How answers are compared and voted."""
    ops = []
    for line in (path or "").split("\n"):
        try:
            parsed = parse_line(line)
        except TraceFormatError:
            continue
        if parsed.kind == "exploring":
            ops.append(parsed.fields[0])
    return tuple(ops)


def child_return(child_text: str) -> str | None:
    """What a child returns to its parent: its solution path, or ``None`` (reported as no solution)."""
    return solution_path(child_text)


def join_block(level: int, children: Sequence[tuple[str, str | None]]) -> str:
    """``<Sub Searches>`` block from (node id, returned path or None) per child, in spawn order."""
    out = [JOIN_OPEN + "\n"]
    for i, (node_id, path) in enumerate(children):
        if path:
            out.append(f"{JOIN_GOAL}{i}{AT_LEVEL}{level}{AT_NODE}{node_id}>\n{path}")
        else:
            out.append(f"{JOIN_FAIL}{i}{AT_LEVEL}{level}{AT_NODE}{node_id}>\n")
    out.append(JOIN_CLOSE + "\n")
    return "".join(out)


def parent_continuation(spawn_call: str, children_returns: Sequence[str | None]) -> str:
    """Prompt of the parent's next call: its pre-spawn text followed by the join block."""
    pre, _ = split_spawn(spawn_call)
    items = parse_spawn(spawn_call)
    if len(children_returns) != len(items):
        raise ValueError(f"{len(items)} children spawned but {len(children_returns)} returns given")
    level = items[0].level
    return pre + join_block(level, [(it.node_id, ret) for it, ret in zip(items, children_returns)])


# --------------------------------------------------------------------------------------------------------
# APR demonstrations: the release's nested ``trace_dict``.
# --------------------------------------------------------------------------------------------------------


def iter_calls(trace_dict: dict, depth: int = 0) -> Iterator[tuple[int, str]]:
    """Every call of a demonstration as (depth, text): depth 0 = parent calls, 1 = children."""
    for text in trace_dict["main_calls"]:
        yield depth, text
    for spawn in trace_dict["sub_calls"]:
        for child in spawn:
            yield from iter_calls(child, depth + 1)


def check_demonstration(trace_dict: dict) -> None:
    """Check that a demonstration is internally consistent, rebuilding every child prompt and every join
    with this module's functions. Raises TraceFormatError naming the first inconsistency."""
    mains, subs = trace_dict.get("main_calls"), trace_dict.get("sub_calls")
    if not isinstance(mains, list) or not isinstance(subs, list) or not mains:
        raise TraceFormatError("trace_dict needs non-empty 'main_calls' and a 'sub_calls' list")
    if len(mains) != len(subs) + 1:
        raise TraceFormatError(f"{len(mains)} main calls but {len(subs)} spawns")
    for k, children in enumerate(subs):
        call = mains[k]
        if not ends_with_spawn(call):
            raise TraceFormatError(f"main call {k} does not end with a spawn block")
        prompts = child_prompts(call)
        if len(prompts) != len(children):
            raise TraceFormatError(f"spawn {k} names {len(prompts)} children, {len(children)} recorded")
        returns = []
        for (item, prompt), child in zip(prompts, children):
            text = child["main_calls"][-1]
            if not text.startswith(prompt + "\n"):
                raise TraceFormatError(f"child #{item.node_id} of spawn {k} does not start with its prompt")
            check_demonstration(child)
            returns.append(child_return(text))
        expected = parent_continuation(call, returns)
        if not mains[k + 1].startswith(expected):
            raise TraceFormatError(f"main call {k + 1} does not start with the rebuilt join of spawn {k}")
    if ends_with_spawn(mains[-1]):
        raise TraceFormatError("the last main call ends with a spawn that has no children")


def count_children(trace_dict: dict) -> int:
    """Number of child threads of a demonstration (all spawns)."""
    return sum(len(s) for s in trace_dict["sub_calls"])


# --------------------------------------------------------------------------------------------------------
# Line-level parser: text -> typed lines -> text (exact round trip for every line of the grammar).
# --------------------------------------------------------------------------------------------------------

_NUMS = r"\[((?:\d+(?:, \d+)*)?)\]"
_OPS = r"\[((?:'[^']*'(?:, '[^']*')*)?)\]"
_LINE_PATTERNS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("moving", rf"{re.escape(MOVING)}([0-9,]+)"),
        ("state", rf"{re.escape(CURRENT_STATE)}(\d+):{_NUMS}{re.escape(OPERATIONS)}{_OPS}"),
        ("exploring", rf"{re.escape(EXPLORING)}(\d+[+\-*/]\d+=\d+){re.escape(RESULTING)}{_NUMS}"),
        ("generated", rf"{re.escape(GENERATED)}([0-9,]+): (\d+):{_NUMS}{re.escape(OPERATION)}(\d+[+\-*/]\d+=\d+)"),
        ("goal", rf"(\d+),(\d+){re.escape(EQUAL)}"),
        ("no_goal", rf"(\d+),(\d+){re.escape(UNEQUAL)}"),
        ("no_solution", re.escape(NO_SOLUTION)),
        ("sos_start", rf"{re.escape(SOS_START)}(\d+): {re.escape(MOVING)}([0-9,]+)"),
        ("sos_exit", rf"{re.escape(SOS_EXIT)}(\d+)"),
        ("sos_failed", re.escape(SOS_FAILED)),
        ("spawn_open", re.escape(SPAWN_OPEN)),
        ("spawn_item", rf"{re.escape(SPAWN_ITEM)}(\d+){AT_LEVEL}(\d+)> {re.escape(MOVING)}([0-9,]+)"),
        ("spawn_close", re.escape(SPAWN_CLOSE)),
        ("join_open", re.escape(JOIN_OPEN)),
        ("join_goal", rf"{re.escape(JOIN_GOAL)}(\d+){AT_LEVEL}(\d+){AT_NODE}([0-9,]+)>"),
        ("join_fail", rf"{re.escape(JOIN_FAIL)}(\d+){AT_LEVEL}(\d+){AT_NODE}([0-9,]+)>"),
        ("join_close", re.escape(JOIN_CLOSE)),
    )
)


@dataclasses.dataclass(frozen=True)
class Line:
    """One parsed line: its kind and fields (strings, ints, tuples)."""

    kind: str
    fields: tuple = ()


def _nums_field(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(", ")) if text else ()


def parse_line(line: str) -> Line:
    """Parse one line (without its newline). Raises TraceFormatError for a line outside the grammar."""
    for kind, pattern in _LINE_PATTERNS:
        m = pattern.fullmatch(line)
        if not m:
            continue
        g = m.groups()
        if kind == "state":
            return Line(kind, (int(g[0]), _nums_field(g[1]), _parse_ops(g[2])))
        if kind == "exploring":
            return Line(kind, (g[0], _nums_field(g[1])))
        if kind == "generated":
            return Line(kind, (g[0], int(g[1]), _nums_field(g[2]), g[3]))
        if kind in ("goal", "no_goal", "sos_exit"):
            return Line(kind, tuple(int(x) for x in g))
        if kind == "sos_start":
            return Line(kind, (int(g[0]), g[1]))
        if kind in ("spawn_item", "join_goal", "join_fail"):
            return Line(kind, (int(g[0]), int(g[1]), g[2]))
        return Line(kind, tuple(g))
    raise TraceFormatError(f"line outside the trace grammar: {line!r}")


_OPERATION_RE = re.compile(r"(\d+)([+\-*/])(\d+)=(\d+)")


def parse_operation(op: str) -> tuple[int, str, int, int]:
    """``'53-22=31'`` -> ``(53, '-', 22, 31)``. Raises TraceFormatError for anything else."""
    m = _OPERATION_RE.fullmatch(op)
    if not m:
        raise TraceFormatError(f"malformed operation {op!r}")
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))


def render_line(line: Line) -> str:
    """Inverse of :func:`parse_line` (without the newline)."""
    f, k = line.fields, line.kind
    text = {
        "moving": lambda: moving_line(f[0]),
        "state": lambda: state_line(*f),
        "exploring": lambda: exploring_line(f[0], f[1]),
        "generated": lambda: generated_line(*f),
        "goal": lambda: f"{f[0]},{f[1]}{EQUAL}\n",
        "no_goal": lambda: f"{f[0]},{f[1]}{UNEQUAL}\n",
        "no_solution": no_solution_line,
        "sos_start": lambda: sos_start_line(*f),
        "sos_exit": lambda: sos_exit_line(*f),
        "sos_failed": sos_failed_line,
        "spawn_open": lambda: SPAWN_OPEN + "\n",
        "spawn_item": lambda: f"{SPAWN_ITEM}{f[0]}{AT_LEVEL}{f[1]}> {MOVING}{f[2]}\n",
        "spawn_close": lambda: SPAWN_CLOSE + "\n",
        "join_open": lambda: JOIN_OPEN + "\n",
        "join_goal": lambda: f"{JOIN_GOAL}{f[0]}{AT_LEVEL}{f[1]}{AT_NODE}{f[2]}>\n",
        "join_fail": lambda: f"{JOIN_FAIL}{f[0]}{AT_LEVEL}{f[1]}{AT_NODE}{f[2]}>\n",
        "join_close": lambda: JOIN_CLOSE + "\n",
    }[k]()
    return text[:-1]


def parse_trace(text: str) -> list[Line]:
    """Every line of a trace (a trailing newline is expected; a final partial line is an error)."""
    if text and not text.endswith("\n"):
        raise TraceFormatError("trace is truncated: its last line has no newline")
    return [parse_line(line) for line in text.split("\n")[:-1]] if text else []


def render_trace(lines: Sequence[Line]) -> str:
    return "".join(render_line(line) + "\n" for line in lines)
