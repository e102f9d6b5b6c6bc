"""The model runner: a Llama forward pass whose attention reads and writes a paged KV cache.

What it saves: with the cache, a decode step computes one token per sequence instead of re-running the whole prefix
(O(N) work per token instead of O(N^2)); with the *paged* cache, many sequences of any lengths share one pool.

The runner reuses the model's own modules (embedding, norms, projections, MLP, head) and replaces only the attention
wiring, so its logits are those of the model (common.model.Transformer, or a HF `LlamaForCausalLM`). Each layer:

    q, k, v = rope(W_q x), rope(W_k x), W_v x                 for the T new tokens of the step, packed (T, ., D)
    K_cache[slot(t)], V_cache[slot(t)] = k_t, v_t               slot(t) = table[p_t // bs] * bs + p_t % bs
    prefill: o_i = causal attention of sequence i's new tokens over its context (SDPA; paged_attention.py says why)
    decode:  o_b = paged decode attention of sequence b's one token over its cache (Triton, or plain PyTorch)

Every layer writes the K/V of all of the step's tokens before any attention reads, so sequences of one prefill step may
share prefix blocks that another of them computes in that very step (prefix caching).

CUDA graphs (decode only): a decode step launches ~15 kernels a layer, and at batch sizes that fit in a GPU the CPU
launching them is slower than the GPU running them. The runner captures the decode forward once per padded batch size
(1, 2, 4, 8, 16, 32, 48, ...) over static input buffers and replays it: the batch is padded to the next captured size
with rows that read and write only a scratch block, whose outputs are dropped. On a CPU the same padded path runs
eagerly (`cuda_graphs=True`), so its logic is tested there; the capture itself needs a GPU (test_gpu.py).

Usage:
    runner = ModelRunner(model, num_blocks=256, block_size=16, max_model_len=1024, max_num_seqs=64)
    logits = runner.prefill([prompt], num_cached=[0], block_tables=[table])       # (1, V), the last token's
    logits = runner.decode([token], block_tables=[table], context_lens=[len(prompt) + 1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from common.model import Transformer, apply_rope

from .paged_attention import (default_num_splits, gather_kv, paged_attention_torch, paged_decode_attention,
                              prefill_attention)

ATTENTION_BACKENDS = ("torch", "triton")

# -----------------------------------------------------------------------------
# The model's parts, whichever library built it


@dataclass
class LlamaLayer:
    attn_norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module
    mlp_norm: nn.Module
    mlp: nn.Module


@dataclass
class LlamaParts:
    """References to a Llama's modules; rope(q, k, positions) rotates q (T, H, D) and k (T, H_kv, D) the model's way."""

    embed: nn.Module
    layers: list[LlamaLayer]
    norm: nn.Module
    lm_head: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int
    sm_scale: float
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def llama_parts(model: nn.Module) -> LlamaParts:
    """The parts of common.model.Transformer or of a HF LlamaForCausalLM.

    Raises:
        TypeError: any other model.
    """
    if isinstance(model, Transformer):
        return _common_parts(model)
    if getattr(getattr(model, "config", None), "model_type", None) == "llama" and hasattr(model, "lm_head"):
        return _hf_parts(model)
    raise TypeError(f"the runner takes common.model.Transformer or a HF LlamaForCausalLM, got {type(model).__name__}")


def _common_parts(model: Transformer) -> LlamaParts:
    config = model.config

    def rope(q, k, positions):
        # common.model rotates pairs (x_2i, x_2i+1) of (..., N, D) tensors: heads first, tokens second
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (T, D/2)
        return (apply_rope(q.transpose(0, 1), cos, sin).transpose(0, 1),
                apply_rope(k.transpose(0, 1), cos, sin).transpose(0, 1))

    layers = [LlamaLayer(b.attn_norm, b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.out_proj, b.mlp_norm, b.mlp)
              for b in model.blocks]
    return LlamaParts(model.embed, layers, model.norm, model.lm_head, config.num_heads, config.num_kv_heads,
                      config.head_dim, config.max_seq_len, config.vocab_size, 1.0 / math.sqrt(config.head_dim), rope)


def _hf_parts(model: nn.Module) -> LlamaParts:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config, inner = model.config, model.model

    def rope(q, k, positions):
        cos, sin = inner.rotary_emb(q, positions[None])  # (1, T, D) in q's dtype, as HF computes them
        return apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)

    layers = [LlamaLayer(layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp) for layer in inner.layers]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LlamaParts(inner.embed_tokens, layers, inner.norm, model.lm_head, config.num_attention_heads,
                      config.num_key_value_heads, head_dim, config.max_position_embeddings, config.vocab_size,
                      inner.layers[0].self_attn.scaling, rope)


# -----------------------------------------------------------------------------
# Cache addressing (the student's part)


def slot_mapping(block_tables: torch.Tensor, seq_index: torch.Tensor, positions: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """The cache row of each token: block_tables[i, p // block_size] * block_size + p % block_size.

    Args:
        block_tables: (S, max_blocks) int, one row per sequence.
        seq_index: (T,) int64, the sequence each token belongs to.
        positions: (T,) int64, each token's position in its sequence.
        block_size: token slots per block.

    Returns:
        (T,) int64 rows of the flat cache (num_blocks * block_size, H_kv, D).
    """
    # BEGIN SOLUTION
    blocks = block_tables[seq_index, positions // block_size].long()
    return blocks * block_size + positions % block_size
    # END SOLUTION


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> None:
    """Store each token's key and value in its cache row, in place.

    Args:
        k, v: (T, H_kv, D), the new tokens' keys and values.
        k_cache, v_cache: (num_blocks, block_size, H_kv, D), contiguous.
        slots: (T,) int64 from `slot_mapping`.
    """
    # BEGIN SOLUTION
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)
    # END SOLUTION


@dataclass
class PrefillBatch:
    """The step's prompts: new_lens[i] tokens of sequence i run, after num_cached[i] tokens found in the cache."""

    new_lens: list[int]
    num_cached: list[int]
    block_tables: torch.Tensor  # (S, max_blocks) int32


def prefill_attention_batch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, batch: PrefillBatch, *, sm_scale: float) -> torch.Tensor:
    """Causal attention of every sequence's new tokens over its whole context, after they were written to the cache.

    Args:
        q: (T, H, D), k and v: (T, H_kv, D), the packed new tokens of all sequences, in batch order.
        k_cache, v_cache: this layer's cache, already holding the new tokens' K/V.
        batch: how the T tokens split into sequences, and what each has cached.
        sm_scale: softmax scale.

    Returns:
        (T, H, D). A sequence with nothing cached attends over its own k, v; one with a cached prefix gathers its
        num_cached + new_len tokens from the cache (`gather_kv`).
    """
    # BEGIN SOLUTION
    outputs, start = [], 0
    for i, (new_len, cached) in enumerate(zip(batch.new_lens, batch.num_cached)):
        stop = start + new_len
        if cached == 0:
            keys, values = k[start:stop], v[start:stop]
        else:
            keys = gather_kv(k_cache, batch.block_tables[i], cached + new_len)
            values = gather_kv(v_cache, batch.block_tables[i], cached + new_len)
        outputs.append(prefill_attention(q[start:stop], keys, values, sm_scale=sm_scale))
        start = stop
    return torch.cat(outputs)
    # END SOLUTION


# -----------------------------------------------------------------------------
# The runner


class ModelRunner:
    """Owns the KV cache tensors and runs prefill and decode steps of a model over them.

    Args:
        model: common.model.Transformer or a HF LlamaForCausalLM (put in eval mode; its device and dtype are used).
        num_blocks: cache blocks the block manager hands out; one more, a scratch block, takes padding rows' writes.
        block_size: token slots per block.
        max_model_len: the longest sequence, which sets the block-table width.
        max_num_seqs: the largest decode batch (the largest captured CUDA graph).
        attention_backend: "triton" (paged_decode_attention) or "torch" (paged_attention_torch) for decode.
        cuda_graphs: pad decode batches to captured sizes and replay CUDA graphs (on a CPU: the padded path, eagerly).
    """

    def __init__(self, model: nn.Module, *, num_blocks: int, block_size: int, max_model_len: int, max_num_seqs: int,
                 attention_backend: str = "torch", cuda_graphs: bool = False):
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        self.parts = llama_parts(model)
        model.eval()
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        if cuda_graphs and self.device.type == "cuda" and attention_backend != "triton":
            raise ValueError("CUDA graphs need the triton backend (the torch backend reads the context lengths on the "
                             "host)")
        self.block_size, self.num_blocks, self.max_num_seqs = block_size, num_blocks, max_num_seqs
        self.attention_backend, self.cuda_graphs = attention_backend, cuda_graphs
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        shape = (num_blocks + 1, block_size, self.parts.num_kv_heads, self.parts.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.parts.layers]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.parts.layers]
        self.scratch_block = num_blocks
        self.graph_sizes = sorted({1, 2, 4, 8, *range(16, max_num_seqs + 16, 16)})
        self.graph_sizes = [s for s in self.graph_sizes if s < max_num_seqs] + [max_num_seqs]
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self.graph_pool = None
        self.static: dict[str, torch.Tensor] | None = None

    # ---- steps

    @torch.inference_mode()
    def prefill(self, token_ids: list[list[int]], *, num_cached: list[int],
                block_tables: list[list[int]]) -> torch.Tensor:
        """Run each sequence's uncached tokens; return the logits of each sequence's last token, (S, V)."""
        new_lens = [len(ids) - cached for ids, cached in zip(token_ids, num_cached)]
        tokens = torch.tensor([t for ids, c in zip(token_ids, num_cached) for t in ids[c:]], device=self.device)
        positions = torch.tensor([p for ids, c in zip(token_ids, num_cached) for p in range(c, len(ids))],
                                 device=self.device)
        seq_index = torch.repeat_interleave(torch.arange(len(token_ids)), torch.tensor(new_lens)).to(self.device)
        tables = self._table_tensor(block_tables)
        batch = PrefillBatch(new_lens, list(num_cached), tables)
        slots = slot_mapping(tables, seq_index, positions, self.block_size)

        def attend(layer, q, k, v):
            return prefill_attention_batch(q, k, v, self.k_caches[layer], self.v_caches[layer], batch,
                                           sm_scale=self.parts.sm_scale)

        hidden = self._forward(tokens, positions, slots, attend)
        last = torch.tensor(new_lens).cumsum(0).to(self.device) - 1  # each sequence's last new token
        return self.parts.lm_head(self.parts.norm(hidden[last]))

    @torch.inference_mode()
    def decode(self, token_ids: list[int], *, block_tables: list[list[int]], context_lens: list[int]) -> torch.Tensor:
        """One token per sequence (at position context_len - 1, its slot already allocated); return (B, V) logits."""
        B = len(token_ids)
        if not self.cuda_graphs:
            tokens = torch.tensor(token_ids, device=self.device)
            lens = torch.tensor(context_lens, dtype=torch.int32, device=self.device)
            return self._decode_forward(tokens, self._table_tensor(block_tables), lens)
        size = next(s for s in self.graph_sizes if s >= B)
        static = self._static_buffers()
        pad = size - B  # padding rows: token 0 at position 0 of the scratch block, outputs dropped
        static["tokens"][:size].copy_(torch.tensor(token_ids + [0] * pad), non_blocking=True)
        static["context_lens"][:size].copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32),
                                            non_blocking=True)
        static["block_tables"][:size].copy_(self._table_tensor(block_tables + [[]] * pad, device="cpu"),
                                            non_blocking=True)
        views = (static["tokens"][:size], static["block_tables"][:size], static["context_lens"][:size])
        if self.device.type != "cuda":
            return self._decode_forward(*views)[:B]
        graph, logits = self._graph(size, views)
        graph.replay()
        return logits[:B]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's K/V into block dst, in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_copy_(0, dst, cache.index_select(0, src))

    # ---- the forward pass

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend) -> torch.Tensor:
        """(T,) tokens -> (T, C) hidden states after the last layer; attend(layer, q, k, v) -> (T, H, D)."""
        parts = self.parts
        T = tokens.shape[0]
        x = parts.embed(tokens)  # (T, C)
        for index, layer in enumerate(parts.layers):
            h = layer.attn_norm(x)
            q = layer.q_proj(h).view(T, parts.num_heads, parts.head_dim)  # (T, H, D)
            k = layer.k_proj(h).view(T, parts.num_kv_heads, parts.head_dim)  # (T, H_kv, D)
            v = layer.v_proj(h).view(T, parts.num_kv_heads, parts.head_dim)
            q, k = parts.rope(q, k, positions)
            write_kv_cache(k, v, self.k_caches[index], self.v_caches[index], slots)
            o = attend(index, q, k, v)  # (T, H, D)
            x = x + layer.o_proj(o.reshape(T, parts.num_heads * parts.head_dim))
            x = x + layer.mlp(layer.mlp_norm(x))
        return x

    def _decode_forward(self, tokens: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        positions = context_lens.long() - 1  # the new token is the last of its context
        slots = slot_mapping(tables, torch.arange(B, device=self.device), positions, self.block_size)
        # split-K is fixed per batch size (a captured graph cannot read the context lengths): sized for the longest
        num_splits = default_num_splits(B, self.parts.num_kv_heads, self.max_model_len, self.device)

        def attend(layer, q, k, v):
            if self.attention_backend == "triton":
                return paged_decode_attention(q, self.k_caches[layer], self.v_caches[layer], tables, context_lens,
                                              sm_scale=self.parts.sm_scale, num_splits=num_splits)
            return paged_attention_torch(q, self.k_caches[layer], self.v_caches[layer], tables, context_lens,
                                         sm_scale=self.parts.sm_scale)

        hidden = self._forward(tokens, positions, slots, attend)
        return self.parts.lm_head(self.parts.norm(hidden))  # (B, V)

    # ---- buffers and graphs

    def _table_tensor(self, block_tables: list[list[int]], device=None) -> torch.Tensor:
        """(S, max_blocks) int32, rows padded with the scratch block (built in numpy: a few times faster than a
        nested list, which matters at 256 sequences a step)."""
        rows = np.full((len(block_tables), self.max_blocks), self.scratch_block, dtype=np.int32)
        for row, table in zip(rows, block_tables):
            row[:len(table)] = table
        return torch.from_numpy(rows).to(device or self.device)

    def _static_buffers(self) -> dict[str, torch.Tensor]:
        if self.static is None:
            size = self.graph_sizes[-1]
            self.static = {
                "tokens": torch.zeros(size, dtype=torch.long, device=self.device),
                "context_lens": torch.ones(size, dtype=torch.int32, device=self.device),
                "block_tables": torch.full((size, self.max_blocks), self.scratch_block, dtype=torch.int32,
                                           device=self.device),
            }
        return self.static

    def _graph(self, size: int, views: tuple[torch.Tensor, ...]):
        """The CUDA graph of a decode step at batch `size`, captured on first use (after a warm-up on a side stream:
        Triton compiles and cuBLAS picks its kernels outside the capture). The warm-up writes this step's K/V, the
        same values the replay writes again."""
        if size not in self.graphs:
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._decode_forward(*views)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self._decode_forward(*views)
            self.graphs[size] = (graph, logits)
        return self.graphs[size]

