"""Lab 09, part 6: the MoE decoder (moe_model.py): MoE layers in place of the MLPs, the loss with the routers'
losses, and training on the embedded corpus."""

import math

import pytest
import torch

from common.testing import check_all_close, check_close, corpus_batch, describe

# -----------------------------------------------------------------------------
# Producers: run in the worker


def converted(config: dict, num_layers: int, dtype_name: str) -> dict:
    from common.testing import tiny_model
    from lab09_moe.moe_layer import MoEConfig, MoELayer
    from lab09_moe.moe_model import apply_moe, moe_layers

    model = tiny_model(num_layers=num_layers, dtype=getattr(torch, dtype_name))
    returned = apply_moe(model, config=MoEConfig(**config))
    return {"returned_self": returned is model,
            "params": {name: (tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()},
            "mlp_types": [type(block.mlp).__name__ for block in model.blocks],
            "all_moe": all(isinstance(block.mlp, MoELayer) for block in model.blocks),
            "layers_found": len(moe_layers(model))}


def loss_of(state: dict, config: dict, tokens: torch.Tensor, targets: torch.Tensor) -> dict:
    from common.testing import tiny_model
    from lab09_moe.moe_layer import MoEConfig
    from lab09_moe.moe_model import apply_moe, moe_loss

    model = apply_moe(tiny_model(num_layers=2), config=MoEConfig(**config))
    model.load_state_dict(state)
    loss, parts = moe_loss(model, tokens=tokens, targets=targets)
    loss.backward()
    return {"loss": loss.detach(), "parts": parts, "grads": {n: p.grad for n, p in model.named_parameters()}}


def trained(config: dict, steps: int, lr: float) -> dict:
    from common.model import ModelConfig, Transformer
    from lab09_moe.moe_layer import MoEConfig
    from lab09_moe.moe_model import apply_moe, train_moe

    torch.manual_seed(0)
    model = apply_moe(Transformer(ModelConfig.preset("tiny", max_seq_len=32)), config=MoEConfig(**config))
    return train_moe(model, steps=steps, batch_size=8, seq_len=32, lr=lr, seed=0, max_tokens=20_000)


def trained_from(state: dict, config: dict, steps: int, lr: float) -> dict:
    """train_moe from the grader's weights (fp64), a few steps on small batches."""
    from common.testing import tiny_model
    from lab09_moe.moe_layer import MoEConfig
    from lab09_moe.moe_model import apply_moe, train_moe

    model = apply_moe(tiny_model(num_layers=2), config=MoEConfig(**config))
    model.load_state_dict(state)
    return train_moe(model, steps=steps, batch_size=2, seq_len=12, lr=lr, seed=3, max_tokens=20_000)


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(2)
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_apply_moe_replaces_every_mlp(student, dtype_name):
    """Every block's MLP becomes an MoELayer (router.weight (E, C), w_gate_up (E, C, 2F), w_down (E, F, C)) in the
    model's dtype; the dense MLP's weights are gone; everything else is untouched; moe_layers finds them all."""
    from common.testing import tiny_model

    config = dict(num_experts=5, top_k=2, ffn_width=24, backend="torch")
    got = student.run(converted, config, 3, dtype_name)
    dense = tiny_model(num_layers=3)
    want = {name: (tuple(p.shape), f"torch.{dtype_name}") for name, p in dense.named_parameters()
            if ".mlp." not in name}
    for i in range(3):
        want[f"blocks.{i}.mlp.router.weight"] = ((5, 64), f"torch.{dtype_name}")
        want[f"blocks.{i}.mlp.w_gate_up"] = ((5, 64, 48), f"torch.{dtype_name}")
        want[f"blocks.{i}.mlp.w_down"] = ((5, 24, 64), f"torch.{dtype_name}")
    assert got["returned_self"], "apply_moe should convert the model in place and return it"
    assert got["all_moe"], f"apply_moe: the blocks' MLPs are {got['mlp_types']}, expected MoELayer everywhere"
    assert got["params"] == want, (
        "apply_moe: parameters (name: shape, dtype) differ from the expected ones: "
        f"missing {sorted(set(want) - set(got['params']))[:4]}, "
        f"unexpected {sorted(set(got['params']) - set(want))[:4]}, "
        f"different {[n for n in want if n in got['params'] and got['params'][n] != want[n]][:4]}")
    assert got["layers_found"] == 3, f"moe_layers found {got['layers_found']} MoE layers in a 3-block model"


@pytest.mark.points(4)
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_loss_adds_the_routers_losses(student, capacity_factor):
    """moe_loss = cross-entropy + aux_loss_coef * sum of the layers' aux losses + z_loss_coef * sum of their z
    losses; its value, its parts and every gradient (fp64). At capacity factor 0.5 half the assignments are dropped
    and those tokens ride the residual."""
    from autograder.lab09_moe.expected import dense_moe_model, model_loss, model_state

    config = dict(num_experts=4, top_k=2, ffn_width=16, capacity_factor=capacity_factor, aux_loss_coef=0.3,
                  z_loss_coef=0.05, backend="torch")
    state = model_state(num_layers=2, num_experts=4, ffn_width=16, seed=9)
    tokens, targets = corpus_batch(batch_size=2, seq_len=11, seed=9)
    got = student.run(loss_of, state, config, tokens, targets)
    model = dense_moe_model(state, num_layers=2, top_k=2, capacity_factor=capacity_factor)
    loss = model_loss(model, tokens, targets, aux_loss_coef=0.3, z_loss_coef=0.05)
    loss.backward()
    inputs = describe(tokens=tokens, capacity_factor=capacity_factor, aux_loss_coef=0.3, z_loss_coef=0.05)
    check_close(got["loss"], loss.detach(), name="moe_loss (value)", inputs=inputs)
    layers = [block.mlp for block in model.blocks]
    for key, value in (("aux", sum(m.aux for m in layers)), ("z", sum(m.z for m in layers))):
        assert math.isclose(got["parts"][key], float(value), rel_tol=1e-6), (
            f"moe_loss parts[{key!r}] = {got['parts'][key]}, expected {float(value)} (summed over the layers, "
            "before the coefficient)")
    check_all_close(got["grads"], {n: p.grad for n, p in model.named_parameters()}, name="moe_loss (gradients)",
                    inputs=inputs)


@pytest.mark.points(4)
@pytest.mark.time_limit(120)
def test_training_reduces_the_loss(student):
    """train_moe on the embedded corpus (tiny decoder, E = 4, top-2, 15 AdamW steps at lr 1e-2): the cross-entropy
    starts near ln 256 and falls by more than 1.5 nats; it records every step's loss and each layer's counts."""
    steps, k = 15, 2
    config = dict(num_experts=4, top_k=k, ffn_width=32, backend="torch")
    got = student.run(trained, config, steps, 1e-2)
    ce = got["ce"]
    assert len(got["loss"]) == len(ce) == len(got["aux"]) == len(got["counts"]) == steps, (
        f"train_moe recorded {len(got['loss'])} losses and {len(got['counts'])} count tables for {steps} steps")
    assert abs(ce[0] - math.log(256)) < 0.3, f"the first step's cross-entropy {ce[0]:.3f} should be near ln 256"
    final = sum(ce[-5:]) / 5
    assert final < ce[0] - 1.5, (
        f"train_moe: cross-entropy went from {ce[0]:.3f} to {final:.3f} (mean of the last 5 steps); expected a drop "
        "of more than 1.5 nats")
    for step, tables in enumerate(got["counts"]):
        assert len(tables) == 2 and all(len(t) == 4 and sum(t) == 8 * 32 * k for t in tables), (
            f"train_moe: step {step} counts {tables}; expected one list of E = 4 counts per layer summing to "
            f"B * N * k = {8 * 32 * k}")
    assert all(math.isfinite(a) and a > 0 for a in got["aux"]), f"train_moe recorded aux losses {got['aux'][:5]}..."


@pytest.mark.points(2)
def test_train_moe_takes_the_documented_adamw_steps(student):
    """The first 3 steps of train_moe (fp64, batch 2 x 12, seed 3) equal AdamW (betas (0.9, 0.95), no weight decay)
    on moe_loss over the same batches (common.data.batches on the corpus's training split): the recorded total and
    cross-entropy losses of every step."""
    from autograder.lab09_moe.expected import dense_moe_model, model_loss, model_state
    from common.data import batches, load_corpus, split_corpus

    config = dict(num_experts=4, top_k=2, ffn_width=16, aux_loss_coef=0.2, z_loss_coef=0.01, backend="torch")
    state = model_state(num_layers=2, num_experts=4, ffn_width=16, seed=21)
    got = student.run(trained_from, state, config, 3, 1e-2)
    model = dense_moe_model(state, num_layers=2, top_k=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    train, _ = split_corpus(load_corpus(max_tokens=20_000))
    totals = []
    for tokens, targets in batches(train, batch_size=2, seq_len=12, seed=3, num_batches=3):
        loss = model_loss(model, tokens, targets, aux_loss_coef=0.2, z_loss_coef=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(loss.item())
    check_close(torch.tensor(got["loss"], dtype=torch.float64), torch.tensor(totals, dtype=torch.float64),
                name="train_moe (total loss at steps 1..3)", inputs=describe(steps=3, lr=1e-2, batch=(2, 12)))
