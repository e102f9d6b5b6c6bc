"""Lab 10, part 7: run_plan (execute.py) trains common.model's Transformer under a plan composed from labs 03, 04
and 05, at world 4 on gloo, and must give the loss trajectory one process gives with AdamW (fp64, 3 steps) for every
plan shape: dp, tp, pp and their mixes, ZeRO 1-3, checkpointing and gradient accumulation."""

import pytest
import torch

from autograder.lab10_auto_parallel.workers import LR, train_plans
from common.testing import corpus_batch, tiny_model

STEPS, BATCH, SEQ, LAYERS, SEED = 3, 8, 16, 4, 3


def _single_process() -> list[float]:
    model = tiny_model(num_layers=LAYERS, seed=SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                  foreach=False)
    losses = []
    for step in range(STEPS):
        tokens, targets = corpus_batch(batch_size=BATCH, seq_len=SEQ, seed=SEED + step)
        loss = model.loss(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _check(plans, got):
    want = _single_process()
    for index, plan in enumerate(plans):
        ranks = [rank[index] for rank in got]
        for rank, losses in enumerate(ranks):
            assert isinstance(losses, list) and len(losses) == STEPS, (
                f"run_plan({plan}) on rank {rank} returned {losses!r}, expected {STEPS} losses")
            for step, (a, b) in enumerate(zip(losses, want)):
                assert abs(a - b) <= 1e-9 * abs(b) + 1e-10, (
                    f"run_plan({plan}) rank {rank}: loss at step {step} is {a:.12f}, one process gives {b:.12f} "
                    f"(losses {losses} vs {want})")


SHAPES = [{"dp": 4}, {"tp": 4}, {"pp": 4, "num_microbatches": 2}, {"dp": 2, "tp": 2},
          {"dp": 2, "pp": 2, "num_microbatches": 4}, {"tp": 2, "pp": 2, "num_microbatches": 2}]


@pytest.mark.points(8)
@pytest.mark.time_limit(200)
def test_plan_shapes(student):
    """dp 4, tp 4, pp 4 (m 2), dp 2 x tp 2, dp 2 x pp 2 (m 4), tp 2 x pp 2 (m 2): the same losses as one process on
    every rank, after every step (so the optimizer updated every shard as one process would)."""
    got = student.run(train_plans, SHAPES, world_size=4, num_layers=LAYERS, batch_size=BATCH, seq_len=SEQ,
                      steps=STEPS, seed=SEED)
    _check(SHAPES, got)


MIXES = [{"dp": 4, "zero_stage": 1, "num_microbatches": 2}, {"dp": 4, "zero_stage": 2, "checkpointing": True},
         {"dp": 2, "tp": 2, "zero_stage": 3, "checkpointing": True},
         {"dp": 2, "pp": 2, "num_microbatches": 2, "zero_stage": 1, "checkpointing": True},
         {"dp": 2, "tp": 2, "num_microbatches": 2, "checkpointing": True}]


@pytest.mark.points(4)
@pytest.mark.time_limit(200)
def test_zero_and_checkpointing(student):
    """ZeRO 1 with gradient accumulation, ZeRO 2 and 3 with checkpointing (3 on tp 2 x dp 2), ZeRO 1 on a pipeline,
    tp with checkpointing and accumulation: the same losses as one process."""
    got = student.run(train_plans, MIXES, world_size=4, num_layers=LAYERS, batch_size=BATCH, seq_len=SEQ,
                      steps=STEPS, seed=SEED)
    _check(MIXES, got)


@pytest.mark.points(2)
@pytest.mark.time_limit(200)
def test_errors(student):
    """A plan for 2 ranks on 4, ZeRO 2 with a pipeline, and dp x m not dividing the batch raise ValueError on every
    rank (before any collective, so no rank waits for the others)."""
    plans = [{"dp": 2}, {"dp": 2, "pp": 2, "zero_stage": 2, "num_microbatches": 2}, {"dp": 4, "num_microbatches": 4}]
    got = student.run(train_plans, plans, world_size=4, num_layers=2, batch_size=BATCH, seq_len=SEQ, steps=1,
                      seed=SEED)
    for index, (plan, word) in enumerate(zip(plans, ("2", "ZeRO", "divisible"))):
        for rank, value in enumerate(got):
            assert isinstance(value[index], str) and value[index].startswith("ValueError") and word in value[index], (
                f"run_plan({plan}) at world 4 should raise ValueError mentioning {word!r} on rank {rank}, got "
                f"{value[index]!r}")
