"""Lab 03, part 1: ring reduce-scatter, all-gather and all-reduce from send/recv, and the alpha-beta cost model
(collectives.py)."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(6)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_collectives_match_torch(world_size, distributed):
    """On random data of uneven sizes, the ring collectives equal dist.all_reduce / reduce_scatter / all_gather,
    use no collective of torch.distributed, leave their inputs alone, and refuse a shard of the wrong size."""
    from autograder.lab03_data_parallel.workers import ring_worker

    results = distributed(ring_worker, world_size=world_size, args=(7,), timeout_s=90)
    for rank, out in enumerate(results):
        for case in out["cases"]:
            inputs = describe(world_size=world_size, rank=rank, shape=case["shape"], dtype=case["dtype"])
            if not case["input_kept"]:
                raise AssertionError(f"ring_reduce_scatter modified its input tensor ({inputs})")
            for what in ("all_reduce", "all_reduce avg", "all_reduce non-contiguous", "reduce_scatter", "all_gather"):
                got, expected = case[what]
                peer = what.split()[0]
                check_close(got, expected, name=f"ring_{what} against dist.{peer}", inputs=inputs)
        assert out["bad_shard"].startswith("ValueError"), (
            f"ring_all_gather with a 3-element shard for numel {100 * world_size + 1} should raise ValueError on "
            f"rank {rank}, got: {out['bad_shard']}")


@pytest.mark.points(2)
def test_alpha_beta_cost_model():
    """ring_time follows (p-1)·alpha + (p-1)/p·n·beta per pass (two passes for all-reduce), and fit recovers it."""
    from lab03_data_parallel.collectives import AlphaBeta

    model = AlphaBeta(alpha_s=7e-6, beta_s_per_byte=1 / 150e9)
    for p in (1, 2, 3, 8):
        for n in (0, 1000, 12_345_678):
            one_pass = (p - 1) * 7e-6 + (p - 1) / p * n / 150e9
            inputs = describe(world_size=p, nbytes=n)
            for collective, expected in (("reduce_scatter", one_pass), ("all_gather", one_pass),
                                         ("all_reduce", 2 * one_pass)):
                got = model.ring_time(collective, n, p)
                check_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                            name=f"AlphaBeta.ring_time({collective!r})", inputs=inputs)
    sizes = [2**k for k in range(10, 28, 2)]
    times = [model.ring_time("all_reduce", n, 4) for n in sizes]
    fitted = AlphaBeta.fit(sizes, times, world_size=4)
    check_close(torch.tensor([fitted.alpha_s, fitted.beta_s_per_byte], dtype=torch.float64),
                torch.tensor([7e-6, 1 / 150e9], dtype=torch.float64), name="AlphaBeta.fit on exact model times",
                inputs=describe(sizes=len(sizes)), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="collective"):
        model.ring_time("all_to_all", 10, 2)
