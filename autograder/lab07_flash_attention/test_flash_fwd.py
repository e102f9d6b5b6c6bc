"""Lab 07, part 2: the Triton forward kernel (flash_fwd.py).

O and the logsumexp L against float64, causal and not, Nq != Nk, lengths that are not multiples of the tile, GQA and
MQA, several head dims and tile shapes, non-contiguous inputs. fp32 inputs (the interpreter's precision on CPU).
Producers run the kernel in the grading worker and return CPU tensors; what is expected is computed here.
"""

import pytest
import torch

from common.testing import check_close, describe, random_tensor

# Causal offsets Nk - Nq: every residue modulo the 16-row (and 16-key) steps, twice, once with a ragged Nq (45) and
# once with whole 32-row query tiles (64), and with the first key tile full; then rows that see no key at all (a whole
# query tile at -37 and -40). Where the unmasked range ends, and where the masked one does, only show at some of them.
SWEEP_OFFSETS = list(range(-16, 17)) + [-37, -40]

# -----------------------------------------------------------------------------
# Producers: run in the worker


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_forward(q, k, v, *, causal: bool, sm_scale: float | None = None, config: dict | None = None,
                   heads_last: bool = False) -> dict:
    """flash_attn_fwd on the worker's device. heads_last: q, k, v arrive as (B, N, H, D) and are transposed to
    (B, H, N, D) views there, as an attention layer produces them. config: KernelConfig(**config)."""
    from lab07_flash_attention.flash_fwd import KernelConfig, flash_attn_fwd

    q, k, v = (t.to(_device()) for t in (q, k, v))
    if heads_last:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    o, lse = flash_attn_fwd(q, k, v, causal=causal, sm_scale=sm_scale,
                            config=KernelConfig(**config) if config else None)
    return {"o": o.cpu(), "lse": lse.cpu(), "o_stride": list(o.stride()), "lse_dtype": str(lse.dtype),
            "q_contiguous": q.is_contiguous()}


def triton_forward_sweep(cases: list[dict], *, config: dict) -> list[dict]:
    """flash_attn_fwd (causal, KernelConfig(**config)) on many small cases in one call: [{"o", "lse"}]."""
    from lab07_flash_attention.flash_fwd import KernelConfig, flash_attn_fwd

    results = []
    for case in cases:
        o, lse = flash_attn_fwd(*(case[name].to(_device()) for name in "qkv"), causal=True,
                                config=KernelConfig(**config))
        results.append({"o": o.cpu(), "lse": lse.cpu()})
    return results


def forward_error(q_shape: list, k_shape: list, *, q_dtype: str = "float32", k_dtype: str = "float32",
                  q_device: str | None = None, k_device: str | None = None, v_shape: list | None = None) -> None:
    """flash_attn_fwd on inputs it must refuse."""
    from lab07_flash_attention.flash_fwd import flash_attn_fwd

    device = _device()
    q = torch.ones(*q_shape, dtype=getattr(torch, q_dtype), device=q_device or device)
    k = torch.ones(*k_shape, dtype=getattr(torch, k_dtype), device=k_device or device)
    v = torch.ones(*(v_shape or k_shape), dtype=getattr(torch, k_dtype), device=k_device or device)
    flash_attn_fwd(q, k, v)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_forward(student, q, k, v, causal, attention_float64, check_lse, *, config=None, sm_scale=None, what="",
                   atol=None, **options):
    got = student.run(triton_forward, q, k, v, causal=causal, sm_scale=sm_scale, config=config, **options)
    if options.get("heads_last"):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    o_ref, lse_ref = attention_float64(q, k, v, causal=causal, sm_scale=sm_scale)
    inputs = describe(q=q, k=k, v=v, causal=causal, config=config, sm_scale=sm_scale)
    check_close(got["o"], o_ref, name=f"flash_attn_fwd (O){what}", inputs=inputs, atol=atol)
    check_lse(got["lse"], lse_ref, name=f"flash_attn_fwd (L = logsumexp){what}", inputs=inputs)
    assert got["lse_dtype"] == "torch.float32", f"flash_attn_fwd returned L as {got['lse_dtype']}, not float32"
    return got


@pytest.mark.points(2)
def test_launcher_rejects_bad_shapes(student):
    """Refusals, each with the rule in its message: a tensor that is not 4-D, k and v of different shapes, a batch
    or head dim that differs between q and k, an empty sequence, a head dim the kernels do not take, mismatched or
    unsupported dtypes and devices, and (on CPU) half precision, which needs a GPU."""
    with pytest.raises(ValueError, match="power of two"):
        student.run(forward_error, [1, 2, 8, 48], [1, 2, 8, 48])
    with pytest.raises(TypeError, match="same dtype"):
        student.run(forward_error, [1, 2, 8, 16], [1, 2, 8, 16], q_dtype="float64")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        student.run(forward_error, [1, 2, 8, 16], [1, 2, 8, 16], q_dtype="int32", k_dtype="int32")
    with pytest.raises(ValueError, match="same device"):
        student.run(forward_error, [1, 2, 8, 16], [1, 2, 8, 16], q_device="meta")
    with pytest.raises(ValueError, match="4-D"):
        student.run(forward_error, [4, 8, 16], [1, 2, 8, 16])
    with pytest.raises(ValueError, match="4-D"):
        student.run(forward_error, [1, 4, 8, 16], [2, 8, 16])
    with pytest.raises(ValueError, match="same shape"):
        student.run(forward_error, [1, 4, 8, 16], [1, 2, 8, 16], v_shape=[1, 2, 9, 16])
    with pytest.raises(ValueError, match="match"):
        student.run(forward_error, [1, 4, 8, 16], [2, 2, 8, 16])
    with pytest.raises(ValueError, match="match"):
        student.run(forward_error, [1, 4, 8, 16], [1, 2, 8, 32])
    with pytest.raises(ValueError, match="empty"):
        student.run(forward_error, [1, 4, 0, 16], [1, 2, 8, 16])
    with pytest.raises(ValueError, match="empty"):
        student.run(forward_error, [1, 4, 8, 16], [1, 2, 0, 16])
    with pytest.raises(ValueError, match="divide"):
        student.run(forward_error, [1, 4, 8, 16], [1, 0, 8, 16])
    with pytest.raises(ValueError, match="not supported"):
        student.run(forward_error, [1, 4, 8, 16], [1, 2, 8, 16], q_device="meta", k_device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="CUDA"):
            student.run(forward_error, [1, 4, 8, 16], [1, 2, 8, 16], q_dtype="bfloat16", k_dtype="bfloat16")


@pytest.mark.points(6)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [16, 77, 160])
def test_forward_matches_float64(student, N, causal, make_qkv, attention_float64, check_lse):
    """Self-attention, Nq = Nk = N: one tile, a ragged last tile, and several full tiles before the diagonal."""
    q, k, v, _ = make_qkv(2, 2, 2, N, N, 16, seed=N)
    _check_forward(student, q, k, v, causal, attention_float64, check_lse)


@pytest.mark.points(3)
@pytest.mark.time_limit(120)
def test_forward_causal_offsets_sweep(student, make_qkv, attention_float64, check_lse):
    """Causal with Nk = Nq + offset for every offset above, Nq = 45 (ragged) or 64 (whole
    tiles), 32 x 16 tiles: the split into full, diagonal and skipped key tiles is exact at every alignment."""
    cases = []
    for offset in SWEEP_OFFSETS:
        Nq = 64 if offset % 2 else 45
        q, k, v, _ = make_qkv(1, 1, 1, Nq, Nq + offset, 16, seed=200 + offset)
        cases.append(dict(q=q, k=k, v=v))
    config = dict(block_m=32, block_n=16, num_warps=4, num_stages=1)
    got = student.run(triton_forward_sweep, cases, config=config)
    for case, result in zip(cases, got):
        q, k, v = case["q"], case["k"], case["v"]
        o_ref, lse_ref = attention_float64(q, k, v, causal=True)
        what = f" with Nq={q.shape[2]}, Nk={k.shape[2]}, 32 x 16 tiles"
        check_close(result["o"], o_ref, name=f"flash_attn_fwd (O){what}", inputs=describe(q=q, k=k, causal=True))
        check_lse(result["lse"], lse_ref, name=f"flash_attn_fwd (L){what}", inputs=describe(q=q, k=k, causal=True))


@pytest.mark.points(4)
@pytest.mark.parametrize("Nq,Nk", [(23, 61), (61, 23), (1, 45)])
def test_forward_nq_differs_from_nk(student, Nq, Nk, make_qkv, attention_float64, check_lse):
    """Causal with Nq != Nk: the mask is aligned bottom-right (query i sees keys j <= i + Nk - Nq). With Nq > Nk
    the first rows see no key at all: O = 0 and L = -inf there. Nq = 1 is a decoding step."""
    q, k, v, _ = make_qkv(1, 2, 1, Nq, Nk, 32, seed=Nq + Nk)
    _check_forward(student, q, k, v, True, attention_float64, check_lse, what=f" with Nq={Nq}, Nk={Nk}")
    _check_forward(student, q, k, v, False, attention_float64, check_lse, what=f" with Nq={Nq}, Nk={Nk}, not causal")


@pytest.mark.points(4)
@pytest.mark.parametrize("H,H_kv", [(4, 2), (3, 1)])
def test_forward_gqa_and_mqa(student, H, H_kv, make_qkv, attention_float64, check_lse):
    """Grouped-query (4 query heads on 2 K/V heads) and multi-query (3 on 1) attention, causal."""
    q, k, v, _ = make_qkv(2, H, H_kv, 41, 41, 16, seed=H)
    _check_forward(student, q, k, v, True, attention_float64, check_lse, what=f" (GQA {H}/{H_kv})")


@pytest.mark.points(3)
@pytest.mark.parametrize("D,block_m,block_n", [(16, 16, 32), (32, 32, 16), (64, 16, 16)])
def test_forward_head_dims_and_tiles(student, D, block_m, block_n, make_qkv, attention_float64, check_lse):
    """Head dims 16..64 and tiles with BLOCK_M != BLOCK_N (the diagonal spans several tiles), a custom scale."""
    q, k, v, _ = make_qkv(1, 2, 1, 50, 50, D, seed=D)
    config = dict(block_m=block_m, block_n=block_n, num_warps=4, num_stages=1)
    _check_forward(student, q, k, v, True, attention_float64, check_lse, config=config, sm_scale=0.3)


@pytest.mark.points(2)
def test_forward_non_contiguous_inputs(student, attention_float64, check_lse):
    """q, k, v made (B, N, H, D) and transposed to (B, H, N, D) views, as an attention layer produces them; O comes
    back contiguous."""
    q = random_tensor(2, 37, 4, 16, seed=11)
    k = random_tensor(2, 37, 2, 16, seed=12)
    v = random_tensor(2, 37, 2, 16, seed=13)
    got = _check_forward(student, q, k, v, True, attention_float64, check_lse, heads_last=True,
                         what=" (non-contiguous inputs)")
    assert got["q_contiguous"] is False, "the test meant to give flash_attn_fwd a non-contiguous q"
    assert got["o_stride"] == [4 * 37 * 16, 37 * 16, 16, 1], (
        f"flash_attn_fwd returned O with strides {got['o_stride']}; it must be contiguous (B, H, Nq, D)")


@pytest.mark.points(2)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_custom_scale_with_default_tiles(student, causal, make_qkv, attention_float64, check_lse):
    """sm_scale = 1.7 with the default tiles (on the fast, unmasked tiles too: a larger scale sharpens the softmax,
    so a scale applied twice or not at all shows), and a GQA group of 2."""
    q, k, v, _ = make_qkv(1, 4, 2, 70, 70, 16, seed=71)
    # a scale of 1.7 amplifies the fp32 rounding of the scores: a little more absolute slack on O
    _check_forward(student, q, k, v, causal, attention_float64, check_lse, sm_scale=1.7, what=" with sm_scale=1.7",
                   atol=1e-5)


@pytest.mark.points(2)
def test_forward_long_diagonal_band(student, make_qkv, attention_float64, check_lse):
    """Causal, Nq < Nk, tall query tiles (64) over short key tiles (16): several masked key tiles per query tile
    after the full ones, and the last key tile ragged (Nk = 101)."""
    q, k, v, _ = make_qkv(1, 1, 1, 70, 101, 16, seed=72)
    config = dict(block_m=64, block_n=16, num_warps=4, num_stages=1)
    _check_forward(student, q, k, v, True, attention_float64, check_lse, config=config, what=" (64 x 16 tiles)")


@pytest.mark.points(1)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_large_logits(student, causal, make_qkv, attention_float64, check_lse):
    """Scores in the hundreds (q scaled by 30): the running max must be the true max of the scaled scores, or exp
    overflows or underflows to nothing."""
    q, k, v, _ = make_qkv(1, 2, 1, 45, 45, 16, seed=73)
    _check_forward(student, q * 30.0, k, v, causal, attention_float64, check_lse, what=" (scores ~ +-300)",
                   atol=1e-5)
