"""Lab 07, part 4: the autograd.Function, the launcher checks, and FlashAttention inside real models (attention.py)."""

import copy

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(4)
@pytest.mark.parametrize("causal", [False, True])
def test_autograd_function_gradients(causal, make_qkv, attention_float64, grads_float64):
    """flash_attention is differentiable: O and torch.autograd's dQ, dK, dV match float64 (GQA 4/2, N = 53)."""
    from lab07_flash_attention.attention import flash_attention

    q, k, v, do = make_qkv(1, 4, 2, 53, 53, 16, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o = flash_attention(*leaves, causal=causal)
    o.backward(do)
    inputs = describe(q=q, k=k, v=v, causal=causal)
    check_close(o, attention_float64(q, k, v, causal=causal)[0], name="flash_attention (O)", inputs=inputs)
    for name, leaf, e in zip(("dQ", "dK", "dV"), leaves, grads_float64(q, k, v, do, causal=causal)):
        check_close(leaf.grad, e, name=f"flash_attention ({name} through autograd)", inputs=inputs, atol=1e-5)


@pytest.mark.points(2)
def test_saves_no_n_squared_tensor(make_qkv):
    """The Function saves q, k, v, O and L only: no (N, N) probabilities, unlike autograd through naive attention."""
    from common.measure import SavedTensorMeter
    from lab07_flash_attention.attention import flash_attention

    q, k, v, _ = make_qkv(1, 2, 2, 96, 96, 16, seed=8)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with SavedTensorMeter() as meter:
        flash_attention(q, k, v, causal=True)
    linear = 4 * q.numel() * q.element_size() + 2 * 96 * 4  # q, k, v, O + L (fp32)
    assert meter.total_bytes <= linear, (
        f"flash_attention saved {meter.total_bytes} bytes for backward on {describe(q=q)}; expected at most "
        f"{linear} (q, k, v, O and L). A (B, H, N, N) tensor is {2 * 96 * 96 * 4} bytes"
    )


@pytest.mark.points(3)
def test_plugs_into_the_kit_model(device):
    """Transformer.set_attention(flash_attention): same loss and gradients as SDPA in the kit's tiny model."""
    from common.data import get_batch, load_corpus
    from common.model import ModelConfig, Transformer
    from lab07_flash_attention.attention import flash_attention

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=48)).to(device)
    flash_model = copy.deepcopy(model)
    flash_model.set_attention(flash_attention)
    tokens, targets = (t.to(device) for t in get_batch(load_corpus(max_tokens=5_000), batch_size=2, seq_len=41,
                                                       seed=0))
    losses = []
    for m in (model, flash_model):
        loss = m.loss(tokens, targets)
        loss.backward()
        losses.append(loss.detach())
    inputs = describe(tokens=tokens)
    check_close(losses[1], losses[0], name="tiny Transformer loss with flash_attention", inputs=inputs, atol=1e-5)
    for (name, p), p_ref in zip(flash_model.named_parameters(), model.parameters()):
        check_close(p.grad, p_ref.grad, name=f"gradient of {name} with flash_attention", inputs=inputs,
                    rtol=1e-4, atol=1e-5)


@pytest.mark.points(5)
@pytest.mark.time_limit(120)
def test_hf_llama_trains_like_sdpa(device):
    """register_hf_attention(): a LlamaForCausalLM built from a LlamaConfig trains 3 AdamW steps with our kernels,
    and every loss matches the same model with attn_implementation="sdpa"."""
    from transformers import LlamaForCausalLM

    from lab07_flash_attention.attention import register_hf_attention, tiny_llama_config

    name = register_hf_attention()
    torch.manual_seed(0)
    reference = LlamaForCausalLM(tiny_llama_config()).to(device)
    reference.set_attn_implementation("sdpa")
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation(name)
    assert ours.config._attn_implementation == name
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(1)).to(device)
    curves = []
    for model in (reference, ours):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(3):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        curves.append(torch.stack(losses))
    check_close(curves[1], curves[0], name=f"HF Llama training losses with attn_implementation={name!r}",
                inputs=describe(tokens=tokens, steps=3), rtol=1e-4, atol=1e-5)


@pytest.mark.points(4)
def test_launcher_rejects_bad_input(device):
    """Clear errors: head dim not a supported power of two, mismatched dtypes or devices, K/V heads not dividing."""
    from lab07_flash_attention.flash_fwd import flash_attn_fwd

    def qkv(H=4, H_kv=2, D=16, dtype=torch.float32):
        return (torch.randn(1, H, 8, D, dtype=dtype, device=device),
                torch.randn(1, H_kv, 8, D, dtype=dtype, device=device),
                torch.randn(1, H_kv, 8, D, dtype=dtype, device=device))

    with pytest.raises(ValueError, match="power of two"):
        flash_attn_fwd(*qkv(D=24))
    with pytest.raises(ValueError, match="power of two"):
        flash_attn_fwd(*qkv(D=256))
    q, k, v = qkv()
    with pytest.raises(TypeError, match="same dtype"):
        flash_attn_fwd(q, k.double(), v)
    with pytest.raises(TypeError, match="dtype"):
        flash_attn_fwd(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="same device"):
        flash_attn_fwd(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="divide"):
        flash_attn_fwd(*qkv(H=4, H_kv=3))
