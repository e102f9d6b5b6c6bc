"""What lab 06's graded tests build, the same way in the grader and in the worker: small HF models from configs
(seeded, nothing downloaded), token batches of the embedded corpus, and seeded adapter values.

Nothing here imports the lab. The worker imports this module as `hf_models` (it sits beside the test files); the
grader finds it under the same name because conftest.py puts this folder on its path.
"""

from __future__ import annotations

import logging

# torchao (imported by transformers and peft) warns about compiled extensions this torch build cannot load
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from common.testing import corpus_batch  # noqa: E402

hf_logging.set_verbosity_error()  # config notes about token ids outside a 256-byte vocabulary

# odd-ish widths on purpose: 48 = 4 heads of 12, GQA 4/2, an FFN of 80
LLAMA = dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# NF4 needs in_features divisible by its block (64): QLoRA tests use this one
LLAMA_NF4 = dict(LLAMA, hidden_size=64, intermediate_size=128)
GPT2 = dict(vocab_size=256, n_embd=48, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def llama(*, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).to(dtype)


def gpt2(*, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**{**GPT2, **overrides})).to(dtype)


def model(kind: str, **kwargs):
    return {"llama": llama, "gpt2": gpt2}[kind](**kwargs)


def tokens(*, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    """(batch_size, seq_len) int64 token ids of the corpus."""
    return corpus_batch(batch_size=batch_size, seq_len=seq_len, seed=seed)[0]


def adapter_values(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], *, seed: int,
                   scale: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (A, B) float64 values (B nonzero, so the update matters), drawn in sorted name order."""
    generator = torch.Generator().manual_seed(seed)
    values = {}
    for name in sorted(shapes):
        shape_a, shape_b = shapes[name]
        values[name] = (torch.randn(shape_a, generator=generator, dtype=torch.float64) * scale,
                        torch.randn(shape_b, generator=generator, dtype=torch.float64) * scale)
    return values


def peft_layers(peft_model) -> dict:
    """Module name in the HF model -> peft's LoRA layer (with lora_A / lora_B ModuleDicts)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def set_peft_adapters(peft_model, *, seed: int, scale: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Give every LoRA layer of a peft model seeded (A, B) values; returns them."""
    layers = peft_layers(peft_model)
    shapes = {n: (tuple(m.lora_A["default"].weight.shape), tuple(m.lora_B["default"].weight.shape))
              for n, m in layers.items()}
    values = adapter_values(shapes, seed=seed, scale=scale)
    with torch.no_grad():
        for name, (a, b) in values.items():
            layers[name].lora_A["default"].weight.copy_(a)
            layers[name].lora_B["default"].weight.copy_(b)
    return values


def peft_gradients(peft_model) -> dict[str, torch.Tensor]:
    """Adapter gradients of a peft model under our names: "<module>.lora_A.weight"."""
    return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.detach().clone()
            for n, p in peft_model.named_parameters() if p.grad is not None}


def peft_trainable(peft_model) -> list[str]:
    """Names of a peft model's trainable parameters, under our names."""
    return sorted(n.removeprefix("base_model.model.").replace(".default", "")
                  for n, p in peft_model.named_parameters() if p.requires_grad)
