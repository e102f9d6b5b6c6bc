"""Lab 09 hidden tests (MoE decoder): the same ideas on inputs the public tests do not show."""

import pytest
import torch

from common.testing import check_all_close, check_close, corpus_batch, describe


@pytest.mark.points(2)
def test_moe_loss_with_expert_choice(student):
    """moe_loss of a decoder with expert-choice layers: no balancing loss, the z-loss still counts."""
    from autograder.lab09_moe.expected import dense_moe_model, model_loss, model_state
    from autograder.lab09_moe.test_moe_model import loss_of

    config = dict(num_experts=4, top_k=2, ffn_width=16, routing="expert_choice", aux_loss_coef=0.5,
                  z_loss_coef=0.02, backend="torch")
    state = model_state(num_layers=2, num_experts=4, ffn_width=16, seed=13)
    tokens, targets = corpus_batch(batch_size=2, seq_len=9, seed=13)
    got = student.run(loss_of, state, config, tokens, targets)
    model = dense_moe_model(state, num_layers=2, top_k=2, routing="expert_choice")
    loss = model_loss(model, tokens, targets, aux_loss_coef=0.5, z_loss_coef=0.02)
    loss.backward()
    inputs = describe(tokens=tokens, routing="expert_choice")
    check_close(got["loss"], loss.detach(), name="moe_loss with expert choice", inputs=inputs)
    assert got["parts"]["aux"] == 0.0, f"expert choice: parts['aux'] should be 0, got {got['parts']['aux']}"
    check_all_close(got["grads"], {n: p.grad for n, p in model.named_parameters()},
                    name="moe_loss with expert choice (gradients)", inputs=inputs)
