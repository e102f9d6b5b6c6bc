"""Lab 07 hidden tests (attention.py): generation with a KV cache, and the padding-mask refusal."""

import copy

import pytest
import torch


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_hf_greedy_generation_matches_sdpa(device):
    """Greedy decoding with HF's KV cache (Nq = 1 against Nk keys: bottom-right causal) picks the SDPA tokens."""
    from transformers import LlamaForCausalLM

    from lab07_flash_attention.attention import register_hf_attention, tiny_llama_config

    name = register_hf_attention()
    torch.manual_seed(3)
    reference = LlamaForCausalLM(tiny_llama_config()).to(device).eval()
    reference.set_attn_implementation("sdpa")
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation(name)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        want = reference.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = ours.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want), f"greedy tokens with {name}: {got.tolist()} vs sdpa {want.tolist()}"


@pytest.mark.points(1)
def test_hf_attention_refuses_a_padding_mask():
    from lab07_flash_attention.attention import hf_attention_forward

    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="attention_mask"):
        hf_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 8, dtype=torch.bool))
