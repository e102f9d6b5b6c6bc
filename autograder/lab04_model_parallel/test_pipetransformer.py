"""Lab 04, part 7 (challenge): PipeTransformer's freeze rule, activation cache and elastic pipelines
(pipetransformer.py).

The freeze rule, the cache and the compression are pure functions checked on cases written out here; the elastic
pipeline trains at world size 4, freezes, repacks one 4-stage pipeline into 2 pipelines of 2 stages (and later into
4 replicas of 1 stage), and must follow the loss trajectory of one process that freezes the same blocks.
"""

import math

import pytest
import torch

from autograder.lab04_model_parallel.workers import (compressions, elastic, elastic_batch, freeze_points,
                                                     gradient_norms, prefix_cache)
from common.testing import check_close, corpus_batch, describe, tiny_model


def _freeze_rule(norms: list[float], frozen: int, alpha: float) -> int:
    """He et al. 2021, Section 3.1, written out: min(L_F + floor(alpha (L - L_F)), argmin_{l >= L_F} ||g_l|| + 1)."""
    candidates = range(frozen, len(norms))
    smallest = min(candidates, key=lambda l: (norms[l], l))
    return min(frozen + int(alpha * (len(norms) - frozen) // 1), smallest + 1)


def _block_norms(model) -> list[float]:
    out = []
    for block in model.blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        out.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)) if grads else 0.0)
    return out


@pytest.mark.points(3)
def test_freeze_rule(student):
    """freeze_point follows the paper's rule (the alpha bound and the argmin of the active blocks' gradient norms,
    ties to the earliest, frozen entries ignored); bad num_frozen or alpha raise ValueError;
    block_gradient_norms gives each block's gradient 2-norm (0 for a block without gradients)."""
    cases = [([5.0, 4.0, 3.0, 2.0, 1.0, 0.5], 0, 0.5), ([1.0, 5.0, 6.0, 7.0], 0, 0.5),
             ([9.0, 9.0, 0.1, 3.0, 4.0, 5.0, 6.0, 7.0], 1, 0.9), ([3.0, 2.0, 2.0, 5.0], 0, 0.75),
             ([0.0, 0.0, 4.0, 1.0, 3.0], 2, 0.5), ([1.0, 2.0, 3.0, 4.0], 0, 0.2), ([4.0, 3.0, 2.0, 1.0], 3, 0.99),
             ([2.0, 8.0, 1.5, 9.0, 0.7, 3.0, 4.0], 1, 0.6)]
    errors = [([1.0, 2.0], 2, 0.5), ([1.0, 2.0], -1, 0.5), ([1.0, 2.0], 0, 1.0), ([1.0, 2.0], 0, 0.0)]
    got = student.run(freeze_points, cases + errors)
    for (norms, frozen, alpha), value in zip(cases, got):
        want = _freeze_rule(norms, frozen, alpha)
        assert value == want, f"freeze_point({norms}, num_frozen={frozen}, alpha={alpha}) = {value}, expected {want}"
    for (norms, frozen, alpha), value in zip(errors, got[len(cases):]):
        assert isinstance(value, str) and value.startswith("ValueError"), (
            f"freeze_point({norms}, num_frozen={frozen}, alpha={alpha}) should raise ValueError, got {value}")
    norms = student.run(gradient_norms, 6)
    model = tiny_model(num_layers=3, seed=6)
    model.blocks[1].requires_grad_(False)
    model.loss(*corpus_batch(batch_size=2, seq_len=8, seed=6)).backward()
    want = _block_norms(model)
    assert len(norms) == 3 and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(norms, want)), (
        f"block_gradient_norms (block 1 frozen) = {norms}, expected {want}")


@pytest.mark.points(2)
def test_frozen_prefix_cache(student):
    """FrozenPrefixCache runs the prefix once per new sample id, in one batch per call, and returns the prefix's
    output for every id asked (repeats included), without gradient."""
    got = student.run(prefix_cache, 8)
    model = tiny_model(num_layers=2, seed=8)
    tokens, _ = corpus_batch(batch_size=4, seq_len=8, seed=8)
    with torch.no_grad():
        full = model.blocks[0](model.embed(tokens), model.rope_cos[:8], model.rope_sin[:8])
    for call, ids in enumerate(([3, 1, 3, 0], [1, 0, 2, 2])):
        check_close(got["outputs"][call], full[ids], name=f"FrozenPrefixCache call {call + 1} (ids {ids})",
                    inputs=describe(tokens=tokens))
    assert got["computed"] == [3, 4], f"FrozenPrefixCache.computed after the two calls: {got['computed']}, " \
                                      "expected [3, 4] (each distinct sample once)"
    assert got["calls"] == [3, 1], (f"the prefix ran on batches of {got['calls']}; expected one batch of the 3 new "
                                    "samples, then one of the 1 new sample")
    assert got["requires_grad"] == [False, False], "the cached activations must not require gradients"


@pytest.mark.points(2)
def test_compress_pipeline(student):
    """compress_pipeline halves the stages while the active blocks fit (ceil(active / (p/2)) <= capacity, p even);
    sizes < 1 raise ValueError."""
    cases = [(2, 4, 1), (1, 4, 1), (3, 4, 1), (4, 4, 1), (4, 8, 2), (5, 8, 2), (6, 3, 2), (1, 1, 1), (9, 16, 3),
             (2, 2, 1)]
    errors = [(0, 4, 1), (2, 0, 1), (2, 4, 0)]
    got = student.run(compressions, cases + errors)
    for (active, stages, capacity), value in zip(cases, got):
        want = stages
        while want % 2 == 0 and -(-active // (want // 2)) <= capacity:
            want //= 2
        assert type(value) is int and value == want, (
            f"compress_pipeline({active} active blocks, {stages} stages, blocks_per_stage={capacity}) = {value!r}, "
            f"expected the int {want}")
    for case, value in zip(errors, got[len(cases):]):
        assert isinstance(value, str) and value.startswith("ValueError"), (
            f"compress_pipeline{case} should raise ValueError, got {value}")


def single_process_trajectory(plan: dict, seed: int) -> dict:
    """One process, plain SGD, freezing the embedding and the leading blocks at the planned steps; the automatic
    freeze applies the rule to the previous step's block gradient norms."""
    model = tiny_model(num_layers=plan["num_layers"], seed=seed)
    frozen, out = 0, {"losses": [], "norms": [], "frozen": []}
    for step in range(plan["steps"]):
        target = plan["freeze"].get(step)
        if step in plan.get("auto_freeze", ()):
            target = _freeze_rule(out["norms"][-1], frozen, plan["alpha"])
        if target is not None and target > frozen:
            frozen = target
            for module in [model.embed, *model.blocks[:frozen]]:
                module.requires_grad_(False)
        tokens, targets, _ = elastic_batch(step, seed)
        loss = model.loss(tokens, targets)
        loss.backward()
        out["losses"].append(loss.item())
        out["norms"].append(_block_norms(model))
        out["frozen"].append(frozen)
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param -= plan["lr"] * param.grad
                    param.grad = None
    out["params"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    return out


def mesh_sizes(plan: dict, frozen_per_step: list[int], world: int) -> list[tuple[int, int]]:
    capacity, stages, sizes = -(-plan["num_layers"] // world), world, []
    for frozen in frozen_per_step:
        while stages % 2 == 0 and -(-(plan["num_layers"] - frozen) // (stages // 2)) <= capacity:
            stages //= 2
        sizes.append((world // stages, stages))
    return sizes


def check_elastic(got: list, plan: dict, seed: int, world: int) -> None:
    want = single_process_trajectory(plan, seed)
    where = describe(world_size=world, num_layers=plan["num_layers"], freeze=plan["freeze"],
                     auto_freeze=plan.get("auto_freeze"), lr=plan["lr"], batch=(8, 9))
    meshes = mesh_sizes(plan, want["frozen"], world)
    for rank, out in enumerate(got):
        assert out["frozen"] == want["frozen"], (
            f"ElasticPipeline.num_frozen per step on rank {rank}: {out['frozen']}, expected {want['frozen']} "
            f"({where})")
        assert [tuple(m) for m in out["meshes"]] == meshes, (
            f"ElasticPipeline.mesh (dp, pp) per step on rank {rank}: {out['meshes']}, expected {meshes} ({where})")
        for step, (norms, expect) in enumerate(zip(out["norms"], want["norms"])):
            check_close(torch.tensor(norms), torch.tensor(expect), name=f"ElasticPipeline.last_grad_norms at step "
                        f"{step} on rank {rank}", inputs=where, rtol=1e-6, atol=1e-9)
        for name, param in want["params"].items():
            check_close(out["params"][name], param, name=f"parameter {name} after {plan['steps']} steps (rank {rank})",
                        inputs=where)
    for step, loss in enumerate(want["losses"]):
        reported = [out["losses"][step] for out in got if out["losses"][step] is not None]
        dp = meshes[step][0]
        assert len(reported) == dp, (f"step {step}: {len(reported)} ranks returned a loss, expected the last stage "
                                     f"of each of the {dp} pipelines ({where})")
        for value in reported:
            assert math.isclose(value, loss, rel_tol=1e-9), (
                f"ElasticPipeline.train_step at step {step}: loss {value}, one process gives {loss} ({where})")


@pytest.mark.points(5)
@pytest.mark.time_limit(200)
def test_elastic_pipeline_repacks_and_keeps_the_trajectory(student):
    """World 4, 4 blocks, plain SGD: 2 steps as one 4-stage pipeline; freezing 2 blocks repacks it into 2 pipelines
    of 2 stages (data-parallel) fed by the activation cache (8 samples computed once each per first stage over 3
    steps); the rule then freezes a third block and repacks into 4 one-stage replicas. Losses, gradient norms and
    parameters follow one process that freezes the same blocks."""
    plan = {"num_layers": 4, "steps": 6, "freeze": {2: 2}, "auto_freeze": [5], "lr": 0.5, "alpha": 0.5}
    got = student.run(elastic, 4, plan, 51)
    check_elastic(got, plan, 51, 4)
    for rank, out in enumerate(got):
        first_stage = rank in (0, 2)
        expect = 8 if first_stage else None
        assert out["computed"] == expect, (
            f"rank {rank} ({'a first stage' if first_stage else 'not a first stage'} of the 2 x 2 mesh): the frozen "
            f"prefix cache computed {out['computed']} samples over 3 steps of 16 distinct samples split between two "
            f"replicas; expected {expect}")
