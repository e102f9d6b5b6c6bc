"""Fixtures shared by lab 07's tests. Nothing here imports the code under test: that happens inside each test, in the
forked process the plugin runs it in, so a broken submission cannot break collection.

The reference every kernel is checked against is `attention_float64` below: textbook attention in float64, with the
same conventions as the lab (GQA by head groups, causal mask aligned bottom-right, empty rows give O = 0, L = -inf).
On a machine with a GPU the kernels run compiled on it (fp32 inputs, full-precision dots); without one, through the
Triton interpreter, which is slow: the shapes stay tiny (N 16..160, odd lengths, D 16/32).
"""

import math

import pytest
import torch

from common.testing import random_tensor


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _attend(q, k, v, *, causal: bool, sm_scale: float | None):
    """Textbook attention on float64 tensors (differentiable): returns (O, L)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, Nk, D)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if causal:
        Nq, Nk = q.shape[-2], k.shape[-2]
        visible = torch.ones(Nq, Nk, dtype=torch.bool).tril(diagonal=Nk - Nq)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (B, H, Nq)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key: O = 0
    return probs @ v, lse


def _attention_float64(q, k, v, *, causal: bool, sm_scale: float | None = None):
    """(O, L) in float64, on CPU."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    return _attend(q, k, v, causal=causal, sm_scale=sm_scale)


def _grads_float64(q, k, v, do, *, causal: bool, sm_scale: float | None = None):
    """(dQ, dK, dV) in float64, on CPU, by autograd through the textbook attention."""
    leaves = [t.detach().to("cpu", torch.float64).requires_grad_(True) for t in (q, k, v)]
    o, _ = _attend(*leaves, causal=causal, sm_scale=sm_scale)
    o.backward(do.detach().to("cpu", torch.float64))
    return tuple(t.grad for t in leaves)


def _make_qkv(B, H, H_kv, Nq, Nk, D, *, seed: int, dtype=torch.float32, device: str | None = None):
    """Random q (B, H, Nq, D), k and v (B, H_kv, Nk, D), and an upstream gradient dO like q."""
    device = device or _device()
    q = random_tensor(B, H, Nq, D, dtype=dtype, seed=seed).to(device)
    k = random_tensor(B, H_kv, Nk, D, dtype=dtype, seed=seed + 1).to(device)
    v = random_tensor(B, H_kv, Nk, D, dtype=dtype, seed=seed + 2).to(device)
    do = random_tensor(B, H, Nq, D, dtype=dtype, seed=seed + 3).to(device)
    return q, k, v, do


@pytest.fixture
def device():
    return _device()


@pytest.fixture
def attention_float64():
    return _attention_float64


@pytest.fixture
def grads_float64():
    return _grads_float64


@pytest.fixture
def make_qkv():
    return _make_qkv
