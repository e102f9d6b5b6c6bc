"""Lab 08, part 3: paged attention (paged_attention.py): the plain gather version, prefill through SDPA, and the
Triton decode kernel (GQA-aware, ragged lengths, split-K), all against float64 attention computed here.

Inputs are rebuilt from seeds on both sides (serving_cases.paged_inputs): random block tables whose unused entries
point at real blocks, ragged context lengths (1, exact multiples of the block size, odd ones), GQA, MQA and MHA. On a
CPU the kernel runs in the Triton interpreter, so the shapes stay tiny.
"""

import pytest
import torch

from common.testing import check_close, describe


def _cases():
    """serving_cases, under its name here (the grader) or in the worker."""
    try:
        import serving_cases
    except ImportError:
        from autograder.lab08_serving import serving_cases
    return serving_cases


# -----------------------------------------------------------------------------
# Producers: run in the worker


def gathered(case: dict, index: int) -> torch.Tensor:
    from lab08_serving.paged_attention import gather_kv

    _, k, _, tables, lens = _cases().paged_inputs(**case)
    return gather_kv(k, tables[index], int(lens[index]))


def decode_torch(case: dict, sm_scale=None) -> torch.Tensor:
    from lab08_serving.paged_attention import paged_attention_torch

    with _cases().one_thread():
        return paged_attention_torch(*_cases().paged_inputs(**case), sm_scale=sm_scale)


def decode_triton(case: dict, *, num_splits: int = 1, block_n: int | None = None, sm_scale=None,
                  strided_q: bool = False) -> torch.Tensor:
    from lab08_serving.paged_attention import DecodeConfig, paged_decode_attention

    q, k, v, tables, lens = _cases().paged_inputs(**case)
    if torch.cuda.is_available():
        q, k, v, tables, lens = (t.cuda() for t in (q, k, v, tables, lens))
    if strided_q:
        q = torch.cat([q, torch.ones_like(q)], dim=-1)[..., :q.shape[-1]]  # a view with stride(1) = 2 D
    config = DecodeConfig(block_n=block_n, num_warps=1, num_stages=1) if block_n else None
    return paged_decode_attention(q, k, v, tables, lens, num_splits=num_splits, sm_scale=sm_scale,
                                  config=config).cpu()


def prefill(seed: int, N: int, M: int, H: int, H_kv: int, D: int, sm_scale=None) -> torch.Tensor:
    from lab08_serving.paged_attention import prefill_attention

    generator = torch.Generator().manual_seed(seed)
    shapes = ((N, H), (M, H_kv), (M, H_kv))
    q, k, v = (torch.randn(n, h, D, generator=generator, dtype=torch.float64) for n, h in shapes)
    return prefill_attention(q, k, v, sm_scale=sm_scale)


# -----------------------------------------------------------------------------
# The grader's reference


def _expected(case: dict, sm_scale=None) -> torch.Tensor:
    """float64 attention of each sequence's query over the K/V its block table lists, token by token."""
    q, k, v, tables, lens = (t.double() if t.is_floating_point() else t for t in _cases().paged_inputs(**case))
    B, H, D = q.shape
    group = H // k.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        rows = [(int(tables[b, j // k.shape[1]]), j % k.shape[1]) for j in range(int(lens[b]))]
        keys = torch.stack([k[blk, slot] for blk, slot in rows])  # (n, H_kv, D)
        values = torch.stack([v[blk, slot] for blk, slot in rows])
        for h in range(H):
            weights = torch.softmax(keys[:, h // group] @ q[b, h] * scale, dim=0)
            out[b, h] = weights @ values[:, h // group]
    return out


def _check(got, case, what, sm_scale=None, **extra):
    check_close(got, _expected(case, sm_scale), name=what, inputs=describe(**case, sm_scale=sm_scale, **extra),
                dtype=torch.float32 if got.dtype == torch.float32 else None)


GQA = dict(B=3, H=4, H_kv=2, D=16, block_size=4, lens=[1, 16, 37], seed=0)
MQA = dict(B=2, H=3, H_kv=1, D=32, block_size=5, lens=[9, 23], seed=1)
MHA = dict(B=3, H=2, H_kv=2, D=16, block_size=16, lens=[33, 7, 16], seed=2)

# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(2)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_gather_kv_reads_through_the_block_table(student, index):
    """The first n tokens of a sequence, in order: token j from block table[j // bs], slot j % bs."""
    case = dict(GQA, shared_prefix_blocks=2, dtype=torch.float64)
    got = student.run(gathered, case, index)
    _, k, _, tables, lens = _cases().paged_inputs(**case)
    bs = k.shape[1]
    expected = torch.stack([k[int(tables[index, j // bs]), j % bs] for j in range(int(lens[index]))])
    check_close(got, expected, name=f"gather_kv (sequence {index})", inputs=describe(**case))


@pytest.mark.points(3)
@pytest.mark.parametrize("case", [GQA, MQA, MHA, dict(GQA, shared_prefix_blocks=3, seed=5)])
def test_torch_paged_attention_matches_float64(student, case):
    """The plain version: GQA 4/2, MQA 3/1, MHA, ragged lengths (1, a full block, odd), sequences sharing blocks."""
    case = dict(case, dtype=torch.float64)
    _check(student.run(decode_torch, case), case, "paged_attention_torch")


@pytest.mark.points(1)
def test_torch_paged_attention_uses_the_scale(student):
    case = dict(MQA, dtype=torch.float64)
    _check(student.run(decode_torch, case, sm_scale=0.37), case, "paged_attention_torch (sm_scale=0.37)", 0.37)


@pytest.mark.points(3)
@pytest.mark.parametrize("N, M, H, H_kv", [(9, 9, 4, 2), (5, 12, 4, 2), (1, 7, 3, 1), (6, 6, 2, 2)])
def test_prefill_attention_is_causal_aligned_to_the_end(student, N, M, H, H_kv):
    """Query i of the last N tokens sees keys j <= i + M - N: a fresh prompt (N = M), a prompt after a cached
    prefix (N < M), one new token (N = 1), GQA and MQA."""
    got = student.run(prefill, 7 + N, N, M, H, H_kv, 16, sm_scale=0.3 if N == 6 else None)
    generator = torch.Generator().manual_seed(7 + N)
    shapes = ((N, H), (M, H_kv), (M, H_kv))
    q, k, v = (torch.randn(n, h, 16, generator=generator, dtype=torch.float64) for n, h in shapes)
    scale = 0.3 if N == 6 else 0.25
    expected = torch.zeros(N, H, 16, dtype=torch.float64)
    for i in range(N):
        visible = i + M - N + 1
        for h in range(H):
            weights = torch.softmax(k[:visible, h * H_kv // H] @ q[i, h] * scale, dim=0)
            expected[i, h] = weights @ v[:visible, h * H_kv // H]
    check_close(got, expected, name="prefill_attention", inputs=describe(N=N, M=M, H=H, H_kv=H_kv))


@pytest.mark.points(4)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("case", [GQA, MQA, MHA])
def test_triton_decode_matches_float64(student, case):
    """The Triton kernel, one split: GQA (each K/V tile serves 2 query heads), MQA (3 heads padded to the 16-row
    tile), MHA with a block as large as the tile; ragged lengths in one batch."""
    _check(student.run(decode_triton, case), case, "paged_decode_attention")


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("block_size, block_n", [(5, 32), (32, 16), (3, 16)])
def test_triton_decode_any_block_size_and_tile(student, block_size, block_n):
    """Cache blocks smaller than, larger than, and not dividing the kernel's tile."""
    case = dict(B=2, H=4, H_kv=2, D=16, block_size=block_size, lens=[29, 40], seed=block_size)
    _check(student.run(decode_triton, case, block_n=block_n), case, f"paged_decode_attention (block_n={block_n})")


@pytest.mark.points(4)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_triton_split_k_merges_with_logsumexp(student, num_splits):
    """Split-K over the context: partial outputs merged with their logsumexp weights. With 7 splits, the 1-token
    and 20-token sequences leave most splits empty (weight 0)."""
    case = dict(B=3, H=4, H_kv=2, D=16, block_size=4, lens=[1, 20, 45], seed=10 + num_splits, shared_prefix_blocks=1)
    _check(student.run(decode_triton, case, num_splits=num_splits), case, f"paged_decode_attention (num_splits="
                                                                          f"{num_splits})")


@pytest.mark.points(1)
@pytest.mark.time_limit(120)
def test_triton_decode_scale_and_strided_query(student):
    """A custom softmax scale and a query that is a strided view."""
    case = dict(GQA, seed=21)
    _check(student.run(decode_triton, case, sm_scale=0.5, strided_q=True, num_splits=2), case,
           "paged_decode_attention (sm_scale=0.5, strided q, 2 splits)", 0.5)


@pytest.mark.points(1)
@pytest.mark.time_limit(120)
def test_triton_split_k_with_scores_beyond_exp_range(student):
    """Scores of ~100 (sm_scale=40): 2^score overflows fp32, so the online softmax and the merge must subtract their
    maxima; the weights are nearly one-hot."""
    case = dict(B=2, H=4, H_kv=2, D=16, block_size=4, lens=[23, 38], seed=22)
    # scores near 100 carry fp32 rounding of ~1e-5 relative into the weights: a looser tolerance than plain fp32
    check_close(student.run(decode_triton, case, sm_scale=40.0, num_splits=3), _expected(case, 40.0),
                name="paged_decode_attention (sm_scale=40, 3 splits)", inputs=describe(**case), rtol=1e-3, atol=1e-3)
