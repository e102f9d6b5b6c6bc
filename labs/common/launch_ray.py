"""`run_distributed` on a Ray cluster: the same ranks, started by Ray Train across nodes instead of by forking here.

    results = run_distributed(worker, world_size=8, args=(config,), launcher="ray")   # common.launch

runs `worker(info, *args)` on `world_size` Ray Train workers (`ray.train.torch.TorchTrainer`), one rank per GPU across
the cluster's nodes, or one rank per CPU with gloo when the cluster has fewer GPUs than ranks, and returns their values
in rank order, exactly as the local launcher does. Ray Train places the ranks, sets up the default process group
(`TorchConfig`: NCCL or gloo, MASTER_ADDR on rank 0's node) and reports a failing rank; this module only turns the
caller's function into a Ray Train loop and brings every rank's value back (the loop's own `ray.train.report` keeps
rank 0's metrics alone, so each rank sends its `torch.save` bytes to a small collector actor).

What the ranks need from the caller: its `sys.path` (each rank puts it first, then imports `worker` by module and
name), so the kit's checkout, and the lab under test, must lie at the same path on every node (a shared filesystem or
the same clone). It connects to the running cluster (`ray.init()` already called, or `RAY_ADDRESS`), or starts a local
one. A deadlock is bounded by the process group's timeout (`timeout_s`): the stuck collective raises on its rank.

Fault experiments (`may_die`, `pass_store`) need the local launcher: Ray Train fails the job when a rank exits.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import tempfile
import traceback
import uuid
from typing import Any, Callable

import torch

from common.dist import DistInfo


def run_distributed_ray(worker: Callable[..., Any], *, world_size: int, args: tuple = (), backend: str = "auto",
                        timeout_s: float = 60.0) -> list[Any]:
    """Run `worker(info, *args)` on `world_size` Ray Train workers and return their results, ordered by rank.

    Args:
        worker: a top-level function `(DistInfo, *args) -> picklable`, importable on every node.
        world_size: number of ranks (>= 1), one Ray Train worker each.
        args: extra picklable arguments, the same for every rank.
        backend: "gloo", "nccl" or "auto" (NCCL when the cluster has a GPU per rank).
        timeout_s: the process group's timeout: a collective that waits longer raises.

    Raises:
        ValueError: bad world_size or backend, or a worker that is not importable by name.
        RuntimeError: NCCL requested without a GPU per rank in the cluster.
        DistributedError: a rank raised (the message holds its traceback) or Ray Train failed.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from common.launch import DistributedError

    module, qualname = getattr(worker, "__module__", None), getattr(worker, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        raise ValueError(f"worker {qualname or worker!r} must be a top-level function of an importable module "
                         "(each Ray worker imports it by name)")
    if not ray.is_initialized():
        ray.init(logging_level="ERROR", log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if backend == "auto":
        backend = "nccl" if gpus >= world_size else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'auto', got {backend!r}")
    if backend == "nccl" and gpus < world_size:
        raise RuntimeError(f"NCCL needs one GPU per rank: world_size {world_size}, GPUs in the cluster {gpus}")

    collector = ray.remote(num_cpus=0)(_Collector).remote()
    config = {"module": module, "qualname": qualname, "args": pickle.dumps(tuple(args)), "sys_path": list(sys.path),
              "backend": backend, "collector": collector}
    storage = tempfile.mkdtemp(prefix="slm-ray-train-")  # Ray Train's run folder; nothing is checkpointed
    trainer = TorchTrainer(
        _rank_main,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=world_size, use_gpu=backend == "nccl"),
        torch_config=TorchConfig(backend=backend, timeout_s=max(1, int(timeout_s))),
        run_config=RunConfig(name=f"run_distributed-{uuid.uuid4().hex[:8]}", storage_path=storage),
    )
    try:
        try:
            trainer.fit()
        except Exception as error:  # noqa: BLE001 - Ray Train's failure types differ between its versions
            _, errors = ray.get(collector.results.remote())
            if errors:
                rank = min(errors)
                raise DistributedError(f"rank {rank} of {world_size} raised:\n{errors[rank]}") from None
            raise DistributedError(f"the Ray Train run failed:\n{error}") from None
        values, _ = ray.get(collector.results.remote())
    finally:
        ray.kill(collector)
        shutil.rmtree(storage, ignore_errors=True)
    missing = [rank for rank in range(world_size) if rank not in values]
    if missing:
        raise DistributedError(f"ranks {missing} of {world_size} finished without returning a result")
    return [torch.load(io.BytesIO(values[rank]), weights_only=False) for rank in range(world_size)]


class _Collector:
    """An actor that holds each rank's result bytes or traceback until the caller fetches them."""

    def __init__(self):
        self.values: dict[int, bytes] = {}
        self.errors: dict[int, str] = {}

    def put(self, rank: int, payload: bytes) -> None:
        self.values[rank] = payload

    def error(self, rank: int, text: str) -> None:
        self.errors[rank] = text

    def results(self) -> tuple[dict[int, bytes], dict[int, str]]:
        return self.values, self.errors


def _rank_main(config: dict) -> None:
    """One rank, inside a Ray Train worker: the caller's sys.path, its worker by name, and the result sent back."""
    import importlib

    import ray
    import ray.train
    import ray.train.torch

    sys.path[:0] = [p for p in config["sys_path"] if p not in sys.path]
    # NVLink multicast stays off on shared hosts (docs/gpu.md); NCCL reads it when the first collective makes its
    # communicator, after this line
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.set_num_threads(1)  # ranks on one node share its cores, as with the local launcher
    context = ray.train.get_context()
    rank = context.get_world_rank()
    try:
        worker = importlib.import_module(config["module"])
        for name in config["qualname"].split("."):
            worker = getattr(worker, name)
        device = ray.train.torch.get_device() if config["backend"] == "nccl" else torch.device("cpu")
        info = DistInfo(rank=rank, local_rank=context.get_local_rank(), world_size=context.get_world_size(),
                        backend=config["backend"], device=device)
        value = worker(info, *pickle.loads(config["args"]))
    except BaseException:
        ray.get(config["collector"].error.remote(rank, traceback.format_exc()))
        raise
    buffer = io.BytesIO()
    torch.save(value, buffer)  # bytes, as the local launcher sends them
    ray.get(config["collector"].put.remote(rank, buffer.getvalue()))
