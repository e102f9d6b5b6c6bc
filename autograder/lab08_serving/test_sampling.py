"""Lab 08, part 5: sampling (sampling.py): parameters checked at construction, the nucleus, greedy ties, and the
distribution of sampled tokens against the one computed here.
"""

import math

import pytest
import torch

# -----------------------------------------------------------------------------
# Producers: run in the worker


def make_params(fields: dict) -> dict:
    from lab08_serving.sampling import SamplingParams

    params = SamplingParams(**fields)
    return {name: getattr(params, name) for name in ("n", "temperature", "top_p", "max_tokens", "seed")} | {
        "stop_token_ids": list(params.stop_token_ids)}


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    from lab08_serving.sampling import top_p_filter

    return top_p_filter(probs, top_p)


def draws(logits: list[float], fields: dict, count: int, seed: int) -> list[int]:
    """`count` rows of the same logits, each with its own generator (seed + row)."""
    from lab08_serving.sampling import SamplingParams, sample_next_tokens

    params = SamplingParams(**fields)
    generators = [torch.Generator().manual_seed(seed + row) for row in range(count)]
    return sample_next_tokens(torch.tensor([logits] * count), [params] * count, generators)


def mixed(logits: torch.Tensor, temperatures: list[float], seed: int) -> list[int]:
    from lab08_serving.sampling import SamplingParams, sample_next_tokens

    params = [SamplingParams(temperature=t, top_p=0.9) for t in temperatures]
    generators = [torch.Generator().manual_seed(seed + i) if t > 0 else None for i, t in enumerate(temperatures)]
    return sample_next_tokens(logits, params, generators)


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(1)
@pytest.mark.parametrize("fields", [
    dict(n=1, temperature=0.0, top_p=1.0, max_tokens=1),
    dict(n=3, temperature=0.7, top_p=0.01, max_tokens=9, stop_token_ids=[4, 2], seed=5),
])
def test_valid_params_are_kept(student, fields):
    """The boundaries are valid: temperature 0 (greedy), top_p 1, max_tokens 1, n 1; stop ids become a tuple."""
    got = student.run(make_params, fields)
    for name, value in fields.items():
        assert got[name] == value, f"SamplingParams({fields}).{name} = {got[name]}, expected {value}"


@pytest.mark.points(2)
@pytest.mark.parametrize("fields, name", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.0001), "top_p"), (dict(top_p=-0.5), "top_p"), (dict(temperature=-0.1), "temperature"),
    (dict(n=0), "n"),
])
def test_bad_params_raise(student, fields, name):
    """max_tokens <= 0, top_p outside (0, 1], a negative temperature, n < 1: ValueError naming the field."""
    with pytest.raises(ValueError, match=name):
        student.run(make_params, fields)


def _nucleus_expected(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    out = torch.zeros_like(probs)
    for row in range(probs.shape[0]):
        ranked = sorted(range(probs.shape[1]), key=lambda i: -float(probs[row, i]))
        total = 0.0
        for index in ranked:
            if total >= top_p:
                break
            out[row, index] = probs[row, index]
            total += float(probs[row, index])
    return out / out.sum(dim=-1, keepdim=True)


@pytest.mark.points(2)
@pytest.mark.parametrize("top_p", [0.75, 0.76, 0.1, 1.0, 0.5])
def test_top_p_keeps_the_smallest_nucleus(student, top_p):
    """Tokens enter in order of probability until the kept mass reaches top_p (0.75 is reached exactly by the first
    two of 0.5, 0.25, 0.125, 0.125); rows are independent and renormalised."""
    probs = torch.tensor([[0.125, 0.5, 0.125, 0.25], [0.25, 0.125, 0.5, 0.125]], dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(top_p * 100))
    probs = torch.cat([probs, torch.softmax(torch.randn(3, 4, generator=generator, dtype=torch.float64) * 2, -1)])
    got = student.run(nucleus, probs, top_p)
    expected = _nucleus_expected(probs, top_p)
    assert isinstance(got, torch.Tensor) and got.shape == probs.shape, f"top_p_filter returned {got}"
    assert torch.allclose(got, expected, rtol=0, atol=1e-12), (
        f"top_p_filter(probs, {top_p}):\n{got}\nexpected\n{expected}\nfor probs\n{probs}")


@pytest.mark.points(1)
def test_greedy_takes_the_first_maximum(student):
    """Temperature 0 takes the argmax (the first one on ties), whatever the top_p; sampled rows sit in between."""
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 5.0, 0.0, 9.0]])
    got = student.run(mixed, logits, [0.0, 0.0, 1.0, 0.0], 3)
    assert [got[0], got[1], got[3]] == [1, 0, 3], f"greedy rows gave {[got[0], got[1], got[3]]}, expected [1, 0, 3]"


@pytest.mark.points(3)
@pytest.mark.parametrize("temperature, top_p", [(0.5, 0.9), (2.0, 1.0), (1.0, 0.6)])
def test_sampled_tokens_follow_the_distribution(student, temperature, top_p):
    """3000 draws from softmax(z / T) restricted to the nucleus: no token outside it, and every frequency within
    5 standard deviations of its probability."""
    logits = [1.2, -0.3, 0.8, 2.0, -1.5, 0.1]
    count = 3000
    tokens = student.run(draws, logits, dict(temperature=temperature, top_p=top_p), count, 11)
    probs = torch.softmax(torch.tensor([logits], dtype=torch.float64) / temperature, dim=-1)
    expected = _nucleus_expected(probs, top_p)[0]
    frequencies = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double()
    for token, p in enumerate(expected.tolist()):
        allowed = 5 * math.sqrt(count * p * (1 - p)) + 1
        assert abs(frequencies[token] - count * p) <= allowed, (
            f"temperature {temperature}, top_p {top_p}: token {token} drawn {int(frequencies[token])} times in "
            f"{count}, expected {count * p:.0f} +- {allowed:.0f} (probability {p:.4f})")


@pytest.mark.points(1)
def test_each_row_draws_from_its_own_generator(student):
    """Same seeds, same tokens; the tokens of a row do not depend on the other rows."""
    logits = [0.3, 0.1, 0.2, 0.25, 0.15, 0.0, 0.05]
    first = student.run(draws, logits, dict(temperature=1.0), 40, 100)
    again = student.run(draws, logits, dict(temperature=1.0), 20, 100)
    other = student.run(draws, logits, dict(temperature=1.0), 40, 7)
    assert first[:20] == again, "rows seeded alike drew different tokens: each row must use its own generator"
    assert first != other, "different seeds drew identical tokens in 40 rows"
