"""Lab 07 hidden tests (attention.py): generation with a KV cache, the padding-mask refusal, and a second check of
the custom scale through autograd."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_hf_greedy_generation_matches_sdpa(student):
    """Greedy decoding with HF's KV cache (Nq = 1 against Nk keys: bottom-right causal) picks the SDPA tokens."""
    from autograder.lab07_flash_attention.hidden.producers import hf_greedy_tokens
    from autograder.lab07_flash_attention.test_attention import LLAMA

    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    got = student.run(hf_greedy_tokens, LLAMA, seed=3, prompt=prompt, new_tokens=5)
    want = hf_greedy_tokens(LLAMA, seed=3, prompt=prompt, new_tokens=5, attn="sdpa")
    assert torch.equal(got, want), f"greedy tokens with our attention: {got.tolist()} vs sdpa {want.tolist()}"


@pytest.mark.points(1)
def test_hf_attention_refuses_a_padding_mask(student):
    from autograder.lab07_flash_attention.hidden.producers import hf_attention_with_padding_mask

    with pytest.raises(ValueError, match="attention_mask"):
        student.run(hf_attention_with_padding_mask)


@pytest.mark.points(1)
def test_autograd_custom_scale_mqa_ragged(student, make_qkv, attention_float64, grads_float64):
    """flash_attention with sm_scale = 2.0 (large: a scale applied twice or not at all is far off), MQA 3/1,
    Nq = 45 > Nk = 20 causal (rows that see no key get zero gradients)."""
    from autograder.lab07_flash_attention.test_attention import autograd_outputs

    q, k, v, do = make_qkv(1, 3, 1, 45, 20, 16, seed=91)
    got = student.run(autograd_outputs, q, k, v, do, causal=True, sm_scale=2.0)
    inputs = describe(q=q, k=k, v=v, sm_scale=2.0)
    check_close(got["o"], attention_float64(q, k, v, causal=True, sm_scale=2.0)[0], name="flash_attention (O)",
                inputs=inputs)
    for name, e in zip(("dq", "dk", "dv"), grads_float64(q, k, v, do, causal=True, sm_scale=2.0)):
        check_close(got[name], e, name=f"flash_attention ({name})", inputs=inputs, atol=1e-5)
