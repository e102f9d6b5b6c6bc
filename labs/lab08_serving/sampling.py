"""Choosing the next token: greedy, temperature and nucleus (top-p) sampling, reproducible per request.

What it gives: the same request with the same seed produces the same tokens whatever else is in the batch, because
every sequence draws from its own random generator (a batch-wide generator would make a request's samples depend on
its neighbours).

With logits z over the vocabulary V and temperature T > 0:

    P(x) = exp(z_x / T) / sum_y exp(z_y / T)                          T -> 0 is greedy; T = 0 means argmax exactly

Nucleus sampling (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751) keeps the
smallest set of most likely tokens whose probability reaches p and renormalises:

    sort P descending: P_(1) >= P_(2) >= ...;  keep x_(k) iff sum_{i<k} P_(i) < p     (x_(1) is always kept)
    P'(x) = P(x) / sum_{kept} P  for kept x, else 0

Usage:
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=64, seed=1)
    tokens = sample_next_tokens(logits, [params] * B, generators)        # logits (B, V)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# -----------------------------------------------------------------------------
# Parameters of a request


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How a request is decoded (vLLM's names and defaults).

    n: outputs per prompt (parallel sampling: they share the prompt's cache blocks), >= 1.
    temperature: >= 0; 0 is greedy decoding.
    top_p: in (0, 1]; 1 keeps the whole vocabulary.
    max_tokens: output tokens at most, >= 1.
    stop_token_ids: a sequence ends after producing one of these (it is kept in the output).
    seed: seeds the request's generators (output i uses seed + i); None draws from the engine's seed.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        # TODO (lab08): your code here
        raise NotImplementedError("lab08: SamplingParams.__post_init__ is not implemented yet (lab08_serving/sampling.py)")


# -----------------------------------------------------------------------------
# Sampling


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the nucleus of each row of a distribution, renormalised.

    Args:
        probs: (..., V) probabilities (rows sum to 1).
        top_p: p in (0, 1].

    Returns:
        (..., V): probs on the smallest set of most likely tokens whose mass reaches p (ties broken by sort order),
        0 elsewhere, each row summing to 1.
    """
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: top_p_filter is not implemented yet (lab08_serving/sampling.py)")


def sample_next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                       generators: list[torch.Generator | None]) -> list[int]:
    """One next token per row.

    Args:
        logits: (B, V), any float dtype (sampled in fp32).
        params: B SamplingParams; temperature 0 rows take the argmax (the first maximum on ties).
        generators: B generators on logits' device (None only for greedy rows), each row's own.

    Returns:
        B token ids.
    """
    # TODO (lab08): your code here
    raise NotImplementedError("lab08: sample_next_tokens is not implemented yet (lab08_serving/sampling.py)")
