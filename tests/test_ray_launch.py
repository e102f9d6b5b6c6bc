"""common.launch.run_distributed(..., launcher="ray") runs the same ranks as Ray Train workers, with the same results.

Lab 03's DDP rank function (naive and bucketed DDP, two SGD steps, gloo, world size 2) runs once with the local launcher
and once on a local Ray cluster; every tensor the ranks return must be identical.
"""

import sys

import pytest
import torch

from kit_helpers import KIT_ROOT

DDP_ARGS = (["naive", "bucketed:0.001"], 2, 7, False, False, 2)  # variants, steps, seed, subgroups, unused, batch


@pytest.fixture(scope="module")
def ray_cluster():
    from ray_helpers import start_local_ray

    pytest.importorskip("ray.train.torch")
    ray = start_local_ray()
    yield
    if ray is not None:
        ray.shutdown()


@pytest.fixture
def reference_on_path(monkeypatch):
    """The ranks import lab03_data_parallel: put the reference first on sys.path (the ranks receive ours)."""
    monkeypatch.setattr(sys, "path", [str(KIT_ROOT / "reference"), str(KIT_ROOT), *sys.path])


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        return {k: v for key in value for k, v in _flatten(value[key], f"{prefix}{key}/").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}/").items()}
    return {prefix: value}


def test_lab03_ddp_ranks_give_the_same_results_both_ways(ray_cluster, reference_on_path):
    from common.launch import run_distributed

    from autograder.lab03_data_parallel.workers import ddp_rank

    local = run_distributed(ddp_rank, world_size=2, args=DDP_ARGS, backend="gloo", timeout_s=120)
    on_ray = run_distributed(ddp_rank, world_size=2, args=DDP_ARGS, backend="gloo", timeout_s=120, launcher="ray")
    assert len(on_ray) == 2
    local_flat, ray_flat = _flatten(local), _flatten(on_ray)
    assert local_flat.keys() == ray_flat.keys() and any(isinstance(v, torch.Tensor) for v in ray_flat.values())
    for key, value in local_flat.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ray_flat[key]), key
        else:
            assert value == ray_flat[key], key
    # the ranks trained one replica: both ranks end with the same parameters
    for key in (k for k in ray_flat if k.startswith("0/") and "params" in k):
        assert torch.equal(ray_flat[key], ray_flat["1/" + key[2:]]), key


def test_a_failing_rank_raises_with_its_traceback(ray_cluster):
    import operator

    from common.launch import DistributedError, run_distributed

    # operator.truediv(info, 0) raises TypeError: a top-level function every worker can import (one rank: a Ray Train
    # run costs tens of seconds on a loaded 2-core machine)
    with pytest.raises(DistributedError, match=r"rank 0 of 1 raised:(.|\n)*TypeError"):
        run_distributed(operator.truediv, world_size=1, args=(0,), backend="gloo", launcher="ray")


def test_bad_launcher_arguments():
    from common.launch import run_distributed

    with pytest.raises(ValueError, match="launcher must be"):
        run_distributed(print, world_size=1, launcher="slurm")
    with pytest.raises(ValueError, match="need launcher='local'"):
        run_distributed(print, world_size=2, may_die={1}, launcher="ray")
