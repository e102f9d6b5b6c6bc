"""Measuring memory, time and FLOPs, the same way in every lab, on CPU and GPU.

- Saved activations: autograd keeps every tensor a backward formula needs. `torch.autograd.graph.saved_tensors_hooks`
  sees each one as it is packed, on any device, so counting the bytes it sees measures activation memory without a GPU.
  Parameters (weights saved by matmuls) are not activations and are excluded; a storage saved twice counts once.
- CUDA peak memory: `torch.cuda.max_memory_allocated` around a function (GPU only).
- Wall time: CUDA events on a GPU (the GPU runs asynchronously, so the host clock would lie), `perf_counter` on CPU.
  Reported as the median of repeats after warm-up.
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts what ran; `transformer_train_flops` is the 6 * params *
  tokens rule of thumb (Kaplan et al. 2020, arXiv:2001.08361).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

# -----------------------------------------------------------------------------
# Saved activation bytes


@dataclass
class SavedTensorMeter:
    """Context manager that records every tensor autograd saves for backward.

    Attributes after exit:
        total_bytes: bytes of distinct storages saved (activations only).
        num_tensors: how many saved tensors were seen (including repeats and parameters).

    Example:
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model.loss(x, y)
        print(meter.total_bytes)
    """

    exclude: Iterable[torch.Tensor] = ()
    total_bytes: int = 0
    num_tensors: int = 0
    _seen: set = field(default_factory=set)

    def __post_init__(self) -> None:
        # identify parameters by their storage, since autograd may save a view (weight.t()) rather than the Parameter
        self._excluded = {_storage_key(t) for t in self.exclude}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.num_tensors += 1
        key = _storage_key(tensor)
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.total_bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def saved_activation_bytes(fn: Callable[[], torch.Tensor], *, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of activations autograd saves while `fn()` runs its forward (parameters in `exclude` not counted)."""
    with SavedTensorMeter(exclude=list(exclude)) as meter:
        out = fn()
    del out
    return meter.total_bytes


# -----------------------------------------------------------------------------
# CUDA peak memory


def require_cuda(what: str) -> torch.device:
    """The current CUDA device, or a clear error naming the measurement that needs one."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU, and none is available on this machine")
    return torch.device("cuda", torch.cuda.current_device())


def cuda_peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the GPU while `fn()` runs, above what was allocated before it."""
    require_cuda("cuda_peak_memory")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


# -----------------------------------------------------------------------------
# Wall time


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


def time_fn(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 10, device: str | None = None) -> Timing:
    """Median wall time of `fn()` in milliseconds; CUDA events when `device` is cuda (default: cuda if available)."""
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if use_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(median_ms=statistics.median(times), min_ms=min(times), repeats=repeats)


# -----------------------------------------------------------------------------
# FLOPs


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmul-class ops `fn()` runs (forward and, if `fn` calls backward, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def transformer_train_flops(num_params: int, num_tokens: int) -> int:
    """6 * params * tokens: 2 for the forward multiply-add, 4 for the backward (Kaplan et al. 2020)."""
    return 6 * num_params * num_tokens
