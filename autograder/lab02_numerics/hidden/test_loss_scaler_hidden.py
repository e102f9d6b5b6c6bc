"""Lab 02 hidden tests (loss scaler): other factors and intervals, against GradScaler."""

import pytest


@pytest.mark.points(2)
def test_custom_factors_match_gradscaler(student):
    """growth 3x, backoff 0.25, interval 2, NaN and inf overflows mixed in, SGD with momentum: the same trajectory as
    GradScaler."""
    from autograder.lab02_numerics.test_loss_scaler import _compare, _expected, scaler_run

    pattern = [None, None, ("nan", 0), None, None, None, ("inf", 0), ("inf", 0), None, None, None, None, ("nan", 0),
               None]
    config = dict(init_scale=100.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=2)
    options = dict(seed=50, sizes=(4,), optimizer="momentum", lr=0.05, spread=1.0)
    got = student.run(scaler_run, config, pattern, **options)
    _compare(got, _expected(config, pattern, unscale_first=False, clip=None, **options), pattern,
             what="DynamicLossScaler (growth 3, backoff 0.25, interval 2)")


@pytest.mark.points(1)
def test_interval_one_with_unscale_and_overflow_in_every_tensor(student):
    """growth_interval 1 (grow after every clean step), unscale_ before step, overflows in the second of three
    tensors, clipping that binds."""
    from autograder.lab02_numerics.test_loss_scaler import _compare, _expected, scaler_run

    pattern = [None, ("nan", 1), None, ("-inf", 2), ("inf", 1), None, None]
    config = dict(init_scale=2.0**5, growth_factor=4.0, backoff_factor=0.125, growth_interval=1)
    options = dict(seed=60, sizes=(3, 5, 2), optimizer="adam", lr=0.02, spread=1.0, unscale_first=True, clip=0.1)
    got = student.run(scaler_run, config, pattern, **options)
    _compare(got, _expected(config, pattern, **options), pattern, what="DynamicLossScaler (interval 1, unscale_)")
