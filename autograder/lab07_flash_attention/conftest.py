"""What lab 07's tests expect, computed in the grader: textbook attention in float64, and its gradients by autograd.

Nothing here runs the code under test: the tests make the inputs here (CPU, seeded), hand them to producers that run
the student's kernels in the grading worker (on the GPU when there is one, else through the Triton interpreter), and
compare what comes back with `attention_float64` / `grads_float64`.

Conventions, the lab's: GQA by head groups (query head h reads K/V head h // (H / H_kv)), the causal mask aligned
bottom-right (query i sees keys j <= i + Nk - Nq), and a row that sees no key gets O = 0 and L = -inf. The
interpreter is slow, so the shapes stay tiny (N 16..160, odd lengths, D 16..64).
"""

import math

import pytest
import torch

from common.testing import random_tensor


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


def attention_float64(q, k, v, *, causal: bool, sm_scale: float | None = None):
    """(O, L) in float64, on CPU."""
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (q, k, v))
    return _attend(q, k, v, causal=causal, sm_scale=sm_scale)


def grads_float64(q, k, v, do, *, causal: bool, sm_scale: float | None = None):
    """(dQ, dK, dV) in float64, on CPU, by autograd through the textbook attention."""
    leaves = [t.detach().to("cpu", torch.float64).requires_grad_(True) for t in (q, k, v)]
    o, _ = _attend(*leaves, causal=causal, sm_scale=sm_scale)
    o.backward(do.detach().to("cpu", torch.float64))
    return tuple(t.grad for t in leaves)


def make_qkv(B, H, H_kv, Nq, Nk, D, *, seed: int, dtype=torch.float32):
    """Random CPU q (B, H, Nq, D), k and v (B, H_kv, Nk, D), and an upstream gradient dO like q."""
    q = random_tensor(B, H, Nq, D, dtype=dtype, seed=seed)
    k = random_tensor(B, H_kv, Nk, D, dtype=dtype, seed=seed + 1)
    v = random_tensor(B, H_kv, Nk, D, dtype=dtype, seed=seed + 2)
    do = random_tensor(B, H, Nq, D, dtype=dtype, seed=seed + 3)
    return q, k, v, do


def check_lse(got, want, *, name: str, inputs: str) -> None:
    """L against the float64 logsumexp: -inf exactly where a row sees no key, close elsewhere (check_close alone
    would accept any value where -inf is expected, since inf - inf is nan)."""
    from common.testing import check_close

    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise AssertionError(f"{name} on input {inputs}: got {getattr(got, 'shape', type(got).__name__)}, "
                             f"expected shape {tuple(want.shape)}")
    empty = torch.isneginf(want)
    wrong = (torch.isneginf(got) != empty).nonzero()
    if len(wrong):
        index = wrong[0].tolist()
        raise AssertionError(f"{name} on input {inputs}: at index {index} got {got[tuple(index)].item():.6g}, "
                             f"expected {want[tuple(index)].item():.6g} (-inf exactly for a row that sees no key)")
    check_close(got.masked_fill(empty, 0.0), want.masked_fill(empty, 0.0), name=name, inputs=inputs)


@pytest.fixture(name="check_lse")
def _check_lse_fixture():
    return check_lse


@pytest.fixture(name="attention_float64")
def _attention_float64_fixture():
    return attention_float64


@pytest.fixture(name="grads_float64")
def _grads_float64_fixture():
    return grads_float64


@pytest.fixture(name="make_qkv")
def _make_qkv_fixture():
    return make_qkv
