"""Lab 02, part 3c: quantizing every nn.Linear of the model, and perplexity before and after (quantized_model.py).

The grader quantizes the same model's weights with formulas.py and compares each layer's dequantized weight (a rare
rounding tie may go either way), the logits, and the perplexity it computes itself.
"""

import math

import pytest
import torch
import torch.nn as nn

from common.testing import check_close, corpus_batch, describe, tiny_model

SCHEMES = ["int8_tensor", "int8_channel", "int8_zeropoint", "int4", "nf4"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -----------------------------------------------------------------------------
# Producers: run in the worker


def quantized(scheme: str, group_size: int | None = None, *, seed: int = 0, tied: bool = False,
              dtype: str = "float32", ffn_width: int | None = None) -> dict:
    """quantize_model on the tiny model: which modules were replaced, each layer's W', and the logits."""
    from lab02_numerics.quantized_model import QuantConfig, QuantizedLinear, quantize_model

    model = tiny_model(num_layers=2, seed=seed, dtype=DTYPES[dtype], tie_embeddings=tied, ffn_width=ffn_width)
    config = QuantConfig(scheme=scheme) if group_size is None else QuantConfig(scheme=scheme, group_size=group_size)
    returned = quantize_model(model, config=config)
    tokens, _ = corpus_batch(batch_size=2, seq_len=16)
    with torch.no_grad():
        logits = model(tokens)
    layers_out = {name: {"fp32": m.dequantized_weight(torch.float32), "default": m.dequantized_weight()}
                  for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    return {"same_model": returned is model, "logits": logits, "layers": layers_out,
            "linear_left": sorted(name for name, m in model.named_modules() if isinstance(m, nn.Linear)),
            "lm_head_tied": isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.embed.weight}


def ppl(*, scheme: str | None = None, dropout: float = 0.0, train_mode: bool = False, seq_len: int = 16,
        batch_size: int = 2, num_batches: int = 3, seed: int = 5, seed_arg: bool = True) -> dict:
    """perplexity of the tiny model (optionally quantized, with dropout, left in train mode)."""
    from common.data import load_corpus
    from lab02_numerics.quantized_model import QuantConfig, perplexity, quantize_model

    model = tiny_model(num_layers=2, dropout=dropout, dtype=torch.float32)
    if scheme is not None:
        quantize_model(model, config=QuantConfig(scheme=scheme))
    model.train(train_mode)
    tokens = load_corpus(max_tokens=20_000)
    kwargs = dict(seq_len=seq_len, batch_size=batch_size, num_batches=num_batches)
    value = perplexity(model, tokens, seed=seed, **kwargs) if seed_arg else perplexity(model, tokens, **kwargs)
    return {"ppl": float(value), "training": model.training, "modes": sorted({m.training for m in model.modules()})}


# -----------------------------------------------------------------------------
# Tests: run in the grader


def expected_weight(w: torch.Tensor, scheme: str, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' in float64, the grid step per element) of the documented scheme, from formulas.py."""
    from autograder.lab02_numerics import formulas as f

    if scheme in ("int8_tensor", "int8_channel"):
        scale = f.absmax_scale(w, per_channel=scheme == "int8_channel").float().double()
        return torch.clamp(torch.round(w.double() / scale), -127, 127) * scale, scale.expand_as(w)
    if scheme == "int8_zeropoint":
        scale, low = f.zeropoint_scale(w, per_channel=True)
        zero = -128.0 - torch.round(low / scale)
        codes = torch.clamp(torch.round(w.double() / scale) + zero, -128, 127)
        return (codes - zero) * scale, scale.expand_as(w)
    if scheme == "int4":
        codes, scales = f.int4_encode(w, group_size)
        per_column = scales.double().repeat_interleave(group_size, dim=1)
        return codes.double() * per_column, per_column
    index, scales = f.nf4_encode(w, group_size)
    stored = f.double_quant(scales, 256)
    c1 = f.double_dequant(stored["q"], stored["second"], stored["mean"], 256).reshape(scales.shape)
    per_column = c1.repeat_interleave(group_size, dim=1)
    return f.nf4_levels()[index] * per_column, 0.31 * per_column  # 0.31: the widest gap between NF4 levels


def _expected_model(scheme: str, group_size: int, *, seed: int = 0, tied: bool = False, dtype=torch.float32,
                    ffn_width: int | None = None):
    """The tiny model with every (untied) Linear weight replaced by the grader's W'; and W' per layer."""
    model = tiny_model(num_layers=2, seed=seed, dtype=dtype, tie_embeddings=tied, ffn_width=ffn_width)
    weights = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not (tied and module is model.lm_head):
                weights[name] = expected_weight(module.weight.float(), scheme, group_size)
                module.weight.copy_(weights[name][0].to(dtype))
    return model, weights


def _linear_names(*, tied: bool = False) -> list[str]:
    model = tiny_model(num_layers=2, tie_embeddings=tied)
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and not (tied and m is model.lm_head))


@pytest.mark.points(2)
def test_every_linear_is_replaced(student):
    """All nn.Linear layers become QuantizedLinear and the same model is returned; a Linear tied to the embedding is
    left alone (quantizing it would untie it)."""
    got = student.run(quantized, "int4", 16)
    assert got["same_model"], "quantize_model must return the model it was given (replaced in place)"
    assert not got["linear_left"] and sorted(got["layers"]) == _linear_names(), \
        f"quantize_model: still nn.Linear: {got['linear_left']}; QuantizedLinear: {sorted(got['layers'])}"
    got = student.run(quantized, "int8_channel", tied=True)
    assert got["lm_head_tied"], "quantize_model must leave a tied lm_head alone (quantizing it would untie it " \
                                "from the embedding)"
    assert sorted(got["layers"]) == _linear_names(tied=True), \
        f"quantize_model with tied embeddings replaced {sorted(got['layers'])}, expected every other Linear"


@pytest.mark.points(2)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_is_dequantized_model(student, scheme):
    """Each layer's W' is the scheme's quantization of its weight (group size 16 for int4 and nf4, whose blocks are
    then 16), and the logits are those of the model with W' in place of W."""
    tokens, _ = corpus_batch(batch_size=2, seq_len=16)
    got = student.run(quantized, scheme, 16)
    reference, weights = _expected_model(scheme, 16)
    inputs = describe(tokens=tokens, scheme=scheme, group_size=16)
    from autograder.lab02_numerics.formulas import count_code_flips

    assert sorted(got["layers"]) == sorted(weights), f"quantize_model({scheme}) replaced {sorted(got['layers'])}"
    for name, (want, step) in weights.items():
        layer = got["layers"][name]
        assert layer["fp32"].dtype == torch.float32, f"{name}.dequantized_weight(torch.float32) is {layer['fp32'].dtype}"
        assert layer["default"].dtype == torch.float32, \
            f"{name}.dequantized_weight() must default to the original weight's dtype (float32)"
        count_code_flips(layer["fp32"], want, step=step, what=f"quantize_model({scheme}): {name}.dequantized_weight")
    with torch.no_grad():
        expected = reference(tokens)
    check_close(got["logits"], expected, name=f"quantize_model({scheme}) logits", inputs=inputs,
                atol=1e-4 * float(expected.abs().max()))
    with torch.no_grad():
        original = tiny_model(num_layers=2)(tokens)
    drift = (got["logits"] - original).abs().max().item()
    assert 0 < drift < 0.5, f"quantize_model({scheme}): logits moved by {drift:.3g}; expected a small nonzero change"


@pytest.mark.points(2)
@pytest.mark.parametrize("scheme, group_size", [("int4", 32), ("nf4", 32), ("int4", None), ("nf4", None)])
def test_group_size_reaches_the_layers(student, scheme, group_size):
    """QuantConfig.group_size is int4's P and NF4's block size: 32, and the default 64 (on a tiny model whose MLP is
    192 wide, so both divide every K), each layer's W' as the grader quantizes it."""
    from autograder.lab02_numerics.formulas import count_code_flips

    got = student.run(quantized, scheme, group_size, seed=3, ffn_width=192)
    _, weights = _expected_model(scheme, group_size or 64, seed=3, ffn_width=192)
    assert sorted(got["layers"]) == sorted(weights), f"quantize_model({scheme}) replaced {sorted(got['layers'])}"
    for name, (want, step) in weights.items():
        count_code_flips(got["layers"][name]["fp32"], want, step=step,
                         what=f"quantize_model({scheme}, group_size={group_size or 64}): {name}.dequantized_weight")


@pytest.mark.points(1)
def test_bf16_model_keeps_its_dtype(student):
    """A bf16 model quantized to int4: dequantized_weight() defaults to bf16 and the logits stay bf16, equal to the
    bf16 model with W' in place."""
    tokens, _ = corpus_batch(batch_size=2, seq_len=16)
    got = student.run(quantized, "int4", 16, dtype="bfloat16")
    reference, _ = _expected_model("int4", 16, dtype=torch.bfloat16)
    assert got["logits"].dtype == torch.bfloat16, f"logits of the quantized bf16 model are {got['logits'].dtype}"
    for name, layer in got["layers"].items():
        assert layer["default"].dtype == torch.bfloat16, f"{name}.dequantized_weight() is {layer['default'].dtype}, " \
                                                         "expected the original bfloat16"
    with torch.no_grad():
        expected = reference(tokens)
    check_close(got["logits"], expected, name="quantize_model(int4) on a bf16 model: logits",
                inputs=describe(tokens=tokens), atol=2e-2 * float(expected.float().abs().max()))


def _expected_ppl(*, scheme=None, seq_len=16, batch_size=2, num_batches=3, seed=5, dropout=0.0) -> float:
    from common.data import batches, load_corpus

    tokens = load_corpus(max_tokens=20_000)
    if scheme is None:
        model = tiny_model(num_layers=2, dropout=dropout, dtype=torch.float32)
    else:
        model, _ = _expected_model(scheme, 64)
    model.eval()
    with torch.no_grad():
        nll = [model.loss(x, y, reduction="sum").item() for x, y in
               batches(tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, num_batches=num_batches)]
    return math.exp(sum(nll) / (num_batches * batch_size * seq_len))


@pytest.mark.points(2)
def test_perplexity(student):
    """perplexity = exp(mean token NLL) over the seeded windows (several window shapes and seeds); int8 per channel
    barely changes it."""
    for options in (dict(), dict(seq_len=24, batch_size=3, num_batches=2, seed=9), dict(num_batches=1, seed=0)):
        got = student.run(ppl, **options)
        expected = _expected_ppl(**options)
        assert abs(got["ppl"] - expected) < 1e-5 * expected, \
            f"perplexity({options}): got {got['ppl']}, expected exp(mean NLL) = {expected}"
    got = student.run(ppl, seed_arg=False)
    expected = _expected_ppl(seed=0)
    assert abs(got["ppl"] - expected) < 1e-5 * expected, f"perplexity with the default seed (0): got {got['ppl']}, " \
                                                         f"expected {expected}"
    int8 = student.run(ppl, scheme="int8_channel")
    expected = _expected_ppl(scheme="int8_channel")
    assert abs(int8["ppl"] - expected) < 1e-3 * expected, f"perplexity of the int8 model: {int8['ppl']}, expected " \
                                                          f"{expected}"
    plain = _expected_ppl()
    assert abs(int8["ppl"] - plain) < 0.01 * plain, f"int8 per-channel perplexity {int8['ppl']:.4f} vs {plain:.4f}: " \
                                                    "should be within 1%"


@pytest.mark.points(2)
@pytest.mark.parametrize("train_mode", [True, False])
def test_perplexity_evaluates_in_eval_mode_and_restores_it(student, train_mode):
    """With dropout 0.3, perplexity must evaluate in eval mode (no dropout: the eval-mode value) and leave the model
    in the mode it was in, train or eval, every submodule included."""
    got = student.run(ppl, dropout=0.3, train_mode=train_mode)
    expected = _expected_ppl(dropout=0.3)
    assert abs(got["ppl"] - expected) < 1e-5 * expected, (
        f"perplexity of a model with dropout 0.3 (in {'train' if train_mode else 'eval'} mode): {got['ppl']}, "
        f"expected the eval-mode value {expected}")
    assert got["training"] is train_mode and got["modes"] == [train_mode], (
        f"perplexity left model.training = {got['training']} (submodules {got['modes']}); it must restore "
        f"{train_mode}")
