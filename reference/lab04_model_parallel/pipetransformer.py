"""PipeTransformer: freeze the leading blocks once they have converged, cache their output, and give the freed GPUs
to data parallelism.

What it saves: a frozen block needs no backward and no optimizer step, and its output for a given sample never
changes, so it is computed once and cached. The remaining (active) blocks fit on fewer GPUs: the pipeline is
compressed to half as many stages, and the ranks it frees run a second replica of it on the other half of the batch.

He et al. 2021, "PipeTransformer: Automated Elastic Pipelining for Distributed Training of Transformers"
(arXiv:2102.03161), Section 3:

- Freeze rule (Section 3.1). After each evaluation T, with L blocks, L_F of them frozen, and g_l the gradient of
  block l:   L_F <- min(L_F + floor(alpha (L - L_F)),  argmin_{L_F <= l < L} ||g_l|| + 1)
  Gradient norms shrink as a block converges, and the leading blocks converge first; alpha in (0, 1) is the
  threshold that bounds how much of what is still active one decision may freeze.
- Activation cache (Section 3.4): the frozen prefix (embedding and blocks [0, L_F)) runs once per sample, without
  gradients and without dropout; its output is stored by sample id and fed to the first active stage afterwards.
- Elastic pipelining (Sections 3.2-3.3): with p stages of capacity c = ceil(L / p) blocks each, the pipeline is
  halved while the active blocks still fit, ceil((L - L_F) / (p/2)) <= c; the world of W ranks then runs W/p'
  pipelines of p' stages, data-parallel (each on its share of the batch, gradients averaged). At W = 4, freezing 2
  of 4 blocks turns one 4-stage pipeline into 2 pipelines of 2 stages.

The training trajectory does not change: the same batches, the same SGD steps, the same losses as one process that
freezes the same blocks at the same steps (only the floating-point order of the sums moves).

Usage (every rank passes the same full model):
    trainer = ElasticPipeline(model, config=PipeTransformerConfig(num_microbatches=2))
    loss = trainer.train_step(tokens, targets, sample_ids)     # on the last stages; None elsewhere
    trainer.auto_freeze()                                      # the freeze rule; repacks if it freezes
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from common.mesh import build_mesh, mesh_rank
from common.model import Transformer

from .pipeline import PipelineConfig, PipelineRuntime, PipelineStage, partition_blocks

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class PipeTransformerConfig:
    """num_microbatches, schedule: of each pipeline; alpha: the freeze rule's threshold in (0, 1); lr: plain SGD."""

    num_microbatches: int
    schedule: str = "1f1b"
    alpha: float = 0.5
    lr: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"PipeTransformerConfig.alpha must be in (0, 1), got {self.alpha}")
        PipelineConfig(num_microbatches=self.num_microbatches, schedule=self.schedule)  # validates both


# -----------------------------------------------------------------------------
# The freeze rule and the activation cache


def freeze_point(grad_norms: Sequence[float], num_frozen: int, *, alpha: float) -> int:
    """How many leading blocks to freeze, by the paper's rule (module docstring), given each block's gradient norm.

    Args:
        grad_norms: ||g_l|| for l = 0..L-1 (the frozen blocks' entries are ignored).
        num_frozen: L_F, the blocks frozen so far (0 <= L_F < L).
        alpha: the threshold in (0, 1).

    Returns:
        The new L_F, never below the old one (ties in the argmin go to the earliest block).

    Raises:
        ValueError: num_frozen outside [0, L), or alpha outside (0, 1) (naming the values).
    """
    num_blocks = len(grad_norms)
    if not 0 <= num_frozen < num_blocks:
        raise ValueError(f"freeze_point: num_frozen ({num_frozen}) must be in [0, {num_blocks})")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"freeze_point: alpha must be in (0, 1), got {alpha}")
    # BEGIN SOLUTION
    bound = num_frozen + math.floor(alpha * (num_blocks - num_frozen))
    active = list(grad_norms[num_frozen:])
    smallest = num_frozen + active.index(min(active))
    return min(bound, smallest + 1)
    # END SOLUTION


def block_gradient_norms(blocks: Sequence[nn.Module]) -> list[float]:
    """||g_l||: the 2-norm of all the gradients of each block's parameters (0.0 for a block without gradients)."""
    # BEGIN SOLUTION
    norms = []
    for block in blocks:
        squares = [p.grad.double().pow(2).sum() for p in block.parameters() if p.grad is not None]
        norms.append(float(torch.stack(squares).sum().sqrt()) if squares else 0.0)
    return norms
    # END SOLUTION


class FrozenPrefixCache:
    """The frozen prefix's output per sample, computed once: `cache(sample_ids, tokens)` -> (B, N, C).

    Args:
        prefix: tokens (B', N) -> activations (B', N, C), e.g. the embedding and the frozen blocks. It runs under
            no_grad, on the samples not cached yet, in one batch.

    Attributes:
        computed: how many samples the prefix has run on (each sample id once).
    """

    def __init__(self, prefix: Callable[[torch.Tensor], torch.Tensor]):
        self.prefix = prefix
        self.store: dict[int, torch.Tensor] = {}
        self.computed = 0

    def __call__(self, sample_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """sample_ids (B,) int64 (equal ids mean equal token rows); tokens (B, N) -> (B, N, C), no gradient."""
        ids = [int(i) for i in sample_ids]
        # BEGIN SOLUTION
        missing = sorted({i for i in ids if i not in self.store})
        if missing:
            rows = [ids.index(i) for i in missing]
            with torch.no_grad():
                activations = self.prefix(tokens[rows])  # (len(missing), N, C)
            for i, activation in zip(missing, activations):
                self.store[i] = activation.clone()
            self.computed += len(missing)
        return torch.stack([self.store[i] for i in ids])
        # END SOLUTION


def compress_pipeline(num_active_blocks: int, num_stages: int, *, blocks_per_stage: int) -> int:
    """The paper's pipeline compression: halve the number of stages while the active blocks still fit, that is while
    num_stages is even and ceil(num_active_blocks / (num_stages / 2)) <= blocks_per_stage.

    Raises:
        ValueError: num_active_blocks, num_stages or blocks_per_stage < 1 (naming the values).
    """
    if min(num_active_blocks, num_stages, blocks_per_stage) < 1:
        raise ValueError(f"compress_pipeline needs num_active_blocks ({num_active_blocks}), num_stages "
                         f"({num_stages}) and blocks_per_stage ({blocks_per_stage}) >= 1")
    # BEGIN SOLUTION
    while num_stages % 2 == 0 and math.ceil(num_active_blocks / (num_stages // 2)) <= blocks_per_stage:
        num_stages //= 2
    return num_stages
    # END SOLUTION


# -----------------------------------------------------------------------------
# The elastic pipeline


class ElasticPipeline:
    """Trains `model` with every rank of the default group, in dp x pp = world ranks, repacking when it freezes.

    Every rank keeps the full model (the frozen prefix runs on the first stages; at a repack, every parameter is
    broadcast from the rank that trained it). Plain SGD, so no optimizer state moves at a repack.

    Attributes:
        mesh: the current dp x pp mesh (common.mesh.Mesh). num_frozen: L_F. cache: the first stage's
        FrozenPrefixCache (None elsewhere, and before anything is frozen). last_grad_norms: ||g_l|| of the last step.

    Raises:
        ValueError: a world size that is not a power of two or exceeds the number of blocks; tied embeddings (the
            output layer would train the frozen embedding).
    """

    def __init__(self, model: Transformer, *, config: PipeTransformerConfig):
        world, num_blocks = dist.get_world_size(), len(model.blocks)
        if world & (world - 1) or world > num_blocks:
            raise ValueError(f"ElasticPipeline: the world size ({world}) must be a power of two and at most the "
                             f"number of blocks ({num_blocks})")
        if model.config.tie_embeddings:
            raise ValueError("ElasticPipeline: tied embeddings cannot be frozen apart from the output layer")
        self.model, self.config = model, config
        self.blocks_per_stage = math.ceil(num_blocks / world)
        self.num_frozen, self.num_stages = 0, world
        self.last_grad_norms: list[float] = [0.0] * num_blocks
        self._build()

    def _build(self) -> None:
        """The mesh, stage, runtime and cache for the current freeze point."""
        world = dist.get_world_size()
        # BEGIN SOLUTION
        self.num_stages = compress_pipeline(len(self.model.blocks) - self.num_frozen, self.num_stages,
                                            blocks_per_stage=self.blocks_per_stage)
        self.mesh = build_mesh(dp=world // self.num_stages, pp=self.num_stages)
        active = _ActiveSuffix(self.model, self.num_frozen)
        self.stage = PipelineStage(active, stage_index=self.mesh.pp_rank, num_stages=self.num_stages)
        self.runtime = PipelineRuntime(
            self.stage, pp_group=self.mesh.pp_group,
            config=PipelineConfig(num_microbatches=self.config.num_microbatches, schedule=self.config.schedule),
            dp_group=self.mesh.dp_group)
        self.cache = FrozenPrefixCache(self._frozen_prefix) if self.num_frozen and self.stage.is_first else None
        # END SOLUTION

    def train_step(self, tokens: torch.Tensor, targets: torch.Tensor, sample_ids: torch.Tensor) -> float | None:
        """One SGD step on the global batch (the same on every rank): each replica takes its 1/dp share.

        Args:
            tokens, targets: (B, N) int64, B divisible by dp * num_microbatches. sample_ids: (B,) int64.

        Returns:
            The global batch's loss on the ranks of the last stage (averaged over the replicas); None elsewhere.
        """
        dp_size, dp_rank = self.mesh.dp_size, self.mesh.dp_rank
        # BEGIN SOLUTION
        tokens, targets = tokens.chunk(dp_size)[dp_rank], targets.chunk(dp_size)[dp_rank]
        sample_ids = sample_ids.chunk(dp_size)[dp_rank]
        inputs = self.cache(sample_ids, tokens) if self.cache is not None else tokens
        loss = self.runtime.step(inputs, targets)  # gradients averaged over the replicas
        self._record_grad_norms()
        with torch.no_grad():
            for param in self.stage.parameters():
                if param.grad is not None:
                    param -= self.config.lr * param.grad
                    param.grad = None
        if loss is None:
            return None
        dist.all_reduce(loss, group=self.mesh.dp_group)  # the replicas' mean losses, averaged
        return float(loss / dp_size)
        # END SOLUTION

    def auto_freeze(self) -> int:
        """Apply the freeze rule to the last step's gradient norms; freeze (and repack) if it moves. Returns L_F."""
        target = freeze_point(self.last_grad_norms, self.num_frozen, alpha=self.config.alpha)
        if target > self.num_frozen:
            self.freeze(target)
        return self.num_frozen

    def freeze(self, num_frozen: int) -> None:
        """Freeze the embedding and blocks [0, num_frozen), then compress the pipeline and rebuild it."""
        if not self.num_frozen <= num_frozen < len(self.model.blocks):
            raise ValueError(f"freeze: num_frozen ({num_frozen}) must be in [{self.num_frozen}, "
                             f"{len(self.model.blocks)})")
        self.sync_model()
        for module in [self.model.embed, *self.model.blocks[:num_frozen]]:
            module.requires_grad_(False)  # documents the state; the frozen prefix is out of the pipeline anyway
        # BEGIN SOLUTION
        self.num_frozen = num_frozen
        self._build()
        # END SOLUTION

    def sync_model(self) -> None:
        """Broadcast every parameter from the rank that trains it (replica 0's), so every rank holds the current
        full model in self.model."""
        owners = self._owners()
        for name, param in self.model.named_parameters():
            dist.broadcast(param.data, src=owners[name])

    # ---- helpers

    def _frozen_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding and frozen blocks, in eval mode (no dropout, so a sample's output never changes)."""
        prefix = [self.model.embed, *self.model.blocks[:self.num_frozen]]
        modes = [m.training for m in prefix]
        for module in prefix:
            module.eval()
        x = self.model.embed(tokens)
        N = x.shape[1]
        for block in self.model.blocks[:self.num_frozen]:
            x = block(x, self.model.rope_cos[:N], self.model.rope_sin[:N])
        for module, mode in zip(prefix, modes):
            module.train(mode)
        return x

    def _record_grad_norms(self) -> None:
        """||g_l|| of every block, summed over the pipeline (each stage fills in its own blocks)."""
        device = self.model.rope_cos.device  # NCCL reduces only tensors on the GPU
        norms = torch.zeros(len(self.model.blocks), dtype=torch.float64, device=device)
        local = block_gradient_norms(list(self.stage.blocks.values()))
        first = self.num_frozen + self.stage.start
        norms[first:first + len(local)] = torch.tensor(local, dtype=torch.float64, device=device)
        dist.all_reduce(norms, group=self.mesh.pp_group)
        self.last_grad_norms = norms.tolist()

    def _owners(self) -> dict[str, int]:
        """Parameter name -> the global rank of replica 0 that holds its current value."""
        bounds = [(start + self.num_frozen, stop + self.num_frozen)
                  for start, stop in partition_blocks(len(self.model.blocks) - self.num_frozen, self.num_stages)]
        owners = {}
        for name, _ in self.model.named_parameters():
            if name.startswith("blocks."):
                index = int(name.split(".")[1])
                stage = next((s for s, (a, b) in enumerate(bounds) if a <= index < b), 0)  # frozen: anyone
            else:
                stage = 0 if name.startswith("embed.") else self.num_stages - 1
            owners[name] = mesh_rank(dp_rank=0, pp_rank=stage, tp_rank=0, pp=self.num_stages, tp=1)
        return owners


class _ActiveSuffix(nn.Module):
    """The model without its frozen prefix: the first stage's input is the prefix's output (the cache's)."""

    def __init__(self, model: Transformer, num_frozen: int):
        super().__init__()
        self.config = model.config
        self.embed = nn.Identity() if num_frozen else model.embed
        self.blocks = nn.ModuleList(model.blocks[num_frozen:])
        self.norm, self.lm_head = model.norm, model.lm_head
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
