"""Rank functions the lab notebook runs with common.launch.run_distributed (spawned processes cannot import functions
defined in a notebook). Each returns plain data for the notebook to plot; none of them is graded.

    from common.launch import run_distributed
    timelines = run_distributed(pipeline_timelines, world_size=2, args=(8,))
"""

from __future__ import annotations

import torch

from common.data import get_batch, load_corpus
from common.mesh import build_mesh
from common.model import ModelConfig, Transformer

from .pipeline import PipelineConfig, PipelineRuntime, PipelineStage
from .pipetransformer import ElasticPipeline, PipeTransformerConfig
from .sharding import apply_tensor_parallel


def _batch(batch_size: int, seq_len: int, step: int):
    return get_batch(load_corpus(max_tokens=50_000), batch_size=batch_size, seq_len=seq_len, seed=step)


def tensor_parallel_training(info, steps: int, lr: float = 0.3) -> list[float]:
    """SGD on the tiny model, tensor-parallel over every rank (world 1: the plain model): the loss at each step."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=64))
    if info.world_size > 1:
        model = apply_tensor_parallel(model, tp_group=build_mesh(tp=info.world_size).tp_group)
    losses = []
    for step in range(steps):
        loss = model.loss(*_batch(8, 32, step))
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= lr * param.grad
                param.grad = None
        losses.append(loss.item())
    return losses


def pipeline_timelines(info, num_microbatches: int, blocks_per_stage: int = 2, width: int = 128,
                       seq_len: int = 64) -> dict:
    """One warm-up step, then one recorded step, of GPipe and 1F1B over world-size stages: each rank's timeline."""
    torch.manual_seed(0)
    mesh = build_mesh(pp=info.world_size)
    config = ModelConfig(num_layers=blocks_per_stage * info.world_size, width=width, num_heads=4, num_kv_heads=2,
                         max_seq_len=seq_len)
    stage = PipelineStage(Transformer(config), stage_index=mesh.pp_rank, num_stages=mesh.pp_size)
    tokens, targets = _batch(2 * num_microbatches, seq_len, 0)
    out = {}
    for schedule in ("gpipe", "1f1b"):
        runtime = PipelineRuntime(stage, pp_group=mesh.pp_group,
                                  config=PipelineConfig(num_microbatches=num_microbatches, schedule=schedule))
        for _ in range(2):
            stage.zero_grad(set_to_none=True)
            runtime.step(tokens, targets)
        out[schedule] = [(e.kind, e.microbatch, e.start, e.end) for e in runtime.timeline]
    return out


def elastic_training(info, steps: int, freeze_at: int, num_frozen: int, lr: float = 0.3) -> dict:
    """The elastic pipeline over every rank (4 blocks), freezing `num_frozen` blocks at step `freeze_at`: the loss
    (on the last stage) and the dp x pp mesh at each step."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", num_layers=4, max_seq_len=64))
    trainer = ElasticPipeline(model, config=PipeTransformerConfig(num_microbatches=2, lr=lr))
    losses, meshes = [], []
    for step in range(steps):
        if step == freeze_at:
            trainer.freeze(num_frozen)
        tokens, targets = _batch(8, 32, step)
        losses.append(trainer.train_step(tokens, targets, torch.arange(8) + 8 * step))
        meshes.append((trainer.mesh.dp_size, trainer.mesh.pp_size))
    return {"losses": losses, "meshes": meshes}
