"""FlashAttention-2 in plain PyTorch: the tiled algorithm, with the online softmax, before any Triton.

What it saves: standard attention materialises S = Q K^T * scale and P = softmax(S), (B, H, Nq, Nk) each. The tiled
version visits S one (BLOCK_M, BLOCK_N) tile at a time and keeps only O (B, H, Nq, D) and the logsumexp L (B, H, Nq):
memory O(N) instead of O(N^2). In PyTorch the Python loops make it slow; the point is the algorithm, which the Triton
kernels (flash_fwd.py, flash_bwd.py) implement tile for tile.

Dao 2023, "FlashAttention-2", arXiv:2307.08691.

Algorithm 1 (forward), for each query tile Q_i and each key/value tile (K_j, V_j):

    S_ij = Q_i K_j^T * scale
    m_ij = max(m_i(j-1), rowmax(S_ij))
    P_ij = exp(S_ij - m_ij)
    l_ij = exp(m_i(j-1) - m_ij) * l_i(j-1) + rowsum(P_ij)
    O_ij = exp(m_i(j-1) - m_ij) * O_i(j-1) + P_ij V_j
    O_i = O_i(last) / l_i(last),   L_i = m_i(last) + log(l_i(last))

Algorithm 2 (backward), with D_i = rowsum(dO_i * O_i) (the "delta trick": rowsum(P * dP) = rowsum(dO * O)):

    P_ij  = exp(S_ij - L_i)                     recomputed from L, never stored
    dV_j += P_ij^T dO_i
    dP_ij = dO_i V_j^T
    dS_ij = P_ij * (dP_ij - D_i)
    dQ_i += dS_ij K_j * scale,    dK_j += dS_ij^T Q_i * scale

Usage:
    o, lse = flash_attention_torch(q, k, v, causal=True, block_m=16, block_n=16)
    dq, dk, dv = flash_attention_backward_torch(q, k, v, o, lse, do, causal=True)
"""

from __future__ import annotations

import math

import torch

# -----------------------------------------------------------------------------
# Plain PyTorch version: the O(N^2)-memory textbook attention, returning L too


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, sm_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v with the full (B, H, Nq, Nk) score matrix, and its row logsumexp.

    Args:
        q: (B, H, Nq, D); k, v: (B, H_kv, Nk, D) with H_kv dividing H.
        causal: query i sees key j iff j <= i + (Nk - Nq) (bottom-right aligned).
        sm_scale: default 1 / sqrt(D).

    Returns:
        o (B, H, Nq, D) and lse (B, H, Nq), in q's dtype. A row with no visible key gets o = 0 and lse = -inf.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, Nk, D): copies K/V, which the kernels avoid
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if causal:
        Nq, Nk = q.shape[-2], k.shape[-2]
        visible = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(diagonal=Nk - Nq)
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1)  # (B, H, Nq)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # empty rows: exp(-inf - -inf) = nan -> 0
    return probs @ v, lse


# -----------------------------------------------------------------------------
# Public entry points: the tiled forward and backward


def flash_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    block_m: int = 16,
    block_n: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward (Algorithm 1), tile by tile, with the online softmax.

    Args:
        q: (B, H, Nq, D); k, v: (B, H_kv, Nk, D), H_kv dividing H (GQA: query head h uses K/V head h // (H // H_kv)).
        causal: bottom-right aligned causal mask (see `naive_attention`).
        sm_scale: default 1 / sqrt(D).
        block_m, block_n: tile sizes (any positive ints; lengths need not be multiples of them).

    Returns:
        o: (B, H, Nq, D) in q's dtype; lse: (B, H, Nq) float32 (float64 for float64 inputs), -inf for empty rows.
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: flash_attention_torch is not implemented yet (lab07_flash_attention/flash_torch.py)")


def flash_attention_backward_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    block_m: int = 16,
    block_n: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention-2 backward (Algorithm 2): the K/V-outer loop, P recomputed from L, D = rowsum(dO * O).

    Args:
        q, k, v: as in `flash_attention_torch`; o (B, H, Nq, D) and lse (B, H, Nq) from it; do = dLoss/dO like o.
        causal, sm_scale, block_m, block_n: as in the forward.

    Returns:
        dq (B, H, Nq, D), dk and dv (B, H_kv, Nk, D), in the inputs' dtype. dK and dV of a K/V head sum the
        contributions of all query heads in its group.
    """
    # TODO (lab07): your code here
    raise NotImplementedError("lab07: flash_attention_backward_torch is not implemented yet (lab07_flash_attention/flash_torch.py)")
