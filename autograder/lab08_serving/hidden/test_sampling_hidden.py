"""Lab 08 hidden tests (sampling): a sharper temperature and a tighter nucleus."""

import pytest
import torch


@pytest.mark.points(1)
def test_cold_temperature_and_small_nucleus(student):
    from autograder.lab08_serving.test_sampling import draws, _nucleus_expected

    logits = [0.2, 1.0, 0.9, -0.4, 0.95, 0.3, 0.0]
    tokens = student.run(draws, logits, dict(temperature=0.3, top_p=0.5), 2000, 77)
    probs = torch.softmax(torch.tensor([logits], dtype=torch.float64) / 0.3, dim=-1)
    allowed = set(torch.nonzero(_nucleus_expected(probs, 0.5)[0]).flatten().tolist())
    assert set(tokens) == allowed, f"drew tokens {sorted(set(tokens))}, the nucleus is {sorted(allowed)}"


@pytest.mark.points(1)
def test_nucleus_of_random_rows(student):
    from autograder.lab08_serving.test_sampling import _nucleus_expected, nucleus

    generator = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(6, 40, generator=generator, dtype=torch.float64) * 1.5, dim=-1)
    got = student.run(nucleus, probs, 0.83)
    assert torch.allclose(got, _nucleus_expected(probs, 0.83), rtol=0, atol=1e-12), "top_p_filter(random rows, 0.83)"
