"""A clearly labelled decoding aid: the runtime writes a trace's arithmetic, the model writes the search.

Small models trained for minutes on a CPU learn the trace format long before they learn two-number
arithmetic (every failed output of the mini models held an arithmetic error). To measure what they learned
about *search* apart from arithmetic, this aid, applied equally to every method and always reported beside
the plain result (``--aid arithmetic``; results carry ``"aid": "arithmetic"``), writes two things for the
model, and nothing else:

- after ``a op b=`` (an operation the model wrote): the result ``c`` (``+``, ``*``, ``big-small``,
  ``big/small`` when it divides); an operation outside the rules (``3-7=``, ``7/2=``) gets nothing;
- after ``, Resulting Numbers: `` in an ``Exploring Operation`` line: the list that operation leaves, from
  the thread's last ``Current State`` line (``a`` and ``b`` removed once each, ``c`` appended, as
  :func:`apr_jax.countdown.game.successors` orders it); nothing when ``a`` or ``b`` is not in that state.

Which operation to try, which node to move to, when to spawn, what to copy and when the goal is reached
stay the model's. Forced tokens are recorded per thread (``forced``: their positions among the generated
tokens) and carry no loss in GRPO: they were not sampled.

A second aid, ``spawn``, concerns APR alone and is reported as such (``--aid spawn``, or ``arithmetic+spawn``
for both): it enforces the child-count prompt ``Sub Call Budget: n``. Small models learn the root
expansion's lines but not when to stop listing them (a teacher-forced probe shows their probability of
``<Calling Sub Searches>`` barely depends on ``n``), so a greedy parent spawns late or never. With this aid, once a
parent's first call has listed ``n`` distinct root nodes (``Generated Node #0,k`` lines, before any ``Moving
to Node`` line), the runtime finishes that line, writes the spawn block naming those nodes in listing order
and ends the call.
Which operations to list, every child's search and the parent's answer after the join stay the model's.
Without the prefix, and in children, continuation calls and SoS+ threads, it forces nothing.
"""

from __future__ import annotations

import re
from typing import Sequence

from apr_jax.countdown import traces

AIDS = ("none", "arithmetic", "spawn", "arithmetic+spawn")

_OP_TAIL = re.compile(r"(\d+)([+\-*/])(\d+)=$")


def apply_op(a: int, op: str, b: int) -> int | None:
    """``a op b`` under the game's rules as the traces write them, or None when the rules exclude it."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a >= b else None
    if b != 0 and a >= b and a % b == 0:
        return a // b
    return None


class ArithmeticAid:
    """Writes operation results and resulting-number lists (see module docstring).

    ``triggers`` are the token ids after which the engine asks :meth:`force` for tokens to append.
    """

    name = "arithmetic"

    def __init__(self, codec):
        self.codec = codec
        eq, res = codec.ids("="), codec.ids(traces.RESULTING)
        state, newline = codec.ids(traces.CURRENT_STATE), codec.ids("\n")
        for text, ids in (("=", eq), (traces.RESULTING, res), (traces.CURRENT_STATE, state), ("\\n", newline)):
            if len(ids) != 1:
                raise ValueError(f"the arithmetic aid needs {text!r} to be one token, the tokenizer gives {ids}")
        self.triggers = (eq[0], res[0])
        self._eq, self._res, self._state, self._newline = eq[0], res[0], state[0], newline[0]

    def _tail(self, ids: Sequence[int], stop_at: int, limit: int) -> str:
        """Text of ``ids`` after the last ``stop_at`` token (or after the last ``limit`` tokens)."""
        start = max(0, len(ids) - limit)
        for i in range(len(ids) - 1, start - 1, -1):
            if ids[i] == stop_at:
                start = i
                break
        return self.codec.text(ids[start:])

    def force(self, ids: Sequence[int]) -> list[int]:
        """Tokens to append to a thread whose ids (prompt + generated) end with a trigger; may be empty."""
        if not ids:
            return []
        if ids[-1] == self._eq:
            m = _OP_TAIL.search(self._tail(ids, self._newline, 32))
            if not m:
                return []
            c = apply_op(int(m.group(1)), m.group(2), int(m.group(3)))
            return [] if c is None else self.codec.ids(str(c))
        if ids[-1] == self._res:
            lines = self._tail(ids, self._state, 4096).split("\n")
            last = lines[-1]
            if len(lines) < 2 or not last.startswith(traces.EXPLORING) or not last.endswith(traces.RESULTING):
                return []
            try:  # the trace module's own parsers: a garbled state or operation gets nothing
                state = traces.parse_line(lines[0])
                a, _, b, c = traces.parse_operation(last[len(traces.EXPLORING):-len(traces.RESULTING)])
            except traces.TraceFormatError:
                return []
            if state.kind != "state":
                return []
            nums = list(state.fields[1])
            for x in (a, b):
                if x not in nums:
                    return []
                nums.remove(x)
            return self.codec.ids(traces.fmt_nums(nums + [c]))
        return []


def _parsed(line: str) -> traces.Line | None:
    try:
        return traces.parse_line(line)
    except traces.TraceFormatError:
        return None


class SpawnAid:
    """Ends an APR parent's first call with a spawn block once it has listed ``Sub Call Budget`` root nodes
    (see module docstring).

    Triggered by the `` Operation: `` token of a ``Generated Node`` line (children of 2-number states never
    write one, so the decode loop rarely pauses for it). When that line names the ``n``-th distinct root node,
    the aid finishes the line with the operation of the ``Exploring Operation`` line above it (the model's
    own, copied as the trace format does), then writes the spawn block and EOS.
    """

    name = "spawn"

    def __init__(self, codec):
        self.codec = codec
        op = codec.ids(traces.OPERATION)
        if len(op) != 1:
            raise ValueError(f"the spawn aid needs {traces.OPERATION!r} to be one token, the tokenizer gives {op}")
        self.triggers = (op[0],)

    def force(self, ids: Sequence[int]) -> list[int]:
        if not ids or ids[-1] != self.triggers[0]:
            return []
        prefix, body = traces.strip_condition_prefix(self.codec.text(ids))
        root = traces.moving_line("0")
        if not prefix.startswith(traces.SUB_CALL_BUDGET) or not body.startswith(root):
            return []
        budget = int(prefix[len(traces.SUB_CALL_BUDGET):])
        if budget < 1:
            return []
        body = body[len(root):]
        if any(marker in body for marker in (traces.MOVING, traces.SPAWN_OPEN, traces.JOIN_OPEN)):
            return []  # past the root's expansion, already spawned, or a continuation call
        lines = body.split("\n")
        explored = _parsed(lines[-2]) if len(lines) >= 2 else None
        if explored is None or explored.kind != "exploring":
            return []
        op = explored.fields[0]
        current = _parsed(lines[-1] + op)  # the line as the aid would finish it
        if current is None or current.kind != "generated":
            return []
        listed = [line.fields[0] for line in map(_parsed, lines[:-1]) if line is not None and line.kind == "generated"]
        nodes = list(dict.fromkeys(listed + [current.fields[0]]))
        if current.fields[0] in listed or len(nodes) < budget:
            return []  # this line repeats an earlier node, or fewer nodes than asked for
        return self.codec.ids(f"{op}\n{traces.spawn_block(1, nodes)}") + [self.codec.eos_id]


class CombinedAid:
    """Several aids at once: each trigger goes to the aid that owns it."""

    def __init__(self, aids):
        self.aids = tuple(aids)
        self.name = "+".join(a.name for a in self.aids)
        self.triggers = tuple(dict.fromkeys(t for a in self.aids for t in a.triggers))

    def force(self, ids: Sequence[int]) -> list[int]:
        for aid in self.aids:
            if ids and ids[-1] in aid.triggers:
                forced = aid.force(ids)
                if forced:
                    return forced
        return []


def make_aid(name: str, codec):
    """The aid called ``name`` (``"none"`` gives None)."""
    if name not in AIDS:
        raise ValueError(f"aid must be one of {AIDS}, got {name!r}")
    if name == "none":
        return None
    aids = {"arithmetic": ArithmeticAid, "spawn": SpawnAid}
    parts = [aids[part](codec) for part in name.split("+")]
    return parts[0] if len(parts) == 1 else CombinedAid(parts)
