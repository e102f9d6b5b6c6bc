"""Tile-size sweep: how the fixed block sizes in `fwd_config` and `bwd_config` were chosen (no autotuning at run time).

On a GPU, times the forward at the two benchmark shapes and the backward at the leaderboard shape (and at D = 128) for
a small grid of (block_m, block_n, num_warps, num_stages), within a time budget. A configuration that does not fit
(shared memory or registers) is recorded as failed. The winners are then written into the launchers by hand, with a
comment, and benchmark.json keeps the whole table.

    PYTHONPATH=reference:labs python -m lab07_flash_attention.benchmark --out DIR --tiles
"""

from __future__ import annotations

import time

import torch

from .flash_bwd import BackwardConfig, bwd_config, flash_attn_bwd
from .flash_fwd import KernelConfig, flash_attn_fwd

FWD_GRID = {
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4), (128, 128, 4, 3)],
}
DKDV_GRID = [(64, 128, 8, 2), (32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4), (128, 128, 8, 2),
             (32, 128, 8, 3)]
ATOMIC_GRID = [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)]  # deterministic=False
DQ_GRID = [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2)]


def _config(entry: tuple[int, int, int, int]) -> KernelConfig:
    block_m, block_n, num_warps, num_stages = entry
    return KernelConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)


def _inputs(B: int, H: int, N: int, D: int):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in range(4)]


def _time(fn) -> float | str:
    """Median ms of fn over 3 rounds of 10 calls (common.bench), or why it failed."""
    from common.bench import interleaved

    try:
        return round(interleaved({"config": fn}, rounds=3, reps=10, warmup=3, device="cuda").time("config").median, 4)
    except Exception as error:  # noqa: BLE001 - a config that does not fit is a result, not a crash
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"


def _best(table: dict) -> str | None:
    timed = {key: ms for key, ms in table.items() if isinstance(ms, float)}
    return min(timed, key=timed.get) if timed else None


def sweep(budget_s: float = 110.0) -> dict:
    """Time each grid entry (causal, bf16); returns {section: {config: ms or 'failed: ...', 'best': config}}."""
    started = time.monotonic()
    results: dict = {}

    def over_budget() -> bool:
        return time.monotonic() - started > budget_s

    for D, shape in ((128, (4, 32, 4096, 128)), (64, (1, 16, 16384, 64))):
        q, k, v, _ = _inputs(*shape)
        table = {}
        for entry in FWD_GRID[D]:
            if over_budget():
                break
            table[str(entry)] = _time(lambda: flash_attn_fwd(q, k, v, causal=True, config=_config(entry)))
        table["best"] = _best(table)
        results[f"fwd D{D} {shape}"] = table
        print(f"  sweep fwd D{D}: {table}")

    for shape in ((1, 16, 16384, 64), (2, 16, 4096, 128)):
        q, k, v, do = _inputs(*shape)
        o, lse = flash_attn_fwd(q, k, v, causal=True)
        default = bwd_config(q)
        table, dkdv_times = {}, {}
        for entry in DKDV_GRID:  # dK/dV kernel, with the default dQ kernel
            if over_budget():
                break
            config = BackwardConfig(dkdv=_config(entry), dq=default.dq)
            dkdv_times[entry] = _time(lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True, config=config))
            table[f"dkdv {entry}"] = dkdv_times[entry]
        timed = {entry: ms for entry, ms in dkdv_times.items() if isinstance(ms, float)}
        dkdv = _config(min(timed, key=timed.get)) if timed else default.dkdv
        for entry in DQ_GRID:  # dQ kernel, with the best dK/dV kernel
            if over_budget():
                break
            config = BackwardConfig(dkdv=dkdv, dq=_config(entry))
            table[f"dq {entry}"] = _time(lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True, config=config))
        for entry in ATOMIC_GRID:  # the non-deterministic variant: dQ by atomics inside the dK/dV kernel
            if over_budget():
                break
            config = BackwardConfig(dkdv=_config(entry), dq=default.dq, deterministic=False)
            table[f"atomic {entry}"] = _time(lambda: flash_attn_bwd(q, k, v, o, lse, do, causal=True, config=config))
        table["best"] = _best(table)
        results[f"bwd {shape}"] = table
        print(f"  sweep bwd {shape}: {table}")
        del q, k, v, do, o, lse
    return results
