"""Tokenized training sequences on disk, read with random access (a grain-compatible data source).

Layout of one folder (see docs/interfaces.md): ``tokens.bin`` (all sequences concatenated, raw
little-endian), ``offsets.npy`` (int64 [N+1]), ``kinds.npy`` (uint8 [N]), ``problem_ids.npy`` (int64 [N]),
``meta.json``. The folder is written under a temporary name and renamed when complete, so a killed run
never leaves a folder that reads as complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

KIND_SOSP, KIND_APR_PARENT, KIND_APR_CHILD = 0, 1, 2
KIND_NAMES = {KIND_SOSP: "sosp", KIND_APR_PARENT: "apr_parent", KIND_APR_CHILD: "apr_child"}


def write_arrays(folder: str | Path, parts: Iterable[dict], *, vocab_size: int, bos_id: int, eos_id: int,
                 pad_id: int) -> dict:
    """Write sequences given as parts ``{"tokens": int array (concatenated), "lengths", "kinds",
    "problem_ids"}`` (each part already holds BOS/EOS) into ``folder`` atomically; returns the meta."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
    lengths, kinds, pids = [], [], []
    num_tokens = 0
    with open(tmp / "tokens.bin", "wb") as f:
        for part in parts:
            toks = np.asarray(part["tokens"])
            if toks.size and (toks.min() < 0 or toks.max() >= vocab_size):
                raise ValueError(f"token id out of range [0, {vocab_size}) while writing {folder}")
            f.write(toks.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes())
            lengths.append(np.asarray(part["lengths"], np.int64))
            kinds.append(np.asarray(part["kinds"], np.uint8))
            pids.append(np.asarray(part["problem_ids"], np.int64))
            num_tokens += int(toks.size)
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if int(lengths_all.sum()) != num_tokens:
        raise ValueError(f"lengths sum to {int(lengths_all.sum())} but {num_tokens} tokens were written")
    offsets = np.concatenate([[0], np.cumsum(lengths_all)]).astype(np.int64)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "kinds.npy", np.concatenate(kinds) if kinds else np.zeros(0, np.uint8))
    np.save(tmp / "problem_ids.npy", np.concatenate(pids) if pids else np.zeros(0, np.int64))
    meta = {"dtype": np.dtype(dtype).name, "num_sequences": int(len(lengths_all)), "num_tokens": num_tokens,
            "bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "vocab_size": vocab_size}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return meta


class TokenArraySource:
    """Random access to the sequences of one arrays folder: ``len(src)``, ``src[i] -> np.int32 array``.

    Works as a grain ``RandomAccessDataSource`` (``grain.MapDataset.source(src)``); memory-maps the tokens,
    so it is cheap to open in every worker and to pickle.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.folder} is not a complete arrays folder (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        self.offsets = np.load(self.folder / "offsets.npy")
        self.kinds = np.load(self.folder / "kinds.npy")
        self.problem_ids = np.load(self.folder / "problem_ids.npy")
        n = self.meta["num_sequences"]
        if len(self.offsets) != n + 1 or self.offsets[-1] != self.meta["num_tokens"]:
            raise ValueError(f"{self.folder}: offsets do not match meta.json (corrupt or partial folder)")
        self._tokens = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
            self._tokens = np.memmap(self.folder / "tokens.bin", dtype=dtype, mode="r")
            if self._tokens.size != self.meta["num_tokens"]:
                raise ValueError(f"{self.folder}/tokens.bin holds {self._tokens.size} tokens, "
                                 f"meta.json says {self.meta['num_tokens']}")
        return self._tokens

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return int(self.meta["num_sequences"])

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)} sequences in {self.folder}")
        index %= len(self)
        return np.asarray(self.tokens[self.offsets[index]:self.offsets[index + 1]], dtype=np.int32)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def __repr__(self) -> str:
        return f"TokenArraySource({str(self.folder)!r}, sequences={len(self)}, tokens={self.meta['num_tokens']})"
