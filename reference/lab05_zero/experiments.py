"""Experiments for the notebook and the deck: what the engines hold and do, measured on this machine.

- `memory_per_rank`: the model-state bytes rank 0 holds after a step of each stage, for several world sizes N, next
  to the paper's formula. It runs in this process as rank 0 of a *fake* group of N (torch's testing process group:
  its collectives do nothing, so the values are meaningless, but every tensor a rank of a real run would allocate
  is allocated), so N = 64 costs no more than N = 1.
- `gather_timeline`: ZeRO-3's gathered parameter bytes at every unit hook of one training step, with and without
  prefetch (same fake group).
- `loss_curves`: the loss of each stage and of single-process training on the same data, on real gloo ranks.

Usage (a notebook cell):
    rows = memory_per_rank([1, 2, 4, 8, 16], config=ModelConfig.preset("small"))
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from common.data import get_batch, load_corpus
from common.model import ModelConfig, Transformer

from .config import ZeROConfig, apply_zero
from .memory import measure_memory, padded_num_params, zero_formula


@contextlib.contextmanager
def fake_rank_zero(world_size: int):
    """This process as rank 0 of a fake process group of `world_size` (no communication happens)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _batch(config: ModelConfig, seed: int, batch_size: int = 2, seq_len: int = 32):
    return get_batch(load_corpus(max_tokens=50_000), batch_size=batch_size, seq_len=min(seq_len, config.max_seq_len),
                     seed=seed)


def memory_per_rank(world_sizes: list[int], *, config: ModelConfig, stages=(1, 2, 3),
                    param_dtype: torch.dtype = torch.bfloat16, offload: bool = False) -> list[dict]:
    """One row per (stage, N): measured MemoryBytes after one step, the formula at the padded Ψ, and ZeRO-3's peak of
    gathered parameters."""
    rows = []
    for world_size in world_sizes:
        with fake_rank_zero(world_size):
            for stage in stages:
                torch.manual_seed(0)
                engine = apply_zero(Transformer(config),
                                    config=ZeROConfig(stage=stage, param_dtype=param_dtype, offload=offload))
                tokens, targets = _batch(config, seed=world_size)
                engine.loss(tokens, targets).backward()
                engine.step()
                psi = padded_num_params(engine)
                rows.append({"stage": stage, "world_size": world_size, "params": psi,
                             "measured": measure_memory(engine),
                             "formula": zero_formula(stage, psi, world_size, offload=offload),
                             "peak_gathered": getattr(engine, "peak_gathered_bytes", 0)})
                del engine
    return rows


def gather_timeline(*, config: ModelConfig, world_size: int = 4, prefetch: bool = True) -> list[tuple[str, int]]:
    """(event, gathered bytes) as each block's forward starts, at each block's first gradient in backward, and at the
    end of a ZeRO-3 step."""
    timeline: list[tuple[str, int]] = []
    with fake_rank_zero(world_size):
        torch.manual_seed(0)
        model = Transformer(config)
        engine = apply_zero(model, config=ZeROConfig(stage=3, param_dtype=torch.bfloat16, prefetch=prefetch))
        for index, block in enumerate(model.blocks):  # registered after the engine's hooks: gathered by now
            block.register_forward_pre_hook(
                lambda m, a, index=index: timeline.append((f"fwd {index}", engine.gathered_bytes)))
            # the block's first gradient in backward (its last matmul in forward)
            block.mlp.down_proj.weight.register_post_accumulate_grad_hook(
                lambda p, index=index: timeline.append((f"bwd {index}", engine.gathered_bytes)))
        tokens, targets = _batch(config, seed=1)
        engine.loss(tokens, targets).backward()
        timeline.append(("after backward", engine.gathered_bytes))
        engine.step()
        timeline.append(("after step", engine.gathered_bytes))
    return timeline


def loss_curves(*, world_size: int = 2, steps: int = 5, config: ModelConfig | None = None) -> dict[str, list]:
    """Losses of ZeRO-1/2/3 on `world_size` gloo ranks and of one process on the whole batch (the same data)."""
    from common.launch import run_distributed

    config = config or ModelConfig.preset("tiny")
    curves = run_distributed(_loss_worker, world_size=world_size, args=(config, steps), timeout_s=300)[0]
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), **_ADAMW)
    single = []
    for step in range(steps):
        tokens, targets = _batch(config, seed=100 + step, batch_size=2 * world_size)
        loss = model.loss(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        single.append(loss.item())
    return {"one process": single, **curves}


_ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def _loss_worker(info, config: ModelConfig, steps: int) -> dict[str, list]:
    curves = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        engine = apply_zero(Transformer(config), config=ZeROConfig(stage=stage, **_ADAMW))
        losses = []
        for step in range(steps):
            tokens, targets = _batch(config, seed=100 + step, batch_size=2 * info.world_size)
            mine = tokens.chunk(info.world_size)[info.rank], targets.chunk(info.world_size)[info.rank]
            loss = engine.loss(*mine)
            loss.backward()
            engine.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / info.world_size)
        curves[f"ZeRO-{stage} on {info.world_size} ranks"] = losses
    return curves
