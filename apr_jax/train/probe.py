"""Teacher-forced probe of what a checkpoint has learned, by kind of trace token (experiments/probe_skills.py).

Greedy accuracy stays 0 until a model has learned everything a search needs; this shows the parts on the way:
operand choice and copying, arithmetic, the copied lists and lines, retrieval of earlier nodes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from apr_jax.countdown import traces

KINDS = ("operands", "operand_in_state", "operator", "result", "resulting", "generated", "state", "other")


def token_kinds(pieces: list[str]) -> tuple[list[str], list[set | None]]:
    """Kind of each token of a trace given as its token strings, and the current state's numbers for each.

    ``pieces`` concatenate to the text (the domain tokenizer's tokens are literal phrases and numbers).
    """
    text = "".join(pieces)
    spans: list[tuple[int, int, str]] = []  # (start, end, kind) character spans, in order
    state: set | None = None
    states: list[tuple[int, set | None]] = []  # (line start, current state's numbers) per line
    pos = 0
    for line in text.split("\n"):
        start, pos = pos, pos + len(line) + 1
        try:
            parsed = traces.parse_line(line)
        except traces.TraceFormatError:
            parsed = None
        kind = parsed.kind if parsed else None
        if kind == "state":
            state = set(parsed.fields[1])
            spans.append((start + len(traces.CURRENT_STATE), start + len(line), "state"))
        elif kind == "exploring":
            op = parsed.fields[0]
            body = start + len(traces.EXPLORING)
            eq = body + op.index("=")
            spans += [(body, eq, "operands"), (eq + 1, body + len(op), "result"),
                      (body + len(op) + len(traces.RESULTING), start + len(line), "resulting")]
        elif kind == "generated":
            spans.append((start + len(traces.GENERATED), start + len(line), "generated"))
        states.append((start, state))
    kinds, token_states = [], []
    offset, s, line_i = 0, 0, 0
    for piece in pieces:
        while s < len(spans) and spans[s][1] <= offset:
            s += 1
        while line_i + 1 < len(states) and states[line_i + 1][0] <= offset:
            line_i += 1
        inside = s < len(spans) and spans[s][0] <= offset < spans[s][1]
        kind = spans[s][2] if inside else "other"
        if kind == "operands" and not piece.isdigit():
            kind = "operator"
        elif kind != "operands" and not piece.isdigit():
            kind = "other"  # brackets, commas, separators: format, not content
        kinds.append(kind)
        token_states.append(states[line_i][1] if states else None)
        offset += len(piece)
    return kinds, token_states


def model_predictor(cfg, params):
    """``predict(tokens [B, T], lengths [B]) -> [B, T]``: the model's argmax next token at every position.

    One jitted function for every checkpoint of a config (``cfg`` is static), so probing several steps
    compiles once per padded width, not once per checkpoint.
    """
    return lambda tokens, lengths: np.asarray(_argmax(cfg, params, tokens, lengths))


@functools.partial(jax.jit, static_argnames="cfg")
def _argmax(cfg, params, tokens, lengths):
    from apr_jax.model import llama

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return llama.forward(cfg, params, tokens, positions, valid_lengths=lengths)[0].argmax(-1)


def probe(predict, tok, seqs: list[np.ndarray], pad_id: int = 0, batch: int = 4) -> dict:
    """Teacher-forced top-1 accuracy by token kind over ``seqs`` (token id arrays, BOS first).

    ``predict(tokens [B, T] int32, lengths [B]) -> [B, T]`` gives the predicted next token at each position
    (:func:`model_predictor`). Rows are right-padded with ``pad_id`` to a multiple of 256.
    """
    hits = {k: 0 for k in KINDS}
    counts = {k: 0 for k in KINDS}
    for i in range(0, len(seqs), batch):
        group = seqs[i:i + batch]
        width = -(-max(len(s) for s in group) // 256) * 256  # few shapes, few compilations
        tokens = np.full((len(group), width), pad_id, np.int32)
        for r, s in enumerate(group):
            tokens[r, :len(s)] = s
        pred = predict(tokens, np.array([len(s) for s in group], np.int32))
        for r, s in enumerate(group):
            pieces = [tok.id_to_token(int(t)) or "" for t in s[1:]]  # after BOS
            kinds, states = token_kinds(pieces)
            guess = pred[r, :len(s) - 1]  # prediction of token t+1 from the prefix up to t
            for j, (kind, state) in enumerate(zip(kinds, states)):
                hits[kind] += int(guess[j] == s[j + 1])
                counts[kind] += 1
                first_operand = kind == "operands" and (j == 0 or kinds[j - 1] == "other")
                if first_operand and state is not None:
                    word = tok.id_to_token(int(guess[j])) or ""
                    counts["operand_in_state"] += 1
                    hits["operand_in_state"] += int(word.isdigit() and int(word) in state)
    return {k: {"accuracy": hits[k] / counts[k] if counts[k] else None, "tokens": counts[k]} for k in KINDS}


def validation_sequences(data_dir, method: str, n: int) -> list[np.ndarray]:
    """The first ``n`` validation token sequences of ``method`` in a data folder (exactly the training format)."""
    from pathlib import Path

    from apr_jax.data.arrays import TokenArraySource

    source = TokenArraySource(Path(data_dir) / "arrays" / f"{method}_val")
    return [np.asarray(source[i]) for i in range(min(n, len(source)))]


def probe_checkpoint(cfg, params, tok, seqs: list[np.ndarray]) -> dict:
    """:func:`probe` of one checkpoint's model (padding with the tokenizer's pad id)."""
    from apr_jax.data.tokenizer import special_ids

    return probe(model_predictor(cfg, params), tok, seqs, pad_id=special_ids(tok)[0])


def spawn_hazard(log_probs, tok, seqs: list[np.ndarray]) -> dict:
    """When does an APR parent decide to spawn? Teacher-forced, at every line start of a parent's root
    expansion where the demonstration writes either ``Exploring Operation: `` (another root node) or
    ``<Calling Sub Searches>`` (the spawn), the model's probability of each.

    ``log_probs(ids [T] int32) -> [T, V]`` gives next-token log-probabilities; ``seqs`` are APR token
    sequences (BOS first); those without a spawn are skipped. Returns ``{k: {"stop": {...}, "go": {...}}}``
    where ``k`` is the number of root nodes listed so far and each side (the demonstration spawns here / goes
    on) holds ``n``, mean ``p_spawn`` and mean ``p_explore``. A model that uses a ``Sub Call Budget`` prompt
    gives a high ``p_spawn`` on the "stop" side and a low one on the "go" side at the same ``k``.
    """
    spawn, explore = tok.token_to_id(traces.SPAWN_OPEN), tok.token_to_id(traces.EXPLORING)
    if spawn is None or explore is None:
        raise ValueError("the tokenizer has no single token for the spawn marker or 'Exploring Operation: '")
    sums: dict = {}
    for seq in seqs:
        seq = np.asarray(seq)
        if spawn not in seq:
            continue
        logp = np.asarray(log_probs(seq.astype(np.int32)))
        k = 0
        for j in range(len(seq) - 1):
            nxt = int(seq[j + 1])
            if nxt not in (spawn, explore) or "\n" not in (tok.id_to_token(int(seq[j])) or ""):
                continue
            side = "stop" if nxt == spawn else "go"
            cell = sums.setdefault(k, {}).setdefault(side, [0, 0.0, 0.0])
            cell[0] += 1
            cell[1] += float(np.exp(logp[j, spawn]))
            cell[2] += float(np.exp(logp[j, explore]))
            if side == "stop":
                break
            k += 1
    return {k: {side: {"n": n, "p_spawn": ps / n, "p_explore": pe / n} for side, (n, ps, pe) in sides.items()}
            for k, sides in sorted(sums.items())}


SPAWN_POINT_TOKENS = (traces.SPAWN_OPEN, traces.JOIN_OPEN, traces.MOVING, traces.EXPLORING)


def spawn_point(log_probs, tok, seqs: list[np.ndarray]) -> dict:
    """What the model would write where an APR parent's demonstration spawns: teacher-forced, at the position
    before the first ``<Calling Sub Searches>`` of each sequence that has one, the mean probability of spawning,
    of writing the join marker ``<Sub Searches>`` itself, of going on serially (``Moving to Node #``) and of
    listing another root node. Returns ``{"n": sequences read, token: mean probability, ...,
    "other": the rest}``. ``log_probs`` and ``seqs`` as for :func:`spawn_hazard`."""
    ids = {word: tok.token_to_id(word) for word in SPAWN_POINT_TOKENS}
    missing = [word for word, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer has no single token for {missing}")
    sums, n = dict.fromkeys(SPAWN_POINT_TOKENS, 0.0), 0
    for seq in seqs:
        seq = np.asarray(seq)
        where = np.flatnonzero(seq == ids[traces.SPAWN_OPEN])
        if not len(where) or where[0] == 0:
            continue
        p = np.exp(np.asarray(log_probs(seq.astype(np.int32)))[where[0] - 1])
        n += 1
        for word, i in ids.items():
            sums[word] += float(p[i])
    out = {"n": n, **{word: total / max(n, 1) for word, total in sums.items()}}
    out["other"] = 1.0 - sum(out[word] for word in SPAWN_POINT_TOKENS) if n else 0.0
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def _log_softmax(cfg, params, tokens):
    from apr_jax.model import llama

    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return jax.nn.log_softmax(llama.forward(cfg, params, tokens, positions)[0], axis=-1)


def model_log_probs(cfg, params):
    """``log_probs(ids [T]) -> [T, V]`` of one model. Like :func:`model_predictor`, one jitted function per
    config (parameters are an argument, not constants), compiled once per padded width (multiples of 128)."""

    def log_probs(ids):
        width = -(-len(ids) // 128) * 128
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        return np.asarray(_log_softmax(cfg, params, jnp.asarray(tokens)))[0, :len(ids)]
    return log_probs
