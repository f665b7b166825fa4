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
"""

from __future__ import annotations

import re
from typing import Sequence

from apr_jax.countdown import traces

AIDS = ("none", "arithmetic")

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


def make_aid(name: str, codec):
    """The aid called ``name`` (``"none"`` gives None)."""
    if name not in AIDS:
        raise ValueError(f"aid must be one of {AIDS}, got {name!r}")
    return None if name == "none" else ArithmeticAid(codec)
