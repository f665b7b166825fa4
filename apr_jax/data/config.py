"""Configuration of the data stage (problems, demonstrations, tokenization)."""

from __future__ import annotations

import dataclasses

from apr_jax.countdown.heuristics import HEURISTICS
from apr_jax.countdown.problems import ProblemSpec
from apr_jax.data.tokenizer import NUMBER_MODES


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything that decides the bytes of a dataset. Worker count is not here: it never changes them.

    Defaults are the paper's (Pan et al. 2025, and its release's solvers).
    """

    num_inputs: int = 4  # input numbers per problem
    max_num: int = 99  # input numbers are uniform in 1..max_num
    min_target: int = 10
    max_target: int = 100
    num_train: int = 500_000
    num_val: int = 1_000
    seed: int = 0
    heuristic: str = "mult"  # the heuristic both generators used in practice
    sosp_max_beam: int = 5  # SoS+ beam ~ U{1..sosp_max_beam}
    sosp_subsearch_prob: float = 0.5  # probability that an expansion recurses into its children serially
    apr_max_beam: int = 10  # APR beam ~ U{1..apr_max_beam}
    apr_max_sub_beam: int = 15  # child beam ~ U{beam..apr_max_sub_beam}
    apr_spawn_prob: float = 0.9  # probability that a level-0 expansion with >1 children spawns
    release_compat: bool = False  # reproduce the release's misplaced 'Moving to Node' after failed spawns
    number_mode: str = "digits"  # 'digits' (Llama-2, the paper) or 'integers'
    max_int_digits: int = 4  # integers mode: numbers below 10**max_int_digits are one token
    tokenizer_file: str = ""  # optional external tokenizer.json (e.g. Llama-2's) instead of the domain one
    context: int = 4096  # tokens per sequence (BOS + text + EOS); longer sequences are counted, not cut
    condition_prefix: bool = False  # prepend 'Sub Call Budget: n ' / 'Token Budget: b ' to the arrays
    chunk_size: int = 1000  # problems per work unit (fixed, so output does not depend on workers)

    def __post_init__(self):
        self.problem_spec()  # validates the ranges
        if self.num_train < 1 or self.num_val < 0:
            raise ValueError(f"need num_train >= 1 and num_val >= 0, got {self.num_train}, {self.num_val}")
        if self.heuristic not in HEURISTICS:
            raise ValueError(f"heuristic must be one of {sorted(HEURISTICS)}, got {self.heuristic!r}")
        if not 1 <= self.sosp_max_beam or not 1 <= self.apr_max_beam:
            raise ValueError("beam sizes must be >= 1")
        for name in ("sosp_subsearch_prob", "apr_spawn_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.number_mode not in NUMBER_MODES:
            raise ValueError(f"number_mode must be one of {NUMBER_MODES}, got {self.number_mode!r}")
        if self.chunk_size < 1 or self.context < 16:
            raise ValueError("chunk_size must be >= 1 and context >= 16")

    def problem_spec(self) -> ProblemSpec:
        return ProblemSpec(self.num_inputs, self.max_num, self.min_target, self.max_target)
