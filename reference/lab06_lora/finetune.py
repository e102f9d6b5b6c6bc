"""A fine-tuning run on the embedded corpus: full fine-tuning against LoRA at several ranks (and QLoRA), with Accelerate.

What it shows: starting from a small pretrained Llama, the loss on a new domain falls under every method; LoRA trains
well under 10% of the parameters (Hu et al. 2021, arXiv:2106.09685, Section 7.2: a small r already captures most of
the update), and QLoRA follows LoRA's curve on a 4-bit base (Dettmers et al. 2023, arXiv:2305.14314, Section 4).

The task, all from `common.data`'s corpus (Python's help topics, byte tokens, nothing downloaded):
1. pretraining: a small HF Llama (vocab 256, built from a config) trains from scratch on the first 80% of the text;
2. fine-tuning: the same model adapts to the last 20% written in UPPER CASE, a shift of the output distribution the
   pretrained model has barely seen (its first fine-tuning loss is far above its pretraining loss).

Training goes through Accelerate, as a user's script would: `Accelerator.prepare` places the model and optimizer (and
wraps the model in DDP when launched on several processes), `accelerator.backward` runs the backward, and each
process draws its own batches (seed + process index).

Usage:
    accelerate launch --cpu -m lab06_lora.finetune --methods full lora:1 lora:4 lora:16 --out results/
    PYTHONPATH=reference:labs python -m lab06_lora.finetune --methods full lora:8 qlora:8 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.data import ByteTokenizer, batches, corpus_text

from .lora import LoRAConfig
from .inject import apply_lora, count_parameters
from .qlora import apply_qlora

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run: the model's size, pretraining and fine-tuning steps, and the batches."""

    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    finetune_steps: int = 40
    batch_size: int = 8
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.pretrain_steps, self.finetune_steps) < 0 or min(self.batch_size, self.seq_len) <= 0:
            raise ValueError("steps must be >= 0, and batch_size and seq_len positive")


# learning rates a user would start from: adapters take a larger step than the full model
LEARNING_RATES = {"full": 1e-3, "lora": 1e-2, "qlora": 1e-2}


# -----------------------------------------------------------------------------
# Public entry points


def corpus_split() -> tuple[torch.Tensor, torch.Tensor]:
    """(pretraining tokens, fine-tuning tokens): the first 80% of the corpus, and the rest in upper case."""
    text = corpus_text()
    cut = int(0.8 * len(text))
    tokenizer = ByteTokenizer()
    return tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:].upper())


def build_model(run: RunConfig):
    """A small HF Llama over byte tokens, from a config (seeded), in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(run.seed)
    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=run.hidden_size,
                         intermediate_size=run.intermediate_size, num_hidden_layers=run.num_layers,
                         num_attention_heads=run.num_heads, num_key_value_heads=run.num_kv_heads,
                         max_position_embeddings=max(run.seq_len, 128))
    return LlamaForCausalLM(config)


def train(model, tokens: torch.Tensor, *, steps: int, lr: float, run: RunConfig, seed: int, accelerator) -> list[float]:
    """AdamW on the trainable parameters for `steps` batches of `tokens`; returns each step's loss (this process's).

    The model and optimizer go through `accelerator.prepare`, the backward through `accelerator.backward`.
    """
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses = []
    stream = batches(tokens, batch_size=run.batch_size, seq_len=run.seq_len,
                     seed=seed + 1000 * accelerator.process_index, num_batches=steps)
    for inputs, targets in stream:
        inputs, targets = inputs.to(accelerator.device), targets.to(accelerator.device)
        logits = model(input_ids=inputs).logits  # (B, N, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def pretrain(run: RunConfig, *, accelerator) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the base model from scratch on the pretraining text; returns (its state dict on the CPU, losses)."""
    model = build_model(run)
    tokens, _ = corpus_split()
    losses = train(model, tokens, steps=run.pretrain_steps, lr=run.pretrain_lr, run=run, seed=run.seed,
                   accelerator=accelerator)
    state = {k: v.detach().cpu().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return state, losses


def finetune(base_state: dict[str, torch.Tensor], method: str, *, run: RunConfig, accelerator,
             config: LoRAConfig | None = None, lr: float | None = None) -> dict:
    """Fine-tune a copy of the pretrained model on the upper-case text.

    Args:
        base_state: the pretrained weights (pretrain's state dict).
        method: "full", "lora" or "qlora" (QLoRA's base in bf16 then NF4; adapters in fp32).
        config: the adapters (LoRA, QLoRA).  lr: default LEARNING_RATES[method].

    Returns:
        {"method", "r", "losses", "trainable", "total"}.
    """
    if method not in LEARNING_RATES:
        raise ValueError(f"method must be one of {sorted(LEARNING_RATES)}, got {method!r}")
    if method != "full" and config is None:
        raise ValueError(f"method {method!r} needs a LoRAConfig")
    model = build_model(run)
    model.load_state_dict(copy.deepcopy(base_state))
    if method == "lora":
        apply_lora(model, config=config)
    elif method == "qlora":
        # NF4 needs in_features divisible by its block: 64 here
        apply_qlora(model.to(torch.bfloat16), config=dataclasses.replace(config, adapter_dtype=torch.float32))
    trainable, total = count_parameters(model)
    _, tokens = corpus_split()
    losses = train(model, tokens, steps=run.finetune_steps, lr=lr or LEARNING_RATES[method], run=run,
                   seed=run.seed + 1, accelerator=accelerator)
    return {"method": method, "r": 0 if config is None else config.r, "losses": losses, "trainable": trainable,
            "total": total}


# -----------------------------------------------------------------------------
# Command line (accelerate launch)


def parse_method(text: str) -> tuple[str, int]:
    """"full", "lora:8" or "qlora:8" -> (method, rank)."""
    method, _, rank = text.partition(":")
    if method not in LEARNING_RATES or (method != "full" and not rank.isdigit()):
        raise argparse.ArgumentTypeError(f"expected full, lora:R or qlora:R, got {text!r}")
    return method, int(rank or 0)


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", type=parse_method, default=[parse_method(m) for m in
                                                                               ("full", "lora:1", "lora:4", "lora:16")])
    parser.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    parser.add_argument("--pretrain-steps", type=int, default=RunConfig.pretrain_steps)
    parser.add_argument("--steps", type=int, default=RunConfig.finetune_steps, help="fine-tuning steps")
    parser.add_argument("--out", type=Path, default=None, help="directory for finetune.json")
    args = parser.parse_args(argv)
    accelerator = Accelerator()
    run = RunConfig(pretrain_steps=args.pretrain_steps, finetune_steps=args.steps)
    targets = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))

    base_state, pretrain_losses = pretrain(run, accelerator=accelerator)
    accelerator.print(f"pretrained {run.pretrain_steps} steps: loss {pretrain_losses[0]:.3f} -> "
                      f"{pretrain_losses[-1]:.3f}" if pretrain_losses else "no pretraining")
    results = []
    for method, rank in args.methods:
        config = None if method == "full" else LoRAConfig(r=rank, alpha=2 * rank, target_modules=targets)
        result = finetune(base_state, method, run=run, accelerator=accelerator, config=config)
        results.append(result)
        losses = result["losses"]
        accelerator.print(f"{method:>5} r={result['r']:<3} trainable {result['trainable']:>8,d} of "
                          f"{result['total']:,d}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} "
                          "(mean of the last 5 steps)")
    if args.out and accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "finetune.json").write_text(json.dumps(
            {"run": run.__dict__, "pretrain_losses": pretrain_losses, "finetune": results,
             "processes": accelerator.num_processes}, indent=1))


if __name__ == "__main__":
    main()
