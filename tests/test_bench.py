"""The one timing method (common.bench): variants interleaved in rotating order, spreads reported, and a target met
only when the whole spread of the ratio clears it."""

import pytest

from common.bench import Spread, interleaved


def test_variants_are_interleaved_in_rotating_order():
    calls = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    result = interleaved(variants, rounds=4, reps=2, warmup=1, device="cpu")
    warmup, timed = calls[:3], calls[3:]
    assert warmup == ["A", "B", "C"]
    # each round runs every variant `reps` times back to back, in an order that rotates from round to round
    rounds = [timed[i:i + 6] for i in range(0, len(timed), 6)]
    assert [r[::2] for r in rounds] == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    assert result.order == [list("ABC"), list("BCA"), list("CAB"), list("ABC")]
    assert all(len(v) == 4 for v in result.rounds_ms.values())


def test_ratios_are_per_round_and_report_their_spread():
    from common.bench import Interleaved

    result = Interleaved(rounds_ms={"base": [10.0, 20.0, 10.0], "new": [12.0, 22.0, 13.0]}, reps=1)
    ratio = result.ratio("new", "base")
    assert ratio.values == pytest.approx((1.2, 1.1, 1.3))
    assert (ratio.median, ratio.low, ratio.high) == pytest.approx((1.2, 1.1, 1.3))
    assert "new" in result.table() and "x base" in result.table()


@pytest.mark.parametrize("values, target, expected", [
    ([1.10, 1.20, 1.30], 1.35, "met"),
    ([1.30, 1.34, 1.40], 1.35, "inconclusive"),  # the median meets it, the spread straddles it: not met
    ([1.40, 1.50, 1.60], 1.35, "missed"),
])
def test_a_target_is_met_only_when_the_whole_spread_clears_it(values, target, expected):
    assert Spread.of(values).verdict(at_most=target) == expected
    # the same rule for "at least" targets, on the reciprocal ratios
    assert Spread.of([1 / v for v in values]).verdict(at_least=1 / target) == expected


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one variant"):
        interleaved({}, device="cpu")
    with pytest.raises(ValueError, match="rounds"):
        interleaved({"a": lambda: None}, rounds=0, device="cpu")
    with pytest.raises(ValueError, match="exactly one"):
        Spread.of([1.0]).verdict(at_most=1.0, at_least=1.0)
