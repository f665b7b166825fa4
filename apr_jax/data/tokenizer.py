"""A compact domain tokenizer for the trace language, built with HF ``tokenizers``.

Vocabulary: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3 (Llama-2's ids for pad/BOS/EOS), every fixed
phrase of the grammar as one token (``Exploring Operation: ``, ``<Calling Sub Searches>``, ...), numbers,
and every printable ASCII character plus newline as a fallback, so any ASCII text round-trips losslessly.

Numbers are a preset choice:
- ``digits``: one token per digit, as Llama-2's tokenizer does (the paper's setting);
- ``integers``: one token per integer below ``10**max_int_digits``; longer numbers fall back to digits.

The result is a standard ``tokenizer.json`` (WordLevel model, regex pre-tokenizer, Fuse decoder, a
``<s> $A`` post-processor as Llama's), so ``transformers`` and SGLang load it unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from apr_jax.countdown.traces import PHRASES

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
NUMBER_MODES = ("digits", "integers")


def _vocab(number_mode: str, max_int_digits: int) -> list[str]:
    tokens = [PAD, BOS, EOS, UNK]
    tokens += list(PHRASES)
    if number_mode == "digits":
        numbers = [str(d) for d in range(10)]
    else:
        numbers = [str(n) for n in range(10 ** max_int_digits)]
    tokens += numbers
    chars = ["\n"] + [chr(c) for c in range(32, 127) if not chr(c).isdigit()]
    tokens += chars
    return tokens


def _pattern(number_mode: str, max_int_digits: int) -> str:
    phrases = "|".join(re.escape(p) for p in PHRASES)
    if number_mode == "digits":
        number = r"\d"
    else:
        number = rf"(?<!\d)[1-9]\d{{0,{max_int_digits - 1}}}(?!\d)|\d"
    return rf"{phrases}|{number}|[\s\S]"


def build_tokenizer(number_mode: str = "digits", max_int_digits: int = 4) -> Tokenizer:
    """The domain tokenizer for a number mode (see module docstring)."""
    if number_mode not in NUMBER_MODES:
        raise ValueError(f"number_mode must be one of {NUMBER_MODES}, got {number_mode!r}")
    if number_mode == "integers" and not 1 <= max_int_digits <= 5:
        raise ValueError(f"max_int_digits must be in 1..5, got {max_int_digits}")
    vocab = {tok: i for i, tok in enumerate(_vocab(number_mode, max_int_digits))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_pattern(number_mode, max_int_digits)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    tok.add_special_tokens([PAD, BOS, EOS, UNK])
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (a file, or a directory that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return Tokenizer.from_file(str(path))


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return path


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens."""
    return tok.encode(text, add_special_tokens=False).ids


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def decode(tok: Tokenizer, ids) -> str:
    """Text of ``ids``; special tokens (pad, BOS, EOS) are dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def vocab_size(tok: Tokenizer) -> int:
    return tok.get_vocab_size(with_added_tokens=True)


class FastEncoder:
    """A vectorised encoder for bulk data generation, equal to the ``tokenizer.json`` model on trace text.

    Each grammar phrase (longest first) and, in ``integers`` mode, each integer token is first replaced by
    one private-use code point; every code point then maps to its id through a lookup table. This is two
    orders of magnitude faster than the regex pre-tokenizer. The trace grammar has no two phrases where a
    shorter one starts inside a longer one's match, so this equals the leftmost-alternation regex on traces;
    ``tests/test_tokenizer.py`` checks equality on every demonstration it generates.
    """

    _PHRASE_BASE = 0xE000
    _INT_BASE = 0xF0000

    def __init__(self, tok: Tokenizer):
        vocab = tok.get_vocab(with_added_tokens=True)
        self.integers = "10" in vocab
        self.max_int_digits = max(len(t) for t in vocab if t.isdigit()) if self.integers else 1
        self._phrases = [p for p in PHRASES if p in vocab]
        size = self._INT_BASE + 10 ** self.max_int_digits if self.integers else self._PHRASE_BASE + len(PHRASES)
        import numpy as np

        self._np = np
        lut = np.full(size, UNK_ID, dtype=np.int32)
        for token, idx in vocab.items():
            if len(token) == 1:
                lut[ord(token)] = idx
        for k, phrase in enumerate(self._phrases):
            lut[self._PHRASE_BASE + k] = vocab[phrase]
        if self.integers:
            for n in range(10 ** self.max_int_digits):
                lut[self._INT_BASE + n] = vocab[str(n)]
            self._number = re.compile(rf"(?<!\d)(?:[1-9]\d{{0,{self.max_int_digits - 1}}}|0)(?!\d)")
        self._lut = lut

    def _codes(self, text: str):
        """Code points of ``text`` after replacing phrases (and integers) by their private code points."""
        for k, phrase in enumerate(self._phrases):
            if phrase in text:
                text = text.replace(phrase, chr(self._PHRASE_BASE + k))
        codes = self._np.frombuffer(text.encode("utf-32-le"), dtype=self._np.uint32).copy()
        return self._merge_integers(codes) if self.integers else codes

    def _lookup(self, codes):
        codes[(codes >= len(self._lut)) | (codes == 0)] = 0
        ids = self._lut[codes]
        ids[codes == 0] = UNK_ID
        return ids

    def encode(self, text: str):
        """Token ids (np.int32) of ``text`` with no special tokens."""
        return self._lookup(self._codes(text))

    def encode_many(self, texts: list[str]) -> list:
        """``[encode(t) for t in texts]`` in one vectorised pass (texts joined by a sentinel code point)."""
        np = self._np
        sentinel = chr(self._PHRASE_BASE + 0xFF)
        if not texts or any(sentinel in t for t in texts):
            return [self.encode(t) for t in texts]
        codes = self._codes(sentinel.join(texts))
        cuts = np.flatnonzero(codes == ord(sentinel))
        ids = self._lookup(codes)  # the sentinels become <unk> and are cut out below
        bounds = np.concatenate([[-1], cuts, [len(ids)]])
        return [ids[bounds[i] + 1:bounds[i + 1]] for i in range(len(texts))]

    def _merge_integers(self, codes):
        """Replace each run of digits that is one integer token (no leading zero, at most
        ``max_int_digits`` long, or a lone ``0``) by a single code point; leave other digits alone."""
        np = self._np
        is_digit = (codes >= 48) & (codes <= 57)
        edges = np.diff(np.concatenate([[0], is_digit.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        lengths = ends - starts
        ok = (lengths <= self.max_int_digits) & ((codes[starts] != 48) | (lengths == 1))
        starts, lengths = starts[ok], lengths[ok]
        values = np.zeros(len(starts), dtype=np.int64)
        keep = np.ones(len(codes), dtype=bool)
        for j in range(self.max_int_digits):
            inside = j < lengths
            pos = starts[inside] + j
            values[inside] = values[inside] * 10 + (codes[pos].astype(np.int64) - 48)
            if j:
                keep[pos] = False
        codes[starts] = self._INT_BASE + values
        return codes[keep]


class HFEncoder:
    """Bulk encoding through any ``tokenizers`` model (e.g. Llama-2's ``tokenizer.json``); slower."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def encode(self, text: str):
        import numpy as np

        return np.asarray(encode(self.tok, text), dtype=np.int32)

    def encode_many(self, texts: list[str]) -> list:
        import numpy as np

        return [np.asarray(ids, dtype=np.int32) for ids in encode_batch(self.tok, texts)]


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """(pad, bos, eos) ids of a tokenizer: ours, or Llama-2's (``<unk>`` 0 doubles as pad, as in the paper)."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if bos is None or eos is None:
        raise ValueError("the tokenizer has no '<s>'/'</s>' tokens; APR needs BOS and EOS")
    pad = tok.token_to_id(PAD)
    return (0 if pad is None else pad), bos, eos
