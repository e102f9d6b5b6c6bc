"""Builders shared by lab 08's tests, in the grader and in the worker alike (no lab code here).

The grader computes what the engine must produce with these, from the model itself: `greedy_continuation` decodes
without any cache, one full forward pass per token, and `hf_greedy` asks HF `generate`. Both run on the same seeded
models the producers build, so grader and worker hold identical weights.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """Tiny tensors are fastest on one thread, and a shared CPU makes multi-threaded tiny ops crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_llama(*, seed: int = 0, dtype: torch.dtype = torch.float64, num_layers: int = 2, max_seq_len: int = 64,
               **overrides):
    """common.model's tiny preset (4 heads on 2 K/V heads, D = 16), seeded, in `dtype`."""
    from common.testing import tiny_model

    model = tiny_model(num_layers=num_layers, seed=seed, dtype=dtype, max_seq_len=max_seq_len, **overrides)
    return model.eval()


def hf_llama(*, seed: int = 0, dtype: torch.dtype = torch.float64, num_kv_heads: int = 2):
    """A HF LlamaForCausalLM from a config (4 heads, D = 16, 2 layers, vocab 256), seeded, no pretrained weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=96,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def prompts_of(lengths: list[int], *, seed: int, vocab_size: int = 256) -> list[list[int]]:
    """Random prompts of the given lengths (never a constant)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def greedy_continuation(model, prompt: list[int], max_tokens: int, stop: tuple[int, ...] = (),
                        max_len: int | None = None) -> list[int]:
    """Plain autoregressive greedy decoding: argmax of a full forward pass over everything so far, no cache."""
    tokens = list(prompt)
    generated: list[int] = []
    while len(generated) < max_tokens and (max_len is None or len(tokens) < max_len):
        logits = model(torch.tensor([tokens]))
        logits = logits.logits if hasattr(logits, "logits") else logits
        choice = int(logits[0, -1].argmax())
        tokens.append(choice)
        generated.append(choice)
        if choice in stop:
            break
    return generated


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """HF generate, greedy, one prompt at a time (no padding), no stop token."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def paged_inputs(*, B: int, H: int, H_kv: int, D: int, block_size: int, lens: list[int], seed: int,
                 dtype: torch.dtype = torch.float32, spare_blocks: int = 3, shared_prefix_blocks: int = 0):
    """Random decode inputs over a paged cache: q (B, H, D), k_cache and v_cache (num_blocks, block_size, H_kv, D),
    block_tables (B, max_blocks) int32 in a random order (the unused tail of each row points at random real blocks,
    so a kernel that reads past a context length reads wrong values), context_lens (B,) int32. With
    shared_prefix_blocks, every sequence's first blocks are the same physical blocks (a shared prompt)."""
    generator = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in lens]
    shared = min([shared_prefix_blocks, *per_seq])
    num_blocks = shared + sum(p - shared for p in per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=generator).tolist()
    prefix, rest = order[:shared], order[shared:]
    max_blocks = max(per_seq) + 1
    tables = []
    for count in per_seq:
        own, rest = rest[:count - shared], rest[count - shared:]
        filler = torch.randint(0, num_blocks, (max_blocks - count,), generator=generator).tolist()
        tables.append(prefix + own + filler)
    scale = 1.0 / D ** 0.25  # scores of order one: softmax neither flat nor one-hot
    q = (torch.randn(B, H, D, generator=generator, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(num_blocks, block_size, H_kv, D, generator=generator, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(num_blocks, block_size, H_kv, D, generator=generator, dtype=torch.float64).to(dtype)
    return q, k, v, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
