"""The grader's own statement of lab 10's formulas (imported by the tests, never by the worker): FLOPs, parameters
per device, the step time of a plan on a profile, and the memory per device, each written out from the papers."""

from __future__ import annotations

import math

from common.model import ModelConfig

# Clusters the tests pass to the lab in full (every field overridden), so nothing here depends on profiles.json.
TWO_LEVEL = {"name": "a100-80gb-selene", "gpus_per_node": 4, "num_nodes": 4, "peak_flops": 3.0e14,
             "achievable_fraction": 0.55, "memory_bytes": 4.0e10, "layer_overhead_s": 7e-5,
             "intra": {"alpha": 2e-6, "bandwidth": 2e11}, "inter": {"alpha": 9e-6, "bandwidth": 1.1e10}}
SMALL_CPU = {"name": "cpu-gloo", "gpus_per_node": 8, "num_nodes": 1, "peak_flops": 3.0e10, "achievable_fraction": 1.0,
             "memory_bytes": 1.0e9, "layer_overhead_s": 1e-3,
             "intra": {"alpha": 1e-4, "bandwidth": 1.3e9}, "inter": {"alpha": 1e-4, "bandwidth": 1.3e9}}


def ring(kind: str, n: float, p: int, alpha: float, bw: float) -> float:
    if kind == "p2p":
        return alpha + n / bw
    if p <= 1:
        return 0.0
    factor = 2 if kind == "all_reduce" else 1
    return factor * (p - 1) * (alpha + n / (p * bw))


def group_time(kind: str, n: float, p: int, stride: int, cluster: dict) -> float:
    """The two-level collective on `cluster` (a dict as profiles.json has it)."""
    gpn = cluster["gpus_per_node"]
    intra = (cluster["intra"]["alpha"], cluster["intra"]["bandwidth"])
    inter = (cluster["inter"]["alpha"], cluster["inter"]["bandwidth"])
    g = 1 if stride >= gpn else min(p, gpn // stride)
    k = math.ceil(p / g)
    if kind == "p2p":
        return ring("p2p", n, 2, *(intra if k == 1 else inter))
    if k == 1 or g == 1:
        return ring(kind, n, p, *(intra if k == 1 else inter))
    if kind == "all_reduce":
        return ring("reduce_scatter", n, g, *intra) + ring("all_reduce", n / g, k, *inter) + ring(
            "all_gather", n, g, *intra)
    if "reduce_scatter" == kind:
        return ring("reduce_scatter", n, g, *intra) + ring("reduce_scatter", n / g, k, *inter)
    return ring("all_gather", n / g, k, *inter) + ring("all_gather", n, g, *intra)


def forward_flops(config: ModelConfig, b: int, s: int) -> float:
    C, F, kv = config.width, config.hidden_width, config.num_kv_heads * config.head_dim
    per_token = 2 * (C * C + C * kv + C * kv + C * C + C * F + C * F + F * C)
    return b * s * per_token + 2 * (2 * b * s * s * C)


def head(config: ModelConfig, b: int, s: int) -> float:
    return 2.0 * b * s * config.vocab_size * config.width


def params(config: ModelConfig, tp: int, pp: int, stage: int) -> int:
    C, V, F, D = (config.width, config.vocab_size, config.hidden_width, config.head_dim)
    kv_rows = (config.num_kv_heads // tp if config.num_kv_heads % tp == 0 else 1) * D
    block = 2 * C + 2 * (C * C // tp) + 2 * kv_rows * C + 3 * (F * C // tp)
    sizes = [config.num_layers // pp + (s < config.num_layers % pp) for s in range(pp)]
    total = sizes[stage] * block
    total += (V * C // tp) if stage == 0 else 0
    total += (C + (0 if config.tie_embeddings else V * C // tp)) if stage == pp - 1 else 0
    return total


def step(config: ModelConfig, plan: dict, workload: dict, cluster: dict) -> dict:
    """The step's parts as cost_model.step_time defines them."""
    dp, tp, pp = plan.get("dp", 1), plan.get("tp", 1), plan.get("pp", 1)
    m, zero, ckpt = plan.get("num_microbatches", 1), plan.get("zero_stage", 0), plan.get("checkpointing", False)
    B, s = workload["global_batch"], workload["seq_len"]
    e = workload.get("activation_bytes", 2)
    b = B // (dp * m)
    rate = cluster["peak_flops"] * cluster["achievable_fraction"]
    layer = (4 if ckpt else 3) * forward_flops(config, b, s) / tp / rate + cluster.get("layer_overhead_s", 0.0)
    out = 3 * head(config, b, s) / tp / rate
    sizes = [config.num_layers // pp + (i < config.num_layers % pp) for i in range(pp)]
    stage_compute = [n * layer + (out if i == pp - 1 else 0.0) for i, n in enumerate(sizes)]
    compute = max(stage_compute)
    A = b * s * config.width * e
    tp_part = max(sizes) * (6 if ckpt else 4) * group_time("all_reduce", A, tp, 1, cluster)
    pp_part = 2 * group_time("p2p", A, pp, tp, cluster) if pp > 1 else 0.0
    slot = compute + tp_part + pp_part
    psi = max(params(config, tp, pp, i) for i in range(pp))
    G, P = psi * workload.get("grad_bytes", 2), psi * workload.get("param_bytes", 2)
    if dp == 1:
        dp_part = 0.0
    elif zero == 0:
        dp_part = group_time("all_reduce", G, dp, tp * pp, cluster)
    elif zero < 3:
        dp_part = group_time("reduce_scatter", G, dp, tp * pp, cluster) + group_time("all_gather", P, dp, tp * pp,
                                                                                      cluster)
    else:
        dp_part = m * (group_time("reduce_scatter", G, dp, tp * pp, cluster)
                       + 2 * group_time("all_gather", P, dp, tp * pp, cluster))
    return {"compute": m * compute, "tp_comm": m * tp_part, "pp_comm": m * pp_part, "dp_comm": dp_part,
            "bubble": (pp - 1) * slot, "total": (m + pp - 1) * slot + dp_part}


def block_bytes(config: ModelConfig, b: int, s: int, tp: int, e: int) -> float:
    kv = (config.num_kv_heads // tp if config.num_kv_heads % tp == 0 else 1) * config.head_dim
    replicated = 4 * config.width + 2 + 2 * kv
    split = (5 * config.width + 4 * config.hidden_width + config.num_heads) / tp
    return b * s * e * (replicated + split)


def memory(config: ModelConfig, plan: dict, workload: dict) -> dict:
    """memory_model.memory_per_device's parts."""
    dp, tp, pp = plan.get("dp", 1), plan.get("tp", 1), plan.get("pp", 1)
    m, zero, ckpt = plan.get("num_microbatches", 1), plan.get("zero_stage", 0), plan.get("checkpointing", False)
    b, s = workload["global_batch"] // (dp * m), workload["seq_len"]
    e = workload.get("activation_bytes", 2)
    psi = max(params(config, tp, pp, i) for i in range(pp))
    kp, kg, ko = workload.get("param_bytes", 2), workload.get("grad_bytes", 2), workload.get("optimizer_bytes", 12)
    states = {"params": kp * psi / (dp if zero >= 3 else 1), "grads": kg * psi / (dp if zero >= 2 else 1),
              "optimizer": ko * psi / (dp if zero >= 1 else 1)}
    full = block_bytes(config, b, s, tp, e)
    kept = b * s * config.width * e if ckpt else full
    extra = full if ckpt else 0.0
    out = b * s * e * (3 * config.width + 1 + config.vocab_size / tp) + 16 * b * s
    sizes = [config.num_layers // pp + (i < config.num_layers % pp) for i in range(pp)]
    per_stage = [min(pp - i, m) * n * kept + extra + (out if i == pp - 1 else 0.0) for i, n in enumerate(sizes)]
    states["activations"] = max(per_stage)
    states["total"] = sum(states.values())
    return states
