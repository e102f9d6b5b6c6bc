"""`python -m autograder doctor`: what this machine can grade.

CPU cores, GPUs and their names, whether Triton kernels are compiled or interpreted, and which distributed backends
work. GPU-only tests are "not graded here" on a machine without them, so run this first when a scorecard shows some.
"""

from __future__ import annotations

import os
import platform


def report() -> str:
    import torch
    import torch.distributed as dist

    lines = [f"python        {platform.python_version()} ({platform.machine()})",
             f"torch         {torch.__version__}",
             f"CPU cores     {os.cpu_count()}"]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(gpus))
        lines.append(f"GPUs          {gpus} ({names})")
    else:
        lines.append("GPUs          none: tests marked gpu are 'not graded here'")
    try:
        import triton

        interpreted = os.environ.get("TRITON_INTERPRET", "1" if not gpus else "0") == "1"
        mode = "interpreted (TRITON_INTERPRET=1): kernels run on CPU at small shapes" if interpreted else "compiled"
        lines.append(f"triton        {triton.__version__}, {mode}")
    except ImportError:
        lines.append("triton        not installed: Triton labs cannot be graded")
    backends = []
    if dist.is_available() and dist.is_gloo_available():
        backends.append("gloo (CPU, any world size)")
    if dist.is_available() and dist.is_nccl_available() and gpus:
        backends.append(f"nccl (world sizes up to {gpus})")
    lines.append("distributed   " + (", ".join(backends) or "none"))
    return "\n".join(lines)
