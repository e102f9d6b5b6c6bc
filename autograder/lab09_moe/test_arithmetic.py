"""Lab 09, part 7: MoE arithmetic (arithmetic.py): parameters and active parameters, all-to-all bytes, imbalance."""

import math

import pytest
import torch

# -----------------------------------------------------------------------------
# Producers: run in the worker


def counts_of(preset: str, overrides: dict, moe: dict) -> dict:
    from common.model import ModelConfig
    from lab09_moe.arithmetic import parameter_counts
    from lab09_moe.moe_layer import MoEConfig

    counts = parameter_counts(ModelConfig.preset(preset, **overrides), MoEConfig(**moe))
    return {"total": counts.total, "active": counts.active, "experts": counts.experts}


def built_model_size(overrides: dict, moe: dict) -> int:
    """Parameters of a real tiny decoder converted by apply_moe (checks the formula against the model)."""
    from common.model import ModelConfig, Transformer
    from lab09_moe.moe_layer import MoEConfig
    from lab09_moe.moe_model import apply_moe

    model = apply_moe(Transformer(ModelConfig.preset("tiny", **overrides)), config=MoEConfig(**moe))
    return sum(p.numel() for p in model.parameters())


def bytes_of(kwargs: dict) -> float:
    from lab09_moe.arithmetic import all_to_all_bytes

    return all_to_all_bytes(**kwargs)


def imbalance_of(counts) -> float:
    from lab09_moe.arithmetic import load_imbalance

    return load_imbalance(counts)


# -----------------------------------------------------------------------------
# Tests: run in the grader


def _expected_counts(preset: str, overrides: dict, E: int, k: int, F: int) -> tuple[int, int]:
    """(total, active) from the dense model's own parameter count: swap each MLP (3 C F_dense) for a router and E
    experts, of which a token uses k."""
    from common.model import ModelConfig, Transformer

    config = ModelConfig.preset(preset, **overrides)
    C, L = config.width, config.num_layers
    if preset == "tiny":
        dense = Transformer(config).num_params()
    else:  # count without building the large model: embedding, head, final norm, blocks
        per_block = 2 * C * C + 2 * C * config.num_kv_heads * config.head_dim + 2 * C + 3 * C * config.hidden_width
        dense = config.vocab_size * C * (1 if config.tie_embeddings else 2) + C + L * per_block
    total = dense - L * 3 * C * config.hidden_width + L * (E * C + E * 3 * C * F)
    return total, total - L * (E - k) * 3 * C * F


@pytest.mark.points(3)
@pytest.mark.parametrize("preset,overrides,E,k,F", [("tiny", {}, 8, 2, 128), ("tiny", {"num_layers": 3}, 4, 1, 40),
                                                    ("gpt2", {}, 8, 2, 768), ("tiny", {"tie_embeddings": True},
                                                                              16, 4, 32)])
def test_parameter_counts(student, preset, overrides, E, k, F):
    """total = every parameter (embedding, head unless tied, norms, attention, routers, all experts); active = total
    minus the (E - k) experts per layer a token skips; experts = L E 3 C F."""
    got = student.run(counts_of, preset, overrides, dict(num_experts=E, top_k=k, ffn_width=F))
    total, active = _expected_counts(preset, overrides, E, k, F)
    from common.model import ModelConfig

    config = ModelConfig.preset(preset, **overrides)
    experts = config.num_layers * E * 3 * config.width * F
    what = f"parameter_counts({preset} {overrides}, E={E}, k={k}, F={F})"
    assert (got["total"], got["active"], got["experts"]) == (total, active, experts), (
        f"{what} = total {got['total']}, active {got['active']}, experts {got['experts']}; expected {total}, "
        f"{active}, {experts}")


@pytest.mark.points(1)
def test_parameter_count_matches_the_built_model(student):
    """apply_moe on the tiny decoder builds exactly as many parameters as the formula says."""
    got = student.run(built_model_size, {"num_layers": 3}, dict(num_experts=6, top_k=2, ffn_width=40))
    total, _ = _expected_counts("tiny", {"num_layers": 3}, 6, 2, 40)
    assert got == total, f"apply_moe(tiny, 3 layers, E=6, F=40) has {got} parameters, expected {total}"


@pytest.mark.points(2)
@pytest.mark.parametrize("T,C,k,P,b,backward", [(4096, 2048, 2, 8, 2, False), (1000, 64, 1, 4, 4, True),
                                                (512, 128, 6, 1, 2, False), (0, 64, 2, 2, 2, True),
                                                (333, 96, 3, 3, 1, False), (10, 1, 1, 2, 1, False)])
def test_all_to_all_bytes(student, T, C, k, P, b, backward):
    """Per rank and MoE layer, uniform routing: T k C b (P - 1) / P per all-to-all, 2 in forward, 4 with backward."""
    kwargs = dict(num_tokens=T, width=C, top_k=k, ep_size=P, bytes_per_element=b, backward=backward)
    got = student.run(bytes_of, kwargs)
    want = (4 if backward else 2) * T * k * C * b * (P - 1) / P
    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-9), f"all_to_all_bytes({kwargs}) = {got}, expected {want}"


@pytest.mark.points(1)
@pytest.mark.parametrize("bad", [dict(ep_size=0), dict(width=0), dict(top_k=0), dict(bytes_per_element=0),
                                 dict(num_tokens=-1)])
def test_all_to_all_bytes_refuses_bad_sizes(student, bad):
    """A zero width, k, P or element size, or a negative T: ValueError."""
    with pytest.raises(ValueError, match="positive"):
        student.run(bytes_of, {**dict(num_tokens=10, width=64, top_k=2, ep_size=4, bytes_per_element=2), **bad})


@pytest.mark.points(2)
@pytest.mark.parametrize("counts", [[5, 5, 5, 5], [20, 0, 0, 0], [3, 9, 1, 7, 0], [[4, 4], [6, 2]], [1]])
def test_load_imbalance(student, counts):
    """max / mean of the counts (1 balanced, E collapsed); for (L, E) the mean of the layers' imbalances."""
    rows = counts if isinstance(counts[0], list) else [counts]
    want = sum(max(r) / (sum(r) / len(r)) for r in rows) / len(rows)
    got = student.run(imbalance_of, torch.tensor(counts))
    assert math.isclose(got, want, rel_tol=1e-9), f"load_imbalance({counts}) = {got}, expected {want}"


@pytest.mark.points(1)
@pytest.mark.parametrize("counts", [[0, 0, 0], [[2, 2], [0, 0]]])
def test_load_imbalance_without_tokens_is_an_error(student, counts):
    with pytest.raises(ValueError, match="no token"):
        student.run(imbalance_of, torch.tensor(counts))
