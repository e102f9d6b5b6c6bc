"""Lab 07, part 4: the autograd.Function, the launcher checks, and FlashAttention inside real models (attention.py).

Producers run the student's code in the grading worker (kernels on the GPU when there is one, else in the Triton
interpreter) and return CPU tensors and numbers. What is expected is computed here: float64 attention, and the same
models (built from the same seeds) running torch's SDPA.
"""

import pytest
import torch

from common.testing import check_all_close, check_close, corpus_batch, describe, tiny_model

# A HF LlamaConfig small enough to train through the Triton interpreter (GQA: 4 query heads on 2 K/V heads). The
# producers build their models from these settings too, so both sides start from the same weights.
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0, tie_word_embeddings=False)
# Granite is a Llama whose attention scale is a config field (attention_multiplier), not head_dim ** -0.5
GRANITE = dict(LLAMA, attention_multiplier=0.4)
MODEL_LEN = 41  # tokens per row in the kit-model test: not a multiple of any tile

# -----------------------------------------------------------------------------
# Producers: run in the worker


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autograd_outputs(q, k, v, do, *, causal: bool, sm_scale: float | None = None, grad_of: str = "qkv") -> dict:
    """O of flash_attention and the gradients autograd computes through it (for the inputs named in grad_of)."""
    from lab07_flash_attention.attention import flash_attention

    leaves = [t.to(_device()).requires_grad_(name in grad_of) for name, t in zip("qkv", (q, k, v))]
    if sm_scale is None:
        o = flash_attention(*leaves, causal=causal)
    else:
        o = flash_attention(*leaves, causal=causal, sm_scale=sm_scale)
    o.backward(do.to(o.device))
    grads = {f"d{name}": leaf.grad.cpu() for name, leaf in zip("qkv", leaves) if leaf.grad is not None}
    return {"o": o.detach().cpu(), **grads, "o_requires_grad": o.requires_grad}


def saved_bytes(q, k, v) -> dict:
    """What flash_attention saves for backward (bytes), causal."""
    from common.measure import SavedTensorMeter
    from lab07_flash_attention.attention import flash_attention

    q, k, v = (t.to(_device()).requires_grad_(True) for t in (q, k, v))
    with SavedTensorMeter() as meter:
        flash_attention(q, k, v, causal=True)
    return {"saved": int(meter.total_bytes)}


def kit_model_loss_and_grads(seq_len: int) -> dict:
    """The kit's tiny model (fp32) with flash_attention in every block: the loss and every parameter's gradient."""
    from common.testing import gradients
    from lab07_flash_attention.attention import flash_attention

    model = tiny_model(num_layers=2, dtype=torch.float32, max_seq_len=48).to(_device())
    model.set_attention(flash_attention)
    tokens, targets = (t.to(_device()) for t in corpus_batch(batch_size=2, seq_len=seq_len))
    loss = model.loss(tokens, targets)
    loss.backward()
    return {"loss": loss.detach().cpu(), "grads": {name: g.cpu() for name, g in gradients(model).items()}}


def _hf_model(kind: str, settings: dict, seed: int):
    from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "granite":
        return GraniteForCausalLM(GraniteConfig(**settings))
    return LlamaForCausalLM(LlamaConfig(**settings))


def hf_training_losses(kind: str, settings: dict, *, steps: int, seed: int, tokens: torch.Tensor,
                       attn: str | None = None) -> dict:
    """A HF model from `settings` on register_hf_attention()'s implementation (or `attn`): its losses over `steps`
    AdamW steps, the first step's gradients, and the name the implementation was registered under."""
    name = attn
    if attn is None:
        from lab07_flash_attention.attention import register_hf_attention

        name = register_hf_attention()
    model = _hf_model(kind, settings, seed).to(_device())
    model.set_attn_implementation(name)
    tokens = tokens.to(_device())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, first_grads = [], {}
    for step in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()
                           if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().cpu())
    return {"losses": torch.stack(losses), "grads": first_grads, "name": name,
            "implementation": model.config._attn_implementation}


def hf_attention_call(q, k, v, *, scaling: float | None, is_causal: bool | None, module_causal: bool | None) -> dict:
    """hf_attention_forward called as a HF attention layer calls it, with or without an is_causal override."""
    from lab07_flash_attention.attention import hf_attention_forward

    module = torch.nn.Module()
    if module_causal is not None:
        module.is_causal = module_causal
    q, k, v = (t.to(_device()) for t in (q, k, v))
    out, weights = hf_attention_forward(module, q, k, v, None, dropout=0.0, scaling=scaling, is_causal=is_causal,
                                        position_ids=None)
    return {"out": out.cpu(), "weights_is_none": weights is None, "contiguous": out.is_contiguous()}


def hf_attention_with_dropout(dropout: float) -> None:
    from lab07_flash_attention.attention import hf_attention_forward

    q = torch.ones(1, 2, 8, 16, device=_device())
    hf_attention_forward(torch.nn.Module(), q, q, q, None, dropout=dropout)


def registration(names: list[str]) -> dict:
    """register_hf_attention() and register_hf_attention(name) for each of `names`: the name each returned, and
    whether HF's two registries (attention functions, mask builders) now hold it."""
    import transformers
    import transformers.masking_utils as masking

    from lab07_flash_attention.attention import register_hf_attention

    returned = [register_hf_attention()] + [register_hf_attention(name) for name in names]
    functions, masks = transformers.AttentionInterface._global_mapping, masking.AttentionMaskInterface._global_mapping
    return {"returned": returned, "attention": [r in functions for r in returned], "mask": [r in masks for r in returned]}


def launcher_error(q_shape: list, k_shape: list, *, q_dtype: str = "float32", k_dtype: str = "float32",
                   k_device: str | None = None) -> None:
    """flash_attn_fwd on inputs it must refuse."""
    from lab07_flash_attention.flash_fwd import flash_attn_fwd

    device = _device()
    q = torch.ones(*q_shape, dtype=getattr(torch, q_dtype), device=device)
    k = torch.ones(*k_shape, dtype=getattr(torch, k_dtype), device=k_device or device)
    flash_attn_fwd(q, k, k.clone())


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _check_autograd(got, q, k, v, do, causal, sm_scale, attention_float64, grads_float64, *, what: str):
    inputs = describe(q=q, k=k, v=v, causal=causal, sm_scale=sm_scale)
    check_close(got["o"], attention_float64(q, k, v, causal=causal, sm_scale=sm_scale)[0],
                name=f"flash_attention (O){what}", inputs=inputs)
    for name, e in zip(("dq", "dk", "dv"), grads_float64(q, k, v, do, causal=causal, sm_scale=sm_scale)):
        check_close(got[name], e, name=f"flash_attention ({name} through autograd){what}", inputs=inputs, atol=1e-5)


def _sdpa_training(kind: str, settings: dict, *, steps: int, seed: int, tokens: torch.Tensor) -> dict:
    """What the worker's run must give: the same producer code, run here on HF's own SDPA (no student code)."""
    return hf_training_losses(kind, settings, steps=steps, seed=seed, tokens=tokens, attn="sdpa")


@pytest.mark.points(2)
@pytest.mark.parametrize("is_causal,module_causal,causal", [(False, True, False), (None, False, False),
                                                            (None, True, True), (True, False, True)])
def test_hf_attention_forward_contract(student, is_causal, module_causal, causal, make_qkv, attention_float64):
    """hf_attention_forward as HF calls it: is_causal overrides module.is_causal; `scaling` is the softmax scale;
    the output is (B, N, H, D), contiguous, with no attention weights."""
    q, k, v, _ = make_qkv(2, 4, 2, 19, 19, 16, seed=19)
    got = student.run(hf_attention_call, q, k, v, scaling=0.25, is_causal=is_causal, module_causal=module_causal)
    want = attention_float64(q, k, v, causal=causal, sm_scale=0.25)[0].transpose(1, 2)  # (B, N, H, D)
    check_close(got["out"], want, name="hf_attention_forward (attn_output, (B, N, H, D))",
                inputs=describe(q=q, k=k, is_causal=is_causal, module_is_causal=module_causal, scaling=0.25))
    assert got["weights_is_none"], "hf_attention_forward must return (attn_output, None): no attention weights"
    assert got["contiguous"], "hf_attention_forward must return a contiguous attn_output (HF reshapes it)"


@pytest.mark.points(1)
def test_hf_attention_refuses_dropout(student):
    """The kernels have no dropout: a nonzero dropout is a ValueError, not silently ignored."""
    with pytest.raises(ValueError, match="dropout"):
        student.run(hf_attention_with_dropout, 0.1)


@pytest.mark.points(4)
def test_launcher_rejects_bad_input(student):
    """Clear errors: head dim not a supported power of two, mismatched dtypes or devices, K/V heads not dividing."""
    with pytest.raises(ValueError, match="power of two"):
        student.run(launcher_error, [1, 4, 8, 24], [1, 2, 8, 24])
    with pytest.raises(ValueError, match="power of two"):
        student.run(launcher_error, [1, 4, 8, 256], [1, 2, 8, 256])
    with pytest.raises(TypeError, match="same dtype"):
        student.run(launcher_error, [1, 4, 8, 16], [1, 2, 8, 16], k_dtype="float64")
    with pytest.raises(TypeError, match="dtype"):
        student.run(launcher_error, [1, 4, 8, 16], [1, 2, 8, 16], q_dtype="float64", k_dtype="float64")
    with pytest.raises(ValueError, match="same device"):
        student.run(launcher_error, [1, 4, 8, 16], [1, 2, 8, 16], k_device="meta")
    with pytest.raises(ValueError, match="divide"):
        student.run(launcher_error, [1, 4, 8, 16], [1, 3, 8, 16])


@pytest.mark.points(4)
@pytest.mark.parametrize("causal", [False, True])
def test_autograd_function_gradients(student, causal, make_qkv, attention_float64, grads_float64):
    """flash_attention is differentiable: O and torch.autograd's dQ, dK, dV match float64 (GQA 4/2, N = 53)."""
    q, k, v, do = make_qkv(1, 4, 2, 53, 53, 16, seed=7)
    got = student.run(autograd_outputs, q, k, v, do, causal=causal)
    _check_autograd(got, q, k, v, do, causal, None, attention_float64, grads_float64, what="")


@pytest.mark.points(3)
@pytest.mark.parametrize("causal", [False, True])
def test_autograd_function_custom_scale(student, causal, make_qkv, attention_float64, grads_float64):
    """flash_attention(..., sm_scale=0.3): the Function hands the scale to the forward and to the backward kernels
    (Nq = 29 < Nk = 60, GQA 2/1, D = 32)."""
    q, k, v, do = make_qkv(1, 2, 1, 29, 60, 32, seed=17)
    got = student.run(autograd_outputs, q, k, v, do, causal=causal, sm_scale=0.3)
    _check_autograd(got, q, k, v, do, causal, 0.3, attention_float64, grads_float64, what=" with sm_scale=0.3")


@pytest.mark.points(2)
def test_register_hf_attention_returns_the_name(student):
    """register_hf_attention() registers under "lab07_triton" by default (or the name given) with HF's attention and
    mask interfaces, and returns the name."""
    got = student.run(registration, ["lab07_other_name"])
    for index, (name, expected) in enumerate(((None, "lab07_triton"), ("lab07_other_name", "lab07_other_name"))):
        returned, call = got["returned"][index], f"register_hf_attention({'' if name is None else repr(name)})"
        assert returned == expected, f"{call} returned {returned!r}, not {expected!r}"
        assert got["attention"][index] and got["mask"][index], (
            f"{call}: registered with AttentionInterface: {got['attention'][index]}, "
            f"with AttentionMaskInterface: {got['mask'][index]} (both are needed)")


@pytest.mark.points(1)
def test_autograd_function_gradient_of_some_inputs(student, make_qkv, grads_float64):
    """Only k needs a gradient: backward still works, and dK is right (q and v get none)."""
    q, k, v, do = make_qkv(1, 2, 2, 33, 33, 16, seed=18)
    got = student.run(autograd_outputs, q, k, v, do, causal=True, grad_of="k")
    assert "dq" not in got and "dv" not in got, "flash_attention gave a gradient to an input that needs none"
    check_close(got["dk"], grads_float64(q, k, v, do, causal=True)[1], name="flash_attention (dK alone)",
                inputs=describe(q=q, k=k, v=v), atol=1e-5)


@pytest.mark.points(2)
def test_saves_no_n_squared_tensor(student, make_qkv):
    """The Function saves q, k, v, O and L only: no (N, N) probabilities, unlike autograd through naive attention."""
    q, k, v, _ = make_qkv(1, 2, 2, 96, 96, 16, seed=8)
    got = student.run(saved_bytes, q, k, v)
    linear = 4 * q.numel() * q.element_size() + 2 * 96 * 4  # q, k, v, O + L (fp32)
    assert got["saved"] <= linear, (
        f"flash_attention saved {got['saved']} bytes for backward on {describe(q=q)}; expected at most "
        f"{linear} (q, k, v, O and L). A (B, H, N, N) tensor is {2 * 96 * 96 * 4} bytes"
    )


@pytest.mark.points(3)
def test_plugs_into_the_kit_model(student):
    """Transformer.set_attention(flash_attention): same loss and gradients as SDPA in the kit's tiny model."""
    got = student.run(kit_model_loss_and_grads, MODEL_LEN)
    # the same model (same seed), in float64 on SDPA: fp32 kernels land within fp32 rounding of it
    model = tiny_model(num_layers=2, dtype=torch.float64, max_seq_len=48)
    tokens, targets = corpus_batch(batch_size=2, seq_len=MODEL_LEN)
    loss = model.loss(tokens, targets)
    loss.backward()
    inputs = describe(tokens=tokens)
    check_close(got["loss"], loss.detach(), name="tiny Transformer loss with flash_attention", inputs=inputs,
                atol=1e-5)
    want = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    check_all_close(got["grads"], want, name="tiny Transformer gradients with flash_attention", inputs=inputs,
                    rtol=1e-4, atol=1e-5)


@pytest.mark.points(5)
@pytest.mark.time_limit(120)
def test_hf_llama_trains_like_sdpa(student):
    """register_hf_attention(): a LlamaForCausalLM built from a LlamaConfig trains 3 AdamW steps with our kernels,
    and every loss matches the same model with attn_implementation="sdpa"."""
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1))
    got = student.run(hf_training_losses, "llama", LLAMA, steps=3, seed=0, tokens=tokens)
    assert got["implementation"] == got["name"], (
        f"after set_attn_implementation({got['name']!r}) the model runs {got['implementation']!r}")
    want = _sdpa_training("llama", LLAMA, steps=3, seed=0, tokens=tokens)
    check_close(got["losses"], want["losses"], name=f"HF Llama training losses with attn_implementation="
                f"{got['name']!r}", inputs=describe(tokens=tokens, steps=3), rtol=1e-4, atol=1e-5)


@pytest.mark.points(3)
@pytest.mark.time_limit(120)
def test_hf_model_with_its_own_attention_scale(student):
    """A HF Granite model (a Llama whose attention scale is config.attention_multiplier = 0.4, not head_dim ** -0.5):
    HF passes `scaling`, and our attention must use it. Losses over 2 steps and the first gradients match SDPA."""
    tokens = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(2))
    got = student.run(hf_training_losses, "granite", GRANITE, steps=2, seed=5, tokens=tokens)
    want = _sdpa_training("granite", GRANITE, steps=2, seed=5, tokens=tokens)
    inputs = describe(tokens=tokens, attention_multiplier=0.4)
    check_close(got["losses"], want["losses"], name="HF Granite training losses with our attention", inputs=inputs,
                rtol=1e-4, atol=1e-5)
    check_all_close(got["grads"], want["grads"], name="HF Granite gradients with our attention", inputs=inputs,
                    rtol=1e-3, atol=1e-5)
