"""Producers of lab 07's hidden tests. The hidden worker imports this module; the hidden test files (with what is
expected) stay in the grader."""

import torch


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def hf_greedy_tokens(settings: dict, *, seed: int, prompt: torch.Tensor, new_tokens: int,
                     attn: str | None = None) -> torch.Tensor:
    """Greedy decoding with HF's KV cache on register_hf_attention()'s implementation (or `attn`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name = attn
    if attn is None:
        from lab07_flash_attention.attention import register_hf_attention

        name = register_hf_attention()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(_device()).eval()
    model.set_attn_implementation(name)
    with torch.no_grad():
        tokens = model.generate(prompt.to(_device()), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return tokens.cpu()


def hf_attention_with_padding_mask() -> None:
    from lab07_flash_attention.attention import hf_attention_forward

    q = torch.randn(1, 2, 8, 16, device=_device())
    hf_attention_forward(torch.nn.Module(), q, q, q, torch.ones(1, 8, dtype=torch.bool, device=_device()))
