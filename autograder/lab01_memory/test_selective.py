"""Lab 01, part 5 (extension): selective activation recomputation (selective.py)."""

import pytest
import torch

from common.measure import SavedTensorMeter
from common.testing import check_all_close, corpus_batch, describe, gradients, tiny_model

CONFIGS = {
    "all": dict(),
    "no norms": dict(norms=False),
    "no attention": dict(attention=False),
    "no activation": dict(activation=False),
    "no loss": dict(loss=False),
}

# -----------------------------------------------------------------------------
# Producers: run in the worker


def selective_run(config: dict, *, num_layers: int, dropout: float, batch: dict, rng_seed: int = 0,
                  overrides: dict | None = None) -> dict:
    """Loss, gradients and saved bytes of the tiny fp64 model under selective recomputation, and how many times each
    piece of every block ran over one forward and backward."""
    import torch.nn.functional as F

    from lab01_memory.selective import SelectiveConfig, apply_selective_recomputation

    model = tiny_model(num_layers=num_layers, dropout=dropout, **(overrides or {}))
    names_before = [name for name, _ in model.named_parameters()]
    planned = apply_selective_recomputation(model, config=SelectiveConfig(**config))
    counts = {"norm": 0, "linear": 0, "attention": 0, "silu": 0, "loss": 0}
    for block in planned.blocks:
        for norm in (block.attn_norm, block.mlp_norm):
            norm.register_forward_hook(lambda *a: counts.__setitem__("norm", counts["norm"] + 1))
        for linear in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj,
                       block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            linear.register_forward_hook(lambda *a: counts.__setitem__("linear", counts["linear"] + 1))
        kernel = block.attn.attention

        def counted(q, k, v, *, causal, kernel=kernel):
            counts["attention"] += 1
            return kernel(q, k, v, causal=causal)

        block.attn.attention = counted
    silu, cross_entropy = F.silu, F.cross_entropy

    def counted_silu(x, *args, **kwargs):
        counts["silu"] += 1
        return silu(x, *args, **kwargs)

    def counted_cross_entropy(*args, **kwargs):
        counts["loss"] += 1
        return cross_entropy(*args, **kwargs)

    tokens, targets = corpus_batch(**batch)
    exclude = list(planned.parameters()) + list(planned.buffers())
    F.silu, F.cross_entropy = counted_silu, counted_cross_entropy
    try:
        torch.manual_seed(rng_seed)
        with SavedTensorMeter(exclude=exclude) as meter:
            loss = planned.loss(tokens, targets)
        loss.backward()
    finally:
        F.silu, F.cross_entropy = silu, cross_entropy
    return {"loss": loss.detach(), "grads": gradients(planned), "saved": meter.total_bytes, "counts": counts,
            "same_model": planned is model, "names": [n for n, _ in planned.named_parameters()],
            "names_before": names_before}


def config_error(config: dict) -> None:
    from lab01_memory.selective import SelectiveConfig

    SelectiveConfig(**config)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _plain(*, num_layers: int, dropout: float, batch: dict, rng_seed: int = 0, overrides: dict | None = None) -> dict:
    model = tiny_model(num_layers=num_layers, dropout=dropout, **(overrides or {}))
    tokens, targets = corpus_batch(**batch)
    exclude = list(model.parameters()) + list(model.buffers())
    torch.manual_seed(rng_seed)
    with SavedTensorMeter(exclude=exclude) as meter:
        loss = model.loss(tokens, targets)
    loss.backward()
    return {"loss": loss.detach(), "grads": gradients(model), "saved": meter.total_bytes}


@pytest.mark.points(3)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_equal_the_plain_model(student, name):
    """Every configuration gives the plain model's loss and gradients exactly (fp64, dropout 0.3: the masks are drawn
    outside the recomputed regions, so nothing needs replaying)."""
    case = dict(num_layers=3, dropout=0.3, batch=dict(batch_size=2, seq_len=12, seed=4), rng_seed=9)
    got = student.run(selective_run, CONFIGS[name], **case)
    want = _plain(**case)
    inputs = describe(config=name, num_layers=3, dropout=0.3, tokens=(2, 12))
    check_all_close({"loss": got["loss"]}, {"loss": want["loss"]}, name="selective recomputation: loss", inputs=inputs)
    check_all_close(got["grads"], want["grads"], name="selective recomputation: gradients", inputs=inputs)
    assert got["names"] == got["names_before"], "apply_selective_recomputation must keep the parameters and names"
    assert got["same_model"], "apply_selective_recomputation must return the model it was given"


@pytest.mark.points(3)
@pytest.mark.parametrize("num_layers, seq_len", [(1, 12), (3, 20)])
def test_saved_bytes_are_exactly_the_kept_tensors(student, num_layers, seq_len):
    """With every region recomputed, a block keeps exactly: its input and the MLP's norm input (the checkpointed norms'
    inputs), the two normalised activations (the projections' inputs), q, k and v (the attention region's inputs),
    the attention output (out_proj's input), gate and up (the activation region's inputs) and the activation (down_proj's
    input): 6 C + 2 C_kv + 3 F values per token. The loss keeps its logits and targets instead of its log-softmax.
    Everything else is as in the plain model."""
    from common.model import token_cross_entropy

    batch = dict(batch_size=2, seq_len=seq_len, seed=1)
    got = student.run(selective_run, {}, num_layers=num_layers, dropout=0.0, batch=batch)
    plain = _plain(num_layers=num_layers, dropout=0.0, batch=batch)["saved"]
    deeper = _plain(num_layers=num_layers + 1, dropout=0.0, batch=batch)["saved"]
    plain_block = deeper - plain  # what one plain block saves (the model outside the blocks cancels out)
    config = tiny_model(num_layers=1).config
    kv_width = config.num_kv_heads * config.head_dim
    kept_block = 2 * seq_len * (6 * config.width + 2 * kv_width + 3 * config.hidden_width) * 8  # fp64
    logits = torch.randn(2, seq_len, config.vocab_size, dtype=torch.float64, requires_grad=True)
    targets = corpus_batch(**batch)[1]
    with SavedTensorMeter() as loss_meter:
        token_cross_entropy(logits, targets)
    loss_saving = loss_meter.total_bytes - logits.nbytes - targets.nbytes
    expected = plain - num_layers * (plain_block - kept_block) - loss_saving
    assert got["saved"] == expected, (
        f"selective recomputation saved {got['saved']} bytes for {num_layers} block(s), tokens (2, {seq_len}); expected "
        f"{expected} (the plain model saves {plain}; off by {got['saved'] - expected:+d} bytes): which tensors does "
        "each region keep?")
    assert got["saved"] < 0.8 * plain, "selective recomputation should keep well under 80% of the plain activations"


@pytest.mark.points(3)
@pytest.mark.parametrize("name, expected", [
    ("all", dict(norm=4, linear=7, attention=2, silu=2, loss=2)),
    ("no norms", dict(norm=2, linear=7, attention=2, silu=2, loss=2)),
    ("no attention", dict(norm=4, linear=7, attention=1, silu=2, loss=2)),
    ("no activation", dict(norm=4, linear=7, attention=2, silu=1, loss=2)),
    ("no loss", dict(norm=4, linear=7, attention=2, silu=2, loss=1)),
])
def test_only_the_cheap_regions_run_twice(student, name, expected):
    """Per block and step: every linear layer runs once (its output is kept); each enabled region (the two norms, the
    attention core, the activation) runs once in forward and once more in backward; a disabled one runs once. The
    loss (once per step) likewise runs twice when recomputed."""
    num_layers = 2
    got = student.run(selective_run, CONFIGS[name], num_layers=num_layers, dropout=0.0,
                      batch=dict(batch_size=1, seq_len=8, seed=2))
    counts = dict(got["counts"])
    loss_calls = counts.pop("loss")
    per_block = {key: value / num_layers for key, value in counts.items()}
    want = {key: float(value) for key, value in expected.items() if key != "loss"}
    assert per_block == want and loss_calls == expected["loss"], (
        f"selective recomputation ({name}): per block and step, the pieces ran {per_block} times and the loss "
        f"{loss_calls} times, expected {want} and {expected['loss']}")


@pytest.mark.points(1)
def test_config_fields_must_be_booleans(student):
    with pytest.raises(TypeError, match="norms"):
        student.run(config_error, dict(norms="yes"))
    with pytest.raises(TypeError, match="activation"):
        student.run(config_error, dict(activation=1))
    with pytest.raises(TypeError, match="loss"):
        student.run(config_error, dict(loss=None))
