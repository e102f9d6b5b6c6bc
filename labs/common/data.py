"""The embedded corpus, a byte-level tokenizer, and a seeded batch iterator. Nothing is downloaded.

The corpus is the text of Python's own help topics (`pydoc_data.topics`, ~460 kB of English prose and code that
ships with every CPython). Topics are joined in sorted order, so the corpus is the same on every machine with the same
Python minor version. The tokenizer maps UTF-8 bytes to ids 0..255, so the model's vocabulary is 256 and there is
nothing to train or download.

Usage:
    tokens = load_corpus()                                   # (T,) int64
    train, val = split_corpus(tokens)
    for x, y in batches(train, batch_size=8, seq_len=64, seed=0, num_batches=10):
        loss = model.loss(x, y)
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch

# -----------------------------------------------------------------------------
# Tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab_size 256, encode(decode(ids)) == ids for any valid UTF-8."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(values).decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# Corpus


def corpus_text() -> str:
    """The raw text: every pydoc topic, in sorted order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


@functools.lru_cache(maxsize=1)
def _corpus_tokens() -> torch.Tensor:
    return ByteTokenizer().encode(corpus_text())


def load_corpus(max_tokens: int | None = None) -> torch.Tensor:
    """The corpus as token ids, (T,) int64; optionally only the first `max_tokens` (tests keep it small)."""
    tokens = _corpus_tokens()
    if max_tokens is not None:
        if max_tokens <= 1:
            raise ValueError(f"max_tokens must be > 1, got {max_tokens}")
        tokens = tokens[:max_tokens]
    return tokens.clone()


def split_corpus(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous train/validation split: the last `val_fraction` of the tokens is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


# -----------------------------------------------------------------------------
# Batches


def batches(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int, num_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of the token stream: x (B, N) and y = x shifted by one (B, N), deterministic in `seed`.

    The generator is private to the iterator, so drawing batches never disturbs the global RNG that dropout uses.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"corpus of {len(tokens)} tokens is too short for seq_len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
        window = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])  # (B, N + 1)
        yield window[:, :-1].contiguous(), window[:, 1:].contiguous()
        produced += 1


def get_batch(
    tokens: torch.Tensor, *, batch_size: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch, the first that `batches` would yield for this seed."""
    return next(batches(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, num_batches=1))
