"""The kit's one model: a small Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Every lab trains, shards, checkpoints or quantizes this model, so it is written to be read once and reused everywhere.
It follows the Llama recipe (Touvron et al. 2023, arXiv:2302.13971):

    x_0     = Embed(tokens)
    h_l     = x_{l-1} + Attn(RMSNorm(x_{l-1}))          RoPE on q and k (Su et al. 2021, arXiv:2104.09864)
    x_l     = h_l + SwiGLU(RMSNorm(h_l))                 SwiGLU(x) = W_down (silu(W_gate x) * W_up x)  (Shazeer 2020)
    logits  = W_out RMSNorm(x_L)

Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245) lets `num_kv_heads` divide `num_heads`; MQA is
`num_kv_heads == 1`. Attention is pluggable: `Transformer(config, attention=fn)` calls `fn(q, k, v, causal=True)` with
q (B, H, N, D) and k, v (B, H_kv, N, D), so lab 07's FlashAttention drops in without touching the model.

Presets (`ModelConfig.preset(name)`):
    tiny   ~0.1 M parameters, a training step on a laptop CPU takes milliseconds (tests)
    small  ~3 M parameters (notebook experiments on CPU)
    gpt2   ~124 M-class, GPT-2-small widths (GPU benchmarks)

Usage:
    config = ModelConfig.preset("tiny")
    model = Transformer(config)
    loss = model.loss(tokens, targets)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the decoder. Letters follow the kit: V vocab, C width, H heads, D head dim, F FFN width."""

    vocab_size: int = 256  # V: the byte-level tokenizer of common.data
    max_seq_len: int = 128  # longest N the RoPE tables cover
    num_layers: int = 2
    num_heads: int = 4  # H
    num_kv_heads: int = 2  # H_kv, divides H (GQA); 1 is MQA
    width: int = 64  # C = H * D
    ffn_width: int | None = None  # F; None picks the Llama rule (8/3 C, rounded up to a multiple of 16)
    dropout: float = 0.0  # on attention output and MLP output; lab 01 uses it to test RNG replay
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "num_layers", "num_heads", "num_kv_heads", "width"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if (self.width // self.num_heads) % 2:
            raise ValueError(f"head dim ({self.width // self.num_heads}) must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def hidden_width(self) -> int:
        if self.ffn_width is not None:
            return self.ffn_width
        return 16 * math.ceil(8 * self.width / 3 / 16)

    @staticmethod
    def preset(name: str, **overrides) -> "ModelConfig":
        """A named size, with any field overridden: `ModelConfig.preset("tiny", dropout=0.1)`."""
        presets = {
            "tiny": ModelConfig(num_layers=2, width=64, num_heads=4, num_kv_heads=2, max_seq_len=64),
            "small": ModelConfig(num_layers=4, width=256, num_heads=8, num_kv_heads=4, max_seq_len=256),
            # GPT-2-small widths (12 x 768, 12 heads, vocab padded to 50304, tied embeddings). F = 2048 keeps the
            # SwiGLU MLP at GPT-2's 4.7 M parameters a layer, so the model has GPT-2's ~124 M parameters.
            "gpt2": ModelConfig(
                vocab_size=50304, num_layers=12, width=768, num_heads=12, num_kv_heads=12, ffn_width=2048,
                max_seq_len=1024, tie_embeddings=True,
            ),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return dataclasses.replace(presets[name], **overrides)


# -----------------------------------------------------------------------------
# Attention functions (pluggable)


class AttentionFn(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor: ...


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v through torch's fused kernels; k and v may have fewer heads than q (GQA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """The textbook O(N^2)-memory version, kept as the reference the kernels are checked against."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # (B, H, N, D)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, N_q, N_k)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        # query i may see keys j <= i + (n_k - n_q): aligned to the end, as decoding with a cache needs
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


# -----------------------------------------------------------------------------
# Building blocks


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    # norms, rotations and the loss run in fp32 even for bf16/fp16 models; fp64 models (gradient tests) stay fp64
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich 2019). Computed in at least fp32 for stability."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(_at_least_fp32(x.dtype))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle(n, i) = n * theta^(-2i/D), each (max_seq_len, D/2), in fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (N, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2i, x_2i+1) by angle(n, i). x (B, H, N, D); cos, sin (N, D/2)."""
    x32 = x.to(_at_least_fp32(x.dtype))
    x_even, x_odd = x32[..., 0::2], x32[..., 1::2]  # (B, H, N, D/2) each
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)  # (B, H, N, D/2, 2)
    return rotated.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads and RoPE; the attention kernel itself is `attention`."""

    def __init__(self, config: ModelConfig, attention: AttentionFn):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        kv_width = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.width, config.width, bias=False)
        self.k_proj = nn.Linear(config.width, kv_width, bias=False)
        self.v_proj = nn.Linear(config.width, kv_width, bias=False)
        self.out_proj = nn.Linear(config.width, config.width, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.attention = attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, N, D)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, N, D)
        q, k = apply_rope(q, cos[:N], sin[:N]), apply_rope(k, cos[:N], sin[:N])
        o = self.attention(q, k, v, causal=True)  # (B, H, N, D)
        return self.dropout(self.out_proj(o.transpose(1, 2).reshape(B, N, C)))


class SwiGLU(nn.Module):
    """W_down (silu(W_gate x) * W_up x), the Llama MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.width, config.hidden_width, bias=False)
        self.up_proj = nn.Linear(config.width, config.hidden_width, bias=False)
        self.down_proj = nn.Linear(config.hidden_width, config.width, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))  # (B, N, C)


class Block(nn.Module):
    """One pre-norm decoder layer: x + Attn(norm(x)), then + MLP(norm(.)). Signature: block(x, cos, sin) -> x."""

    def __init__(self, config: ModelConfig, attention: AttentionFn):
        super().__init__()
        self.attn_norm = RMSNorm(config.width, config.norm_eps)
        self.attn = Attention(config, attention)
        self.mlp_norm = RMSNorm(config.width, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# The model

BlockRunner = Callable[[nn.ModuleList, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LossFn(Protocol):
    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor: ...


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, N, V) against targets (B, N), in at least fp32; targets of -100 are padding."""
    logits = logits.flatten(0, 1).to(_at_least_fp32(logits.dtype))  # (B * N, V)
    return F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction=reduction)


def run_in_order(blocks: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The default block runner: x_l = block_l(x_{l-1})."""
    for block in blocks:
        x = block(x, cos, sin)
    return x


class Transformer(nn.Module):
    """Decoder-only LM. `forward(tokens)` returns logits (B, N, V); `loss(tokens, targets)` the mean token NLL.

    `self.blocks` is a plain ModuleList. `self.block_runner(blocks, x, cos, sin)` runs them; the default runs them in
    order, and labs install their own (lab 01 checkpoints segments of blocks) without renaming any parameter.
    `self.loss_fn(logits, targets, reduction=...)` is the loss (`token_cross_entropy` unless a lab installs another).
    """

    def __init__(self, config: ModelConfig, attention: AttentionFn = sdpa_attention):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(Block(config, attention) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.width, config.norm_eps)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # buffers, not parameters: they move with .to(device) but are never trained or sharded
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.block_runner: BlockRunner = run_in_order
        # like block_runner, replaceable: lab 01's selective recomputation recomputes the loss's fp32 log-softmax
        self.loss_fn: LossFn = token_cross_entropy
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's N(0, 0.02); enough for a model that trains for minutes
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, attention: AttentionFn) -> None:
        """Swap the attention kernel in every block (lab 07 plugs in FlashAttention this way)."""
        for block in self.blocks:
            block.attn.attention = attention

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        N = x.shape[1]
        return self.block_runner(self.blocks, x, self.rope_cos[:N], self.rope_sin[:N])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, N), got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len ({self.config.max_seq_len})")
        x = self.embed(tokens)  # (B, N, C)
        x = self.run_blocks(x)
        return self.lm_head(self.norm(x))  # (B, N, V)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over tokens; targets equal to -100 are ignored (padding). `self.loss_fn` computes it."""
        return self.loss_fn(self.forward(tokens), targets, reduction=reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
