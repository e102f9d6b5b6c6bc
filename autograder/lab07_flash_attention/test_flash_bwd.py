"""Lab 07, part 3: the Triton backward kernels (flash_bwd.py).

dQ, dK, dV against float64 autograd, given the float64 O and L (so only the backward is tested), causal and not,
GQA/MQA (dK, dV summed over a group's query heads), Nq != Nk, ragged lengths, a custom scale; and determinism.
Producers run the kernels in the grading worker and return CPU tensors; what is expected is computed here.
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


def _backward_config(config: dict | None):
    """BackwardConfig from plain data: {"dkdv": {...}, "dq": {...}, "deterministic": bool} (each key optional)."""
    if not config:
        return None
    from lab07_flash_attention.flash_bwd import BackwardConfig
    from lab07_flash_attention.flash_fwd import KernelConfig

    kernels = {name: KernelConfig(**config[name]) for name in ("dkdv", "dq") if name in config}
    return BackwardConfig(**kernels, deterministic=config.get("deterministic", True))


def triton_backward(q, k, v, o, lse, do, *, causal: bool, sm_scale: float | None = None, config: dict | None = None,
                    do_heads_last: bool = False, lse_heads_last: bool = False, repeat: int = 1) -> dict:
    """flash_attn_bwd on the worker's device, `repeat` times on the same inputs (every run's gradients returned).
    do_heads_last: dO arrives as (B, N, H, D) and is transposed to a (B, H, N, D) view there; lse_heads_last: L
    arrives as (B, N, H) and becomes a (B, H, N) view."""
    from lab07_flash_attention.flash_bwd import flash_attn_bwd

    q, k, v, o, lse, do = (t.to(_device()) for t in (q, k, v, o, lse, do))
    if do_heads_last:
        do = do.transpose(1, 2)
    if lse_heads_last:
        lse = lse.transpose(1, 2)
    runs = []
    for _ in range(repeat):
        dq, dk, dv = flash_attn_bwd(q, k, v, o, lse, do, causal=causal, sm_scale=sm_scale,
                                    config=_backward_config(config))
        runs.append({"dq": dq.cpu(), "dk": dk.cpu(), "dv": dv.cpu()})
    return {**runs[0], "runs": runs, "inputs_after": [t.cpu() for t in (q, k, v, o, lse, do)]}


def triton_backward_sweep(cases: list[dict], *, config: dict) -> list[dict]:
    """flash_attn_bwd (causal) on many small cases (q, k, v, o, lse, do each) in one call: [{"dq", "dk", "dv"}]."""
    from lab07_flash_attention.flash_bwd import flash_attn_bwd

    results = []
    for case in cases:
        tensors = [case[name].to(_device()) for name in ("q", "k", "v", "o", "lse", "do")]
        dq, dk, dv = flash_attn_bwd(*tensors, causal=True, config=_backward_config(config))
        results.append({"dq": dq.cpu(), "dk": dk.cpu(), "dv": dv.cpu()})
    return results


def backward_error(what: str) -> None:
    """flash_attn_bwd on O, L or dO that do not match q."""
    from lab07_flash_attention.flash_bwd import flash_attn_bwd

    device = _device()
    q = torch.ones(1, 2, 8, 16, device=device)
    k = torch.ones(1, 1, 8, 16, device=device)
    o, do = torch.ones_like(q), torch.ones_like(q)
    lse = torch.zeros(1, 2, 8, device=device)
    if what == "o":
        o = torch.ones(1, 2, 9, 16, device=device)
    elif what == "do":
        do = torch.ones(1, 2, 8, 16, device=device, dtype=torch.float64)
    elif what == "lse_shape":
        lse = torch.zeros(1, 2, 9, device=device)
    elif what == "lse_dtype":
        lse = torch.zeros(1, 2, 8, device=device, dtype=torch.float64)
    elif what == "q":
        q, k = torch.ones(1, 2, 8, 24, device=device), torch.ones(1, 1, 8, 24, device=device)
        o, do = torch.ones_like(q), torch.ones_like(q)
    flash_attn_bwd(q, k, k, o, lse, do)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_backward(student, q, k, v, do, causal, attention_float64, grads_float64, *, config=None, sm_scale=None,
                    what="", **options):
    o64, lse64 = attention_float64(q, k, v, causal=causal, sm_scale=sm_scale)
    lse = lse64.float().transpose(1, 2).contiguous() if options.get("lse_heads_last") else lse64.float()
    got = student.run(triton_backward, q, k, v, o64.to(q.dtype), lse, do, causal=causal, sm_scale=sm_scale,
                      config=config, **options)
    if options.get("do_heads_last"):
        do = do.transpose(1, 2)
    expected = grads_float64(q, k, v, do, causal=causal, sm_scale=sm_scale)
    inputs = describe(q=q, k=k, v=v, causal=causal, config=config, sm_scale=sm_scale)
    for name, e in zip(("dq", "dk", "dv"), expected):
        # each gradient entry sums up to N fp32 products: a little more absolute slack than one fp32 rounding
        check_close(got[name], e, name=f"flash_attn_bwd ({name}){what}", inputs=inputs, atol=1e-5)
    return got


@pytest.mark.points(1)
@pytest.mark.parametrize("what,error,match", [
    ("o", ValueError, "o "), ("do", ValueError, "do "), ("lse_shape", ValueError, "lse"),
    ("lse_dtype", ValueError, "lse"), ("q", ValueError, "power of two")])
def test_backward_rejects_mismatched_inputs(student, what, error, match):
    """O, dO that do not match q, L of the wrong shape or dtype, and q that the kernels cannot take: clear errors."""
    with pytest.raises(error, match=match):
        student.run(backward_error, what)


@pytest.mark.points(6)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("N", [16, 77, 130])
def test_backward_matches_float64(student, N, causal, make_qkv, attention_float64, grads_float64):
    """Self-attention gradients: one tile, ragged tiles, diagonal and full tiles."""
    q, k, v, do = make_qkv(1, 2, 2, N, N, 16, seed=N)
    _check_backward(student, q, k, v, do, causal, attention_float64, grads_float64)


@pytest.mark.points(3)
@pytest.mark.time_limit(120)
def test_backward_causal_offsets_sweep(student, make_qkv, attention_float64, grads_float64):
    """Causal with Nk = Nq + offset for every offset above, Nq = 45 (ragged) or 64 (whole
    tiles); dK/dV programs own 32 keys and step over 16 queries, dQ programs own 32 queries and step over 16 keys:
    the skipped, diagonal and full query ranges are exact at every alignment."""
    cases = []
    for offset in SWEEP_OFFSETS:
        Nq = 64 if offset % 2 else 45
        q, k, v, do = make_qkv(1, 1, 1, Nq, Nq + offset, 16, seed=300 + offset)
        o, lse = attention_float64(q, k, v, causal=True)
        cases.append(dict(q=q, k=k, v=v, o=o.float(), lse=lse.float(), do=do))
    config = dict(dkdv=dict(block_m=16, block_n=32), dq=dict(block_m=32, block_n=16))
    got = student.run(triton_backward_sweep, cases, config=config)
    for case, result in zip(cases, got):
        q, k, v, do = case["q"], case["k"], case["v"], case["do"]
        inputs = describe(q=q, k=k, causal=True, config=config)
        for name, e in zip(("dq", "dk", "dv"), grads_float64(q, k, v, do, causal=True)):
            check_close(result[name], e, name=f"flash_attn_bwd ({name}) with Nq={q.shape[2]}, Nk={k.shape[2]}",
                        inputs=inputs, atol=1e-5)


@pytest.mark.points(2)
def test_backward_atomic_dq_variant(student, make_qkv, attention_float64, grads_float64):
    """BackwardConfig(deterministic=False): dQ accumulated by atomics inside the dK/dV kernel, same gradients."""
    q, k, v, do = make_qkv(1, 4, 2, 57, 57, 16, seed=31)
    config = dict(dkdv=dict(block_m=16, block_n=32), deterministic=False)
    _check_backward(student, q, k, v, do, True, attention_float64, grads_float64, config=config, what=" (atomic dQ)")


@pytest.mark.points(4)
@pytest.mark.parametrize("H,H_kv", [(4, 2), (3, 1)])
def test_backward_gqa_sums_over_the_group(student, H, H_kv, make_qkv, attention_float64, grads_float64):
    """GQA/MQA: dK and dV of a K/V head are the sums over the query heads that share it."""
    q, k, v, do = make_qkv(2, H, H_kv, 45, 45, 16, seed=10 + H)
    _check_backward(student, q, k, v, do, True, attention_float64, grads_float64, what=f" (GQA {H}/{H_kv})")


@pytest.mark.points(4)
@pytest.mark.parametrize("Nq,Nk", [(29, 70), (70, 29)])
def test_backward_nq_differs_from_nk(student, Nq, Nk, make_qkv, attention_float64, grads_float64):
    """Causal with Nq != Nk (bottom-right), including rows that see no key (Nq > Nk): their gradient is 0."""
    q, k, v, do = make_qkv(1, 2, 1, Nq, Nk, 32, seed=Nq)
    config = dict(dkdv=dict(block_m=16, block_n=32), dq=dict(block_m=32, block_n=16))
    _check_backward(student, q, k, v, do, True, attention_float64, grads_float64, config=config,
                    what=f" with Nq={Nq}, Nk={Nk}")


@pytest.mark.points(2)
def test_backward_is_deterministic(student, make_qkv, attention_float64):
    """Two runs give bit-identical gradients (no atomics: dQ has its own kernel), and the inputs are left as given."""
    q, k, v, do = make_qkv(1, 4, 2, 64, 64, 16, seed=3)
    o64, lse64 = attention_float64(q, k, v, causal=True)
    o, lse = o64.float(), lse64.float()
    got = student.run(triton_backward, q, k, v, o, lse, do, causal=True, repeat=2)
    first, second = got["runs"]
    for name in ("dq", "dk", "dv"):
        assert torch.equal(first[name], second[name]), (
            f"flash_attn_bwd ({name}) differs between two runs on {describe(q=q, k=k)}")
    for name, before, after in zip(("q", "k", "v", "o", "lse", "do"), (q, k, v, o, lse, do), got["inputs_after"]):
        assert torch.equal(before, after), f"flash_attn_bwd modified its input {name}"


@pytest.mark.points(3)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_custom_scale(student, causal, make_qkv, attention_float64, grads_float64):
    """sm_scale = 0.3 (not 1/sqrt(D)): it enters P = exp(S * scale - L) and multiplies dQ and dK, not dV. GQA 4/2,
    Nq = 40 < Nk = 75, with the default tiles."""
    q, k, v, do = make_qkv(1, 4, 2, 40, 75, 32, seed=41)
    _check_backward(student, q, k, v, do, causal, attention_float64, grads_float64, sm_scale=0.3,
                    what=" with sm_scale=0.3")


@pytest.mark.points(2)
def test_backward_atomic_dq_custom_scale_not_causal(student, make_qkv, attention_float64, grads_float64):
    """The atomic-dQ variant with sm_scale = 1.5, not causal, MQA 3/1, batch 2, ragged Nq = 37 and Nk = 50: the atomic
    dQ is scaled like the dQ kernel's, and keys past Nk (the next batch's, in memory) add nothing to it."""
    q, k, v, do = make_qkv(2, 3, 1, 37, 50, 16, seed=42)
    config = dict(dkdv=dict(block_m=32, block_n=16), deterministic=False)
    _check_backward(student, q, k, v, do, False, attention_float64, grads_float64, config=config, sm_scale=1.5,
                    what=" (atomic dQ, sm_scale=1.5)")


@pytest.mark.points(2)
def test_backward_non_contiguous_do_and_other_tiles(student, make_qkv, attention_float64, grads_float64):
    """dO a transposed (B, N, H, D) view, as it comes back through a layer, and L a transposed (B, N, H) view too;
    dK/dV tiles of 16 x 64 and dQ tiles of 64 x 32, non-causal, Nq = 70, Nk = 90."""
    q, k, v, _ = make_qkv(1, 2, 1, 70, 90, 16, seed=43)
    do = random_tensor(1, 70, 2, 16, seed=44)  # (B, N, H, D), transposed in the worker
    config = dict(dkdv=dict(block_m=16, block_n=64), dq=dict(block_m=64, block_n=32))
    _check_backward(student, q, k, v, do, False, attention_float64, grads_float64, config=config, do_heads_last=True,
                    lse_heads_last=True, what=" (transposed dO and L)")
