"""Lab 02, part 3c: quantizing every nn.Linear of the model, and perplexity before and after (quantized_model.py)."""

import math

import pytest
import torch
import torch.nn as nn

from common.testing import check_close, describe


@pytest.mark.points(2)
def test_every_linear_is_replaced(make_model):
    """All nn.Linear layers become QuantizedLinear; a Linear tied to the embedding is left alone."""
    from lab02_numerics.quantized_model import QuantConfig, QuantizedLinear, quantize_model

    model = make_model()
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantize_model(model, config=QuantConfig(scheme="int4", group_size=16))
    left = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    replaced = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert not left and sorted(replaced) == sorted(names), f"quantize_model: still nn.Linear: {left}"
    tied = make_model(tie_embeddings=True)
    quantize_model(tied, config=QuantConfig(scheme="int8_channel"))
    assert isinstance(tied.lm_head, nn.Linear) and tied.lm_head.weight is tied.embed.weight, \
        "quantize_model must leave a tied lm_head alone (quantizing it would untie it from the embedding)"


@pytest.mark.points(2)
@pytest.mark.parametrize("scheme", ["int8_tensor", "int8_channel", "int8_zeropoint", "int4", "nf4"])
def test_quantized_model_is_dequantized_model(scheme, make_model, make_batch):
    """The quantized model's logits equal those of a copy whose weights were replaced by deq(q(W))."""
    from lab02_numerics.quantized_model import QuantConfig, QuantizedLinear, quantize_model

    model = make_model()
    tokens, _ = make_batch()
    quantize_model(model, config=QuantConfig(scheme=scheme, group_size=16))  # the tiny MLP has K = 176 = 11 * 16
    got = model(tokens)
    reference = make_model()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantized_weight(torch.float32))
    check_close(got, reference(tokens), name=f"quantize_model({scheme}) logits", inputs=describe(tokens=tokens))
    original = make_model()(tokens)
    drift = (got - original).abs().max().item()
    assert 0 < drift < 0.5, f"quantize_model({scheme}): logits moved by {drift:.3g}; expected a small nonzero change"


@pytest.mark.points(2)
def test_perplexity(make_model):
    """perplexity = exp(mean token NLL) over seeded windows; int8 per channel barely changes it, int4 more."""
    from common.data import batches, load_corpus
    from lab02_numerics.quantized_model import QuantConfig, perplexity, quantize_model

    tokens = load_corpus(max_tokens=20_000)
    model = make_model()
    got = perplexity(model, tokens, seq_len=16, batch_size=2, num_batches=3, seed=5)
    with torch.no_grad():
        nll = [model.loss(x, y, reduction="sum").item() for x, y in
               batches(tokens, batch_size=2, seq_len=16, seed=5, num_batches=3)]
    expected = math.exp(sum(nll) / (3 * 2 * 16))
    assert abs(got - expected) < 1e-4 * expected, f"perplexity: got {got}, expected exp(mean NLL) = {expected}"
    int8 = perplexity(quantize_model(make_model(), config=QuantConfig(scheme="int8_channel")), tokens,
                      seq_len=16, batch_size=2, num_batches=3, seed=5)
    assert abs(int8 - got) < 0.01 * got, f"int8 per-channel perplexity {int8:.4f} vs {got:.4f}: should be within 1%"
