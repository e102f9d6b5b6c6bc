"""Memory arithmetic of fine-tuning: weights, gradients, optimizer state and activations for full fine-tuning, LoRA
and QLoRA, predicted from a Llama's shape and measured on a real HF model.

What it shows: full fine-tuning with Adam keeps, per parameter, the weight, its gradient and two moments; LoRA keeps
gradient and moments only for the adapters (Hu et al. 2021, arXiv:2106.09685, Section 4.2: "we reduce the VRAM
usage by up to 2/3"), and QLoRA also stores the frozen linear weights in 4 bits (Dettmers et al. 2023,
arXiv:2305.14314, Section 3). Activations do not shrink: the adapters need the same layer inputs. With P parameters,
P_a adapter parameters, P_lin of them in linear layers, b bytes per element of the compute dtype:

    weights     full, LoRA: b P (+ b_a P_a)       QLoRA: nf4(P_lin) + b (P - P_lin) + b_a P_a
    gradients   full: b P                         LoRA, QLoRA: b_a P_a
    optimizer   Adam, moments in the parameter's dtype: 2 b P (full) or 2 b_a P_a (adapters)
    activations what autograd saves for backward (below), the same order for all three

Activations of a HF Llama (sdpa attention, RMSNorm computed in fp32, loss on fp32 logits), per token, in bytes, for a
layer whose input needs a gradient; C width, F FFN width, H heads, D head dim, G = KV heads * D:

    RMSNorm (x2)     4 C + 4          its fp32 input and 1/rms
                     + b C            the normalised input, if the norm's weight trains (full fine-tuning)
                     + b C            its output, if a linear layer it feeds needs its input (a trained weight or
                                      an adapter: q/k/v after the first norm, gate/up after the second)
    attention        b (2 C + 2 G) + 4 H     q and k after RoPE, v, the output, the fp32 log-sum-exp
    MLP              3 b F            gate output, SiLU output, up output
                     + b F            their product, if down_proj needs its input
    adapter (each)   b_a r            h = x A^T
                     + b_a K          its own copy of the input, when it drops it out or casts it (b_a != b, as
                                      peft's fp32 adapters on a bf16 model); the layer's input is then kept only
                                      for a trained weight
                     + m K            the dropout mask (m = 1 byte on CUDA, b on CPU)

The first layer's input needs no gradient when the embeddings are frozen (LoRA, QLoRA), so its first norm saves
nothing of its own (nor do its q/k/v dropout masks). Per token once: the token ids (8, when the embeddings train), the final norm (as above, its output
kept when the output layer trains), 4 V for the fp32 log-softmax and 8 for the shifted labels; and per sequence RoPE's
cos and sin, 2 N D b bytes, plus 4 bytes of the loss's normaliser. The model assumes the adapters include q, k or v
(so every layer's attention is on the gradient path), as peft's default (q, v) and "all-linear" do.

Usage:
    predicted = predict_memory(PRESETS["7b"], method="qlora", config=LoRAConfig(r=16, target_modules="all-linear"),
                               batch_size=1, seq_len=2048)
    measured = measure_memory(model, input_ids)       # a real training step on a small model
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .lora import LoRAConfig
from .qlora import NF4Config, is_nf4, nf4_bytes

METHODS = ("full", "lora", "qlora")
LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# -----------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True, kw_only=True)
class LlamaShape:
    """What the arithmetic needs of a Llama (untied embeddings, no biases): V, C, F, layers, H and KV heads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}), "
                             f"and num_heads by num_kv_heads ({self.num_kv_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @staticmethod
    def from_hf(config) -> "LlamaShape":
        """From a transformers LlamaConfig."""
        return LlamaShape(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                          intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                          num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads)


PRESETS = {
    # TinyLlama-1.1B's shape: d2048, 22 layers, GQA 32/4 (the benchmark's model)
    "1b": LlamaShape(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32,
                     num_kv_heads=4),
    # Llama-2-7B's shape
    "7b": LlamaShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                     num_kv_heads=32),
}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of each kind of training state."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations, "total": self.total}


# -----------------------------------------------------------------------------
# Parameter counts


def linear_shapes(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer."""
    C, F, G = shape.hidden_size, shape.intermediate_size, shape.num_kv_heads * shape.head_dim
    return {"q_proj": (C, C), "k_proj": (C, G), "v_proj": (C, G), "o_proj": (C, C),
            "gate_proj": (C, F), "up_proj": (C, F), "down_proj": (F, C)}


def parameter_count(shape: LlamaShape) -> int:
    """All parameters: embeddings and output layer (V C each), per layer its linears and two norms, a final norm."""
    # BEGIN SOLUTION
    per_layer = sum(k * n for k, n in linear_shapes(shape).values()) + 2 * shape.hidden_size
    return 2 * shape.vocab_size * shape.hidden_size + shape.num_layers * per_layer + shape.hidden_size
    # END SOLUTION


def adapted_linears(target_modules: tuple[str, ...] | str) -> list[str]:
    """Which of a layer's linears (LAYER_LINEARS) the targets adapt: "all-linear", or names / name suffixes."""
    if target_modules == "all-linear":
        return list(LAYER_LINEARS)
    if isinstance(target_modules, str):
        raise ValueError(f"the memory model takes 'all-linear' or a list of names, not the pattern {target_modules!r}")
    names = [name for name in LAYER_LINEARS if any(name == t or t.endswith("." + name) for t in target_modules)]
    if not names:
        raise ValueError(f"target_modules {target_modules!r} name none of a Llama layer's linears {LAYER_LINEARS}")
    return names


def lora_parameter_count(shape: LlamaShape, config: LoRAConfig) -> int:
    """Adapter parameters: r (K + N) per adapted (K -> N) linear, in every layer."""
    # BEGIN SOLUTION
    shapes = linear_shapes(shape)
    per_layer = sum(config.r * (shapes[name][0] + shapes[name][1]) for name in adapted_linears(config.target_modules))
    return shape.num_layers * per_layer
    # END SOLUTION


def nf4_weight_bytes(in_features: int, out_features: int, *, nf4: NF4Config, dtype: torch.dtype) -> int:
    """Bytes of one (N, K) weight in torchao's NF4 layout: 4-bit codes (N K / 2), an int8 code per block of
    block_size (N K / block_size), a second-level constant per scaler block, one mean, and the 16-level table (the
    last three in `dtype`)."""
    # BEGIN SOLUTION
    numel, itemsize = in_features * out_features, dtype.itemsize
    num_scales = numel // nf4.block_size
    num_constants = num_scales // math.gcd(num_scales, nf4.scaler_block_size)
    return numel // 2 + num_scales + itemsize * (num_constants + 1 + 16)
    # END SOLUTION


# -----------------------------------------------------------------------------
# Predictions


def predict_memory(shape: LlamaShape, *, method: str, batch_size: int, seq_len: int, config: LoRAConfig | None = None,
                   dtype: torch.dtype = torch.bfloat16, nf4: NF4Config | None = None,
                   device: str = "cuda") -> MemoryBreakdown:
    """Bytes of weights, gradients, Adam state and activations of one training step (the table above).

    Args:
        shape: the model.  method: "full", "lora" or "qlora".
        batch_size, seq_len: B and N.
        config: the adapters (LoRA and QLoRA); its adapter_dtype, or else `dtype`, is theirs.
        dtype: the weights' and activations' dtype (bf16: 2 bytes).
        nf4: QLoRA's block sizes (default NF4Config()).
        device: "cuda" or "cpu" (their dropout masks differ in size; see activation_bytes).

    Raises:
        ValueError: an unknown method, or LoRA/QLoRA without a config.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "full" and config is None:
        raise ValueError(f"method {method!r} needs a LoRAConfig")
    b = dtype.itemsize
    total = parameter_count(shape)
    # BEGIN SOLUTION
    if method == "full":
        return MemoryBreakdown(weights=b * total, gradients=b * total, optimizer=2 * b * total,
                               activations=activation_bytes(shape, batch_size=batch_size, seq_len=seq_len,
                                                            config=None, dtype=dtype, device=device))
    b_adapter = (config.adapter_dtype or dtype).itemsize
    adapters = lora_parameter_count(shape, config)
    weights = b * total
    if method == "qlora":
        nf4 = nf4 or NF4Config()
        linears = linear_shapes(shape).values()
        weights -= shape.num_layers * sum(b * k * n - nf4_weight_bytes(k, n, nf4=nf4, dtype=dtype) for k, n in linears)
    return MemoryBreakdown(weights=weights + b_adapter * adapters, gradients=b_adapter * adapters,
                           optimizer=2 * b_adapter * adapters,
                           activations=activation_bytes(shape, batch_size=batch_size, seq_len=seq_len, config=config,
                                                        dtype=dtype, device=device))
    # END SOLUTION


def activation_bytes(shape: LlamaShape, *, batch_size: int, seq_len: int, config: LoRAConfig | None,
                     dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> int:
    """Bytes autograd saves in one forward of a HF Llama (the table above); config None is full fine-tuning.

    `device` matters only for adapter dropout: CUDA keeps a bool mask (1 byte per element), the CPU a mask in `dtype`.
    """
    b = dtype.itemsize
    C, F, H, V = shape.hidden_size, shape.intermediate_size, shape.num_heads, shape.vocab_size
    G, L = shape.num_kv_heads * shape.head_dim, shape.num_layers
    full = config is None
    if not full and not set(adapted_linears(config.target_modules)) & {"q_proj", "k_proj", "v_proj"}:
        raise ValueError("the activation model needs adapters on q_proj, k_proj or v_proj")
    kept, adapters, first_layer_saving = adapter_activation_terms(shape, config, dtype=dtype, device=device)
    norm_internal = 4 * C + 4 + (b * C if full else 0)  # fp32 input and 1/rms (+ the normalised input)
    layer = 2 * norm_internal + b * C * (bool(kept & {"q_proj", "k_proj", "v_proj"}) + bool(kept & {"gate_proj",
                                                                                                   "up_proj"}))
    layer += b * (2 * C + 2 * G) + 4 * H + 3 * b * F + (b * F if "down_proj" in kept else 0) + adapters
    per_token = L * layer - first_layer_saving
    per_token += (8 if full else 0) + norm_internal + (b * C if full else 0) + 4 * V + 8  # ids, final norm, loss
    return batch_size * seq_len * per_token + 2 * seq_len * shape.head_dim * b + 4  # RoPE's cos and sin, normaliser


def adapter_activation_terms(shape: LlamaShape, config: LoRAConfig | None, *, dtype: torch.dtype,
                             device: str = "cuda") -> tuple[set[str], int, int]:
    """What the adapters change in a layer's saved activations, per token.

    Returns:
        kept: the layer's linears (names in LAYER_LINEARS) whose input is saved as it is, by a trained weight or an
            adapter without its own copy (full fine-tuning: all seven).
        adapter_bytes: bytes the adapters themselves save per token in one layer: h = x A^T for each (b_a r), and
            for each adapter with its own copy of the input (dropout, or b_a != b), that copy (b_a K) and with
            dropout the mask (m K; m = 1 on CUDA, b on CPU).
        first_layer_saving: bytes per token the first layer saves less when the embeddings are frozen: its first
            norm's 4 C + 4, and with dropout the masks of its q/k/v adapters (m C each).
    """
    if config is None:
        return set(LAYER_LINEARS), 0, 0
    b = dtype.itemsize
    b_adapter = (config.adapter_dtype or dtype).itemsize
    adapted = adapted_linears(config.target_modules)
    in_features = {name: k for name, (k, _) in linear_shapes(shape).items()}
    # BEGIN SOLUTION
    dropout = config.dropout > 0
    mask = 1 if device == "cuda" else b
    own_copy = dropout or b_adapter != b  # the adapter drops out or casts its input, and keeps that copy
    kept = set() if own_copy else set(adapted)
    adapter_bytes = b_adapter * config.r * len(adapted)
    if own_copy:
        adapter_bytes += (b_adapter + (mask if dropout else 0)) * sum(in_features[name] for name in adapted)
    qkv = [name for name in adapted if name in ("q_proj", "k_proj", "v_proj")]
    first_layer_saving = 4 * shape.hidden_size + 4 + (mask * shape.hidden_size * len(qkv) if dropout else 0)
    return kept, adapter_bytes, first_layer_saving
    # END SOLUTION


# -----------------------------------------------------------------------------
# Measurement: one real training step


def measure_memory(model: nn.Module, input_ids: torch.Tensor, *, lr: float = 1e-4) -> MemoryBreakdown:
    """Bytes of a real step of `model` (a HF causal LM) on `input_ids` (B, N), loss on the ids themselves.

    weights: every parameter (NF4 ones at their packed size). activations: distinct storages autograd saves in the
    forward, parameters and quantized weights left out. gradients: every .grad after backward. optimizer: Adam's two
    moments per trainable parameter after one torch.optim.AdamW step. The model's weights change (one step); its
    gradients are set to None again.
    """
    parameters = list(model.parameters())
    weights = sum(nf4_bytes(p) if is_nf4(p) else p.numel() * p.element_size() for p in parameters)
    excluded = {t.untyped_storage().data_ptr() for t in [*parameters, *model.buffers()] if not is_nf4(t)}
    seen: set[int] = set()
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if type(tensor) is torch.Tensor or type(tensor) is nn.Parameter:  # an NF4 weight is a weight, not saved work
            key = tensor.untyped_storage().data_ptr()
            if key not in excluded and key not in seen:
                seen.add(key)
                saved += tensor.untyped_storage().nbytes()
        return tensor

    trainable = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in parameters if p.grad is not None)
    optimizer.step()
    moments = sum(state[key].numel() * state[key].element_size()
                  for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))
    model.zero_grad(set_to_none=True)
    return MemoryBreakdown(weights=weights, gradients=gradients, optimizer=moments, activations=saved)
