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
    # BEGIN SOLUTION
    B, H, Nq, D = q.shape
    H_kv, Nk = k.shape[1], k.shape[2]
    if H % H_kv:
        raise ValueError(f"the number of K/V heads ({H_kv}) must divide the number of query heads ({H})")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # accumulate in at least fp32
    # view the query heads as (H_kv, group): each group attends to one K/V head, so nothing is copied
    qg = q.reshape(B, H_kv, H // H_kv, Nq, D).to(acc_dtype)  # (B, H_kv, G, Nq, D)
    kf, vf = k.to(acc_dtype).unsqueeze(2), v.to(acc_dtype).unsqueeze(2)  # (B, H_kv, 1, Nk, D)
    o = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:-1], dtype=acc_dtype, device=q.device)  # (B, H_kv, G, Nq)
    for start_m in range(0, Nq, block_m):
        rows = torch.arange(start_m, min(start_m + block_m, Nq), device=q.device)
        q_i = qg[..., rows, :]  # (B, H_kv, G, bm, D)
        m_i = torch.full(q_i.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros_like(q_i)
        for start_n in range(0, Nk, block_n):
            cols = torch.arange(start_n, min(start_n + block_n, Nk), device=q.device)
            if causal and cols[0] > rows[-1] + (Nk - Nq):
                break  # this tile, and every later one, is above the diagonal for all rows: skip
            s = q_i @ kf[..., cols, :].transpose(-2, -1) * scale  # (B, H_kv, G, bm, bn)
            if causal:
                s = s.masked_fill(cols[None, :] > rows[:, None] + (Nk - Nq), float("-inf"))
            m_new = torch.maximum(m_i, s.amax(dim=-1))
            m_sub = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with no key yet: avoid inf - inf
            p = torch.exp(s - m_sub[..., None])
            alpha = torch.exp(m_i - m_sub)
            l_i = alpha * l_i + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ vf[..., cols, :]
            m_i = m_new
        empty = l_i == 0
        o[..., rows, :] = acc / l_i.masked_fill(empty, 1.0)[..., None]
        lse[..., rows] = (m_i + torch.log(l_i.masked_fill(empty, 1.0))).masked_fill(empty, float("-inf"))
    return o.reshape(B, H, Nq, D).to(q.dtype), lse.reshape(B, H, Nq)
    # END SOLUTION


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
    # BEGIN SOLUTION
    B, H, Nq, D = q.shape
    H_kv, Nk = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(B, H_kv, G, Nq, D).to(acc_dtype)
    dog = do.reshape(B, H_kv, G, Nq, D).to(acc_dtype)
    kf, vf = k.to(acc_dtype).unsqueeze(2), v.to(acc_dtype).unsqueeze(2)  # (B, H_kv, 1, Nk, D)
    # empty rows (L = -inf) have P = 0: use +inf so that exp(S - L) = 0 rather than nan
    lse_g = lse.reshape(B, H_kv, G, Nq).to(acc_dtype)
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), float("inf"))
    delta = (dog * o.reshape(B, H_kv, G, Nq, D).to(acc_dtype)).sum(dim=-1)  # D_i = rowsum(dO * O), (B, H_kv, G, Nq)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(B, H_kv, Nk, D, dtype=acc_dtype, device=q.device)
    dv = torch.zeros_like(dk)
    for start_n in range(0, Nk, block_n):  # outer loop over K/V tiles: dK_j, dV_j stay local
        cols = torch.arange(start_n, min(start_n + block_n, Nk), device=q.device)
        k_j, v_j = kf[..., cols, :], vf[..., cols, :]
        dk_j = torch.zeros(B, H_kv, G, len(cols), D, dtype=acc_dtype, device=q.device)
        dv_j = torch.zeros_like(dk_j)
        for start_m in range(0, Nq, block_m):
            rows = torch.arange(start_m, min(start_m + block_m, Nq), device=q.device)
            if causal and rows[-1] + (Nk - Nq) < cols[0]:
                continue  # no row of this tile sees any key of the K/V tile
            s = qg[..., rows, :] @ k_j.transpose(-2, -1) * scale  # (B, H_kv, G, bm, bn)
            p = torch.exp(s - lse_g[..., rows, None])
            if causal:
                p = p.masked_fill(cols[None, :] > rows[:, None] + (Nk - Nq), 0.0)
            dv_j += p.transpose(-2, -1) @ dog[..., rows, :]
            dp = dog[..., rows, :] @ v_j.transpose(-2, -1)
            ds = p * (dp - delta[..., rows, None])
            dq[..., rows, :] += ds @ k_j * scale
            dk_j += ds.transpose(-2, -1) @ qg[..., rows, :] * scale
        # GQA: the G query heads of a group all used this K/V head, so their gradients add up
        dk[..., cols, :] = dk_j.sum(dim=2)
        dv[..., cols, :] = dv_j.sum(dim=2)
    return dq.reshape(B, H, Nq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    # END SOLUTION
