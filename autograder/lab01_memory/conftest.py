"""Fixtures shared by lab 01's tests. Nothing here imports the code under test: that happens inside each test, in the
forked process the plugin runs it in, so a broken submission cannot break collection."""

import pytest
import torch

from common.data import get_batch, load_corpus
from common.model import ModelConfig, Transformer


def _make_model(*, num_layers: int = 4, dropout: float = 0.0, seed: int = 0) -> Transformer:
    """A float64 tiny model: gradient comparisons in fp64 leave no room for rounding to hide a bug."""
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny", num_layers=num_layers, dropout=dropout, max_seq_len=32)
    return Transformer(config).double()


def _make_batch(*, batch_size: int = 3, seq_len: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return get_batch(load_corpus(max_tokens=20_000), batch_size=batch_size, seq_len=seq_len, seed=seed)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def make_model():
    return _make_model


@pytest.fixture
def make_batch():
    return _make_batch


@pytest.fixture
def grads():
    return _grads
