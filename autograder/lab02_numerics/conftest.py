"""Fixtures shared by lab 02's tests. Nothing here imports the code under test: that happens inside each test, in the
forked process the plugin runs it in, so a broken submission cannot break collection."""

import pytest
import torch

from common.data import get_batch, load_corpus
from common.model import ModelConfig, Transformer


def _make_model(*, num_layers: int = 2, seed: int = 0, **overrides) -> Transformer:
    """A tiny fp32 model (~0.1 M parameters): a training step takes milliseconds on a CPU."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny", num_layers=num_layers, max_seq_len=32, **overrides))


def _make_batch(*, batch_size: int = 2, seq_len: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return get_batch(load_corpus(max_tokens=20_000), batch_size=batch_size, seq_len=seq_len, seed=seed)


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture
def make_batch():
    return _make_batch


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernel runs: compiled on a GPU when there is one, else the interpreter on CPU tensors."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
