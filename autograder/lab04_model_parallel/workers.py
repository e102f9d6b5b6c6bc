"""Producers and rank functions of lab 04's distributed tests.

A producer (called by a test through `student.run`) starts the ranks with `common.launch.run_distributed` inside the
grading worker; each rank imports the code under test inside the rank function, runs it on tensors built from seeds,
and returns plain data (CPU tensors, numbers, strings). The tests rebuild the same inputs in the grader, compute what
is expected with common.model on one process, and compare.

Ranks are spawned processes, so every function they run is a top-level function of this module. Nothing here imports
the lab at module level. Where a test checks traffic, `CollectiveLog` wraps torch.distributed's collectives before
the lab is imported and records every call's size.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist

from common.launch import run_distributed
from common.model import Block, ModelConfig, rope_tables
from common.testing import check_close, corpus_batch, describe, gradients, random_tensor, tiny_model

TIMEOUT_S = 150.0  # per distributed run, below the tests' limits: a deadlock is reported as one (a loaded CPU is slow)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
               "batch_isend_irecv", "all_gather_object", "broadcast_object_list")


# -----------------------------------------------------------------------------
# Shared by the tests and the ranks: the model configurations and where each rank's slice lies


def block_config(case: dict) -> ModelConfig:
    """A one-block model config from a case: {"heads": H, "kv_heads": H_kv, "width": C, "ffn": F or None}."""
    return ModelConfig(num_layers=1, num_heads=case["heads"], num_kv_heads=case["kv_heads"], width=case["width"],
                       ffn_width=case.get("ffn"), max_seq_len=32)


def split_kind(name: str, config: ModelConfig, tp_size: int) -> str:
    """How the tests expect parameter `name` to be laid out: rows, cols, head (K/V copies) or same (replicated)."""
    leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
    if leaf in ("embed", "lm_head", "q_proj", "gate_proj", "up_proj"):
        return "rows"
    if leaf in ("out_proj", "down_proj"):
        return "cols"
    if leaf in ("k_proj", "v_proj"):
        return "rows" if config.num_kv_heads % tp_size == 0 else "head"
    return "same"


def tp_slice(name: str, full: torch.Tensor, config: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of a full parameter that tensor-parallel rank tp_rank holds (the tests' own statement of it)."""
    kind = split_kind(name, config, tp_size)
    if kind == "rows":
        rows = full.shape[0] // tp_size
        return full[tp_rank * rows:(tp_rank + 1) * rows].clone()
    if kind == "cols":
        cols = full.shape[1] // tp_size
        return full[:, tp_rank * cols:(tp_rank + 1) * cols].clone()
    if kind == "head":
        sharing = tp_size // config.num_kv_heads
        D = config.head_dim
        head = tp_rank // sharing
        return full[head * D:(head + 1) * D].clone()
    return full.clone()


# -----------------------------------------------------------------------------
# Recording the collectives


class CollectiveLog:
    """Inside the context, every call of a torch.distributed collective (and point-to-point batch) is recorded as
    (name, bytes, group size) before it runs. Bytes are those of the full-size tensor: an all-gather's output, a
    reduce-scatter's input, each op of a batch_isend_irecv ("isend"/"irecv")."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self.enabled = True

    def __enter__(self) -> "CollectiveLog":
        self.saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        for name, original in self.saved.items():
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(dist, name, original)

    def _wrap(self, name, original):
        @functools.wraps(original)
        def recorded(*args, **kwargs):
            if self.enabled:
                self._record(name, args, kwargs)
            return original(*args, **kwargs)
        return recorded

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        if name == "batch_isend_irecv":
            for op in args[0] if args else kwargs["p2p_op_list"]:
                kind = getattr(op.op, "__name__", str(op.op))
                self.calls.append((kind, op.tensor.numel() * op.tensor.element_size(), 2))
            return
        group = kwargs.get("group")
        if group is None:
            position = {"all_reduce": 2, "broadcast": 2, "all_gather": 2, "reduce_scatter": 3,
                        "all_gather_into_tensor": 2, "reduce_scatter_tensor": 3}.get(name)
            if position is not None and len(args) > position:
                group = args[position]
        size = dist.get_world_size(group)
        first = args[0] if args else next(iter(kwargs.values()), None)
        if name in ("all_gather", "gather") and isinstance(first, (list, tuple)):
            nbytes = sum(t.numel() * t.element_size() for t in first)
        elif name == "reduce_scatter":
            inputs = args[1] if len(args) > 1 else kwargs.get("input_list", [])
            nbytes = sum(t.numel() * t.element_size() for t in inputs)
        elif name == "reduce_scatter_tensor":
            source = args[1] if len(args) > 1 else kwargs["input"]
            nbytes = source.numel() * source.element_size()
        elif isinstance(first, torch.Tensor):
            nbytes = first.numel() * first.element_size()
        else:
            nbytes = 0
        self.calls.append((name, nbytes, size))

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, nbytes, _ in self.calls:
            out[name] = out.get(name, 0) + nbytes
        return out

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


def _grads(module: torch.nn.Module) -> dict:
    return {name: None if p.grad is None else p.grad.detach().cpu().clone() for name, p in module.named_parameters()}


def _error(fn) -> str:
    """Run fn; return "no error" or "<ExceptionClass>: <message>"."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the test reads the class and the message
        return f"{type(error).__name__}: {error}"
    return "no error"


# -----------------------------------------------------------------------------
# Tensor parallelism: the operators and the linear layers


def operator_inputs(seed: int, tp_size: int) -> dict:
    """The tensors of tp_ops_rank, rebuilt by the test in the grader (rank r's are the "*_r" lists)."""
    return {
        "x": random_tensor(3, 5, dtype=torch.float64, seed=seed),
        "f_weights": [random_tensor(3, 5, dtype=torch.float64, seed=seed + 10 + r) for r in range(tp_size)],
        "g_inputs": [random_tensor(3, 5, dtype=torch.float64, seed=seed + 20 + r) for r in range(tp_size)],
        "g_weight": random_tensor(3, 5, dtype=torch.float64, seed=seed + 30),
        "gather_inputs": [random_tensor(2, 3, dtype=torch.float64, seed=seed + 40 + r) for r in range(tp_size)],
        "gather_weight": random_tensor(2, 3 * tp_size, dtype=torch.float64, seed=seed + 50),
        "col_w": random_tensor(5 * tp_size, 6, dtype=torch.float64, seed=seed + 60),
        "col_b": random_tensor(5 * tp_size, dtype=torch.float64, seed=seed + 61),
        "col_x": random_tensor(2, 3, 6, dtype=torch.float64, seed=seed + 62),
        "col_r": random_tensor(2, 3, 5 * tp_size, dtype=torch.float64, seed=seed + 63),
        "row_w": random_tensor(5, 3 * tp_size, dtype=torch.float64, seed=seed + 70),
        "row_b": random_tensor(5, dtype=torch.float64, seed=seed + 71),
        "row_x": random_tensor(2, 3, 3 * tp_size, dtype=torch.float64, seed=seed + 72),
        "row_r": random_tensor(2, 3, 5, dtype=torch.float64, seed=seed + 73),
    }


def tp_ops_rank(info, seed: int) -> dict:
    from lab04_model_parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, copy_to_tp,
                                                      gather_from_tp, reduce_from_tp)

    group, r, t, dev = dist.group.WORLD, info.rank, info.world_size, info.device
    data = {k: ([v.to(dev) for v in value] if isinstance(value, list) else value.to(dev))
            for k, value in operator_inputs(seed, t).items()}
    out: dict = {}
    # f: identity forward, all-reduce backward
    x = data["x"].clone().requires_grad_()
    y = copy_to_tp(x, group)
    out["f_forward"] = y.detach().cpu()
    (y * data["f_weights"][r]).sum().backward()
    out["f_grad"] = x.grad.cpu()
    x = data["x"].clone().requires_grad_()
    copy_to_tp(x, group).sum().backward()  # the incoming gradient is an expanded (stride 0) tensor
    out["f_grad_of_sum"] = x.grad.cpu()
    # g: all-reduce forward, identity backward; the input is not changed
    x = data["g_inputs"][r].clone().requires_grad_()
    y = reduce_from_tp(x, group)
    out["g_forward"], out["g_input_after"] = y.detach().cpu(), x.detach().cpu()
    (y * data["g_weight"]).sum().backward()
    out["g_grad"] = x.grad.cpu()
    # all-gather along the last dim
    x = data["gather_inputs"][r].clone().requires_grad_()
    y = gather_from_tp(x, group)
    out["gather_forward"] = y.detach().cpu()
    (y * data["gather_weight"]).sum().backward()
    out["gather_grad"] = x.grad.cpu()
    # column-parallel, with and without gathering its output
    for gather in (False, True):
        layer = ColumnParallelLinear(6, 5 * t, group=group, gather_output=gather, bias=True).to(dev, torch.float64)
        rows = 5
        with torch.no_grad():
            layer.weight.copy_(data["col_w"][r * rows:(r + 1) * rows])
            layer.bias.copy_(data["col_b"][r * rows:(r + 1) * rows])
        x = data["col_x"].clone().requires_grad_()
        y = layer(x)
        weight = data["col_r"] if gather else data["col_r"][..., r * rows:(r + 1) * rows]
        (y * weight).sum().backward()
        out[f"column gather={gather}"] = {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": layer.weight.grad.cpu(),
                                          "db": layer.bias.grad.cpu()}
    # row-parallel, the input already split
    layer = RowParallelLinear(3 * t, 5, group=group, bias=True).to(dev, torch.float64)
    with torch.no_grad():
        layer.weight.copy_(data["row_w"][:, 3 * r:3 * r + 3])
        layer.bias.copy_(data["row_b"])
    x = data["row_x"][..., 3 * r:3 * r + 3].clone().requires_grad_()
    y = layer(x)
    (y * data["row_r"]).sum().backward()
    out["row"] = {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": layer.weight.grad.cpu(),
                  "db": layer.bias.grad.cpu()}
    out["errors"] = tp_errors_rank(info)
    return out


def tp_ops(world_size: int, seed: int) -> list:
    return run_distributed(tp_ops_rank, world_size=world_size, args=(seed,), timeout_s=TIMEOUT_S)


# -----------------------------------------------------------------------------
# Tensor parallelism: the MLP, the attention and the block


def block_inputs(case: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, r): the block's input (2, 7, C) and the weights of the test's loss sum(block(x) * r)."""
    width = case["width"]
    return (random_tensor(2, 7, width, dtype=torch.float64, seed=seed),
            random_tensor(2, 7, width, dtype=torch.float64, seed=seed + 1))


def full_block(case: dict, seed: int) -> Block:
    """The single-process block of a case, fp64, its weights drawn from `seed` (norm weights not all ones)."""
    from common.model import sdpa_attention

    torch.manual_seed(seed)
    block = Block(block_config(case), sdpa_attention).double()
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.normal_(mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.3)
    return block


def tp_blocks_rank(info, cases: list[dict], seed: int) -> list[dict]:
    from lab04_model_parallel.tensor_parallel import ParallelAttention, ParallelBlock, ParallelSwiGLU

    group, r, t, dev = dist.group.WORLD, info.rank, info.world_size, info.device
    results = []
    for index, case in enumerate(cases):
        config = block_config(case)
        full = full_block(case, seed + index)
        cos, sin = (table.to(dev, torch.float64) for table in rope_tables(config.head_dim, 32, config.rope_theta))
        x0, weight = (tensor.to(dev) for tensor in block_inputs(case, seed + 100 + index))
        case_out = {}
        for part in ("mlp", "attn", "block"):
            with CollectiveLog() as log:
                if part == "mlp":
                    module, source = ParallelSwiGLU(config, group=group), full.mlp
                elif part == "attn":
                    module, source = ParallelAttention(config, group=group), full.attn
                else:
                    module, source = ParallelBlock(config, group=group), full
                module = module.to(dev, torch.float64)
                module.load_state_dict({name: tp_slice(name, p, config, r, t).to(dev)
                                        for name, p in source.state_dict().items()})
                log.calls.clear()
                x = x0.clone().requires_grad_()
                y = module(x) if part == "mlp" else module(x, cos, sin)
                forward_calls = list(log.calls)
                log.calls.clear()
                (y * weight).sum().backward()
                backward_calls = list(log.calls)
            case_out[part] = {"y": y.detach().cpu(), "dx": x.grad.cpu(), "grads": _grads(module),
                              "forward_calls": forward_calls, "backward_calls": backward_calls}
        results.append(case_out)
    return results


def tp_blocks(world_size: int, cases: list[dict], seed: int) -> list:
    return run_distributed(tp_blocks_rank, world_size=world_size, args=(cases, seed), timeout_s=TIMEOUT_S)


def tp_errors_rank(info) -> dict:
    """Shapes the group size does not divide: every rank raises, before any communication."""
    from lab04_model_parallel.tensor_parallel import ColumnParallelLinear, ParallelAttention, ParallelSwiGLU, \
        RowParallelLinear

    group, t = dist.group.WORLD, info.world_size
    bad = 2 * t + 1
    heads = ModelConfig(num_layers=1, num_heads=bad, num_kv_heads=1, width=2 * bad, max_seq_len=8)
    # 12 heads (t divides 12), and a K/V head count that neither divides t nor is divided by it
    kv_heads = next(k for k in (3, 2, 6, 4) if 12 % k == 0 and k % t and t % k)
    kv = ModelConfig(num_layers=1, num_heads=12, num_kv_heads=kv_heads, width=48, max_seq_len=8)
    ffn = ModelConfig(num_layers=1, num_heads=2 * t, num_kv_heads=t, width=8 * t, ffn_width=bad, max_seq_len=8)
    return {
        "column": _error(lambda: ColumnParallelLinear(6, bad, group=group)),
        "row": _error(lambda: RowParallelLinear(bad, 5, group=group)),
        "heads": _error(lambda: ParallelAttention(heads, group=group)),
        "kv_heads": _error(lambda: ParallelAttention(kv, group=group)),
        "ffn": _error(lambda: ParallelSwiGLU(ffn, group=group)),
        "bad": bad, "kv_heads_used": kv.num_kv_heads,
    }


# -----------------------------------------------------------------------------
# Vocabulary parallelism


def vocab_inputs(seed: int, vocab: int) -> dict:
    """Tokens that hit every shard, an embedding table, logits (one case far from zero, where exp overflows
    without the max), targets with ignored positions, and the loss weights."""
    tokens = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(seed))
    tokens[0, :4] = torch.tensor([0, vocab - 1, vocab // 2, vocab // 2 - 1])
    targets = torch.randint(0, vocab, (11,), generator=torch.Generator().manual_seed(seed + 1))
    targets[3], targets[7] = -100, vocab - 1
    targets[1], targets[2], targets[5] = vocab // 2, 0, vocab // 4  # the first ids of shards (t = 2, 4)
    return {"tokens": tokens, "table": random_tensor(vocab, 6, dtype=torch.float64, seed=seed + 2),
            "embed_r": random_tensor(3, 5, 6, dtype=torch.float64, seed=seed + 3),
            "logits": random_tensor(11, vocab, dtype=torch.float64, seed=seed + 4, scale=3.0),
            "loss_r": random_tensor(11, dtype=torch.float64, seed=seed + 5),
            "targets": targets}


def vocab_rank(info, seed: int, vocab: int) -> dict:
    with CollectiveLog() as log:
        from lab04_model_parallel.vocab_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy

        group, r, t, dev = dist.group.WORLD, info.rank, info.world_size, info.device
        data = {k: v.to(dev) for k, v in vocab_inputs(seed, vocab).items()}
        rows = vocab // t
        out: dict = {}
        embed = VocabParallelEmbedding(vocab, 6, group=group).to(dev, torch.float64)
        with torch.no_grad():
            embed.weight.copy_(data["table"][r * rows:(r + 1) * rows])
        y = embed(data["tokens"])
        (y * data["embed_r"]).sum().backward()
        out["embed"] = {"y": y.detach().cpu(), "dw": embed.weight.grad.cpu()}
        for name, dtype, offset in (("fp64", torch.float64, 0.0), ("fp32 far from zero", torch.float32, 500.0)):
            logits = (data["logits"][:, r * rows:(r + 1) * rows] + offset).to(dtype).clone().requires_grad_()
            log.calls.clear()
            losses = vocab_parallel_cross_entropy(logits, data["targets"], group=group)
            (losses * data["loss_r"].to(losses.dtype)).sum().backward()
            out[name] = {"losses": losses.detach().cpu(), "dlogits": logits.grad.cpu(), "calls": list(log.calls)}
        bad = 2 * t + 1
        out["error"] = _error(lambda: VocabParallelEmbedding(bad, 6, group=group))
        out["bad"] = bad
    return out


def vocab(world_size: int, seed: int, vocab_size: int) -> list:
    return run_distributed(vocab_rank, world_size=world_size, args=(seed, vocab_size), timeout_s=TIMEOUT_S)


# -----------------------------------------------------------------------------
# Sharding a checkpoint (no processes)


def sharded_checkpoint(case: dict, tp_size: int) -> list[dict]:
    """Every rank's shard of the same checkpoint, whether a shard aliases it, and whether it was left unchanged."""
    from lab04_model_parallel.sharding import shard_checkpoint

    model = tiny_model(seed=1, **case)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    out = []
    for tp_rank in range(tp_size):
        shards = shard_checkpoint(state, config=model.config, tp_rank=tp_rank, tp_size=tp_size)
        aliased = any(shard.untyped_storage().data_ptr() == state[name].untyped_storage().data_ptr()
                      for name, shard in shards.items())
        untouched = all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
        out.append({"shards": shards, "aliased": aliased, "untouched": untouched})
    return out


def shard_errors(tp_size: int) -> dict:
    from lab04_model_parallel.sharding import shard_parameter

    model = tiny_model(seed=1, vocab_size=4 * tp_size + 2)
    out = {}
    for name in ("embed.weight", "blocks.0.attn.q_proj.weight", "blocks.0.not_a_layer.weight"):
        tensor = model.state_dict().get(name, torch.zeros(3))
        try:
            shard_parameter(name, tensor, config=model.config, tp_rank=0, tp_size=tp_size)
            out[name] = "no error"
        except Exception as error:  # noqa: BLE001
            out[name] = f"{type(error).__name__}: {error}"
    return out


# -----------------------------------------------------------------------------
# The whole tensor-parallel model (sharding.py), data-parallel too, with or without sequence parallelism


def tp_model_rank(info, dp: int, tp: int, cases: list[dict], seed: int, sequence_parallel: bool) -> list[dict]:
    with CollectiveLog() as log:
        from lab04_model_parallel.sharding import TensorParallelConfig, apply_tensor_parallel

        from common.mesh import build_mesh

        mesh = build_mesh(dp=dp, tp=tp)
        results = []
        for index, case in enumerate(cases):
            model = tiny_model(seed=seed + index, **case["model"]).to(info.device)
            tokens, targets = corpus_batch(batch_size=case["batch"], seq_len=case["seq"], seed=seed + index)
            tokens, targets = (t.chunk(dp)[mesh.dp_rank].to(info.device) for t in (tokens, targets))
            if "ignore" in case:
                targets[0, : case["ignore"]] = -100
            parallel = apply_tensor_parallel(model, tp_group=mesh.tp_group,
                                             config=TensorParallelConfig(sequence_parallel=bool(sequence_parallel)))
            log.calls.clear()
            loss = parallel.loss(tokens, targets)
            loss.backward()
            calls = list(log.calls)
            log.enabled = False
            for param in parallel.parameters():  # average over the data-parallel replicas (the test's job)
                if param.grad is not None:
                    dist.all_reduce(param.grad, group=mesh.dp_group)
                    param.grad /= dp
            log.enabled = True
            out = {"loss": loss.detach().cpu(), "grads": _grads(parallel), "calls": calls,
                   "model_unchanged": all(torch.equal(p, q) for p, q in
                                          zip(model.parameters(), tiny_model(seed=seed + index, **case["model"])
                                              .to(info.device).parameters())),
                   "dp_rank": mesh.dp_rank, "tp_rank": mesh.tp_rank}
            if sequence_parallel:
                out["embedded_shape"] = tuple(parallel.embed_tokens(tokens).shape)
                out["error"] = _error(lambda: parallel.embed_tokens(tokens[:, : tp + 1]))
            results.append(out)
    return results


def tp_model(world_size: int, dp: int, tp: int, cases: list[dict], seed: int, sequence_parallel: bool = False):
    return run_distributed(tp_model_rank, world_size=world_size, args=(dp, tp, cases, seed, sequence_parallel),
                           timeout_s=TIMEOUT_S)


# -----------------------------------------------------------------------------
# Pipelines


def partitions(cases: list[tuple[int, int]]) -> list:
    """partition_blocks(num_blocks, num_stages) for each case, or the error it raised."""
    from lab04_model_parallel.pipeline import partition_blocks

    out = []
    for num_blocks, num_stages in cases:
        try:
            out.append([tuple(bounds) for bounds in partition_blocks(num_blocks, num_stages)])
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


def microbatches(batch_size: int, num_microbatches: int):
    """split_microbatches of a (batch_size, 3) tensor: the pieces, or the error it raised."""
    from lab04_model_parallel.pipeline import split_microbatches

    tensor = torch.arange(batch_size * 3).view(batch_size, 3)
    try:
        return [piece.clone() for piece in split_microbatches(tensor, num_microbatches)]
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"


def stage_chain(num_layers: int, num_stages: int, seed: int) -> dict:
    """Every stage of one model built on one process, run one after another: the names each holds, the logits."""
    from lab04_model_parallel.pipeline import PipelineStage

    model = tiny_model(num_layers=num_layers, seed=seed)
    tokens, _ = corpus_batch(batch_size=2, seq_len=7, seed=seed)
    stages = [PipelineStage(model, stage_index=s, num_stages=num_stages) for s in range(num_stages)]
    x = tokens
    for stage in stages:
        x = stage(x)
    tied = tiny_model(num_layers=num_layers, seed=seed, tie_embeddings=True)
    return {"names": [sorted(name for name, _ in stage.named_parameters()) for stage in stages],
            "first_last": [(stage.is_first, stage.is_last) for stage in stages], "logits": x.detach(),
            "bad_index": _error(lambda: PipelineStage(model, stage_index=num_stages, num_stages=num_stages)),
            "tied": _error(lambda: PipelineStage(tied, stage_index=0, num_stages=2))}


def pipeline_rank(info, runs: list[dict], seed: int, num_layers: int, batch_size: int) -> list[dict]:
    from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage

    from common.mesh import build_mesh

    mesh = build_mesh(pp=info.world_size)
    results = []
    for index, run in enumerate(runs):
        model = tiny_model(num_layers=num_layers, seed=seed + index).to(info.device)
        tokens, targets = corpus_batch(batch_size=batch_size, seq_len=9, seed=seed + index)
        stage = PipelineStage(model, stage_index=mesh.pp_rank, num_stages=mesh.pp_size)
        runtime = PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(**run))
        with CollectiveLog() as log:
            loss = runtime.step(tokens.to(info.device), targets.to(info.device))
        results.append({"loss": None if loss is None else loss.detach().cpu(), "grads": _grads(stage),
                        "timeline": [(e.kind, e.microbatch, e.start, e.end) for e in runtime.timeline],
                        "p2p": [call for call in log.calls if call[0] in ("isend", "irecv")],
                        "other_calls": [call[0] for call in log.calls if call[0] not in ("isend", "irecv")]})
    return results


def pipeline(world_size: int, runs: list[dict], seed: int, num_layers: int = 4, batch_size: int = 4) -> list:
    return run_distributed(pipeline_rank, world_size=world_size, args=(runs, seed, num_layers, batch_size),
                           timeout_s=TIMEOUT_S)


class _SlowBackward(torch.autograd.Function):
    """Identity; its backward sleeps (a stage whose backward takes a known, long time)."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class _Slow(torch.nn.Module):
    """Wraps a stage; each forward and each backward sleeps `seconds` first."""

    def __init__(self, stage, seconds: float):
        super().__init__()
        self.inner, self.seconds = stage, seconds
        self.is_first, self.is_last, self.width = stage.is_first, stage.is_last, stage.width

    def forward(self, x):
        time.sleep(self.seconds)
        if x.is_floating_point():
            x = _SlowBackward.apply(x, self.seconds)
        return self.inner(x)


def overlap_timelines(info, seconds: float) -> list:
    """GPipe over 2 stages, m = 3, every forward and backward slowed by `seconds`: the timeline in absolute host
    time (perf_counter is one clock for every process of the machine)."""
    from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage

    from common.mesh import build_mesh

    mesh = build_mesh(pp=info.world_size)
    stage = _Slow(PipelineStage(tiny_model(num_layers=2, seed=3).to(info.device), stage_index=mesh.pp_rank,
                                num_stages=mesh.pp_size), seconds)
    tokens, targets = (t.to(info.device) for t in corpus_batch(batch_size=3, seq_len=9, seed=3))
    runtime = PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(num_microbatches=3,
                                                                                   schedule="gpipe"))
    dist.barrier()
    origin = time.perf_counter()
    runtime.step(tokens, targets)
    return [(e.kind, e.microbatch, origin + e.start, origin + e.end) for e in runtime.timeline]


def torch_pipeline_rank(info, num_microbatches: int, seed: int) -> dict:
    """The student's runtime and torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on the same stage."""
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage, cross_entropy_loss

    from common.mesh import build_mesh

    mesh = build_mesh(pp=info.world_size)
    tokens, targets = (t.to(info.device) for t in corpus_batch(batch_size=4, seq_len=9, seed=seed))
    out = {}
    for schedule, peer in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        stage = PipelineStage(tiny_model(num_layers=4, seed=seed).to(info.device), stage_index=mesh.pp_rank,
                              num_stages=mesh.pp_size)
        loss = PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(
            num_microbatches=num_microbatches, schedule=schedule)).step(tokens, targets)
        ours = {"loss": None if loss is None else loss.cpu(), "grads": _grads(stage)}
        stage.zero_grad(set_to_none=True)
        torch_stage = TorchStage(stage, mesh.pp_rank, mesh.pp_size, info.device, group=mesh.pp_group)
        runner = peer(torch_stage, num_microbatches, loss_fn=cross_entropy_loss)
        losses: list = []
        if stage.is_first:
            runner.step(tokens, target=targets, losses=losses)
        elif stage.is_last:
            runner.step(target=targets, losses=losses)
        else:
            runner.step()
        theirs = {"loss": torch.stack(losses).mean().detach().cpu() if stage.is_last else None,
                  "grads": _grads(stage)}
        out[schedule] = {"ours": ours, "torch": theirs}
    out["overlap"] = overlap_timelines(info, 0.2)
    return out


def torch_pipeline(world_size: int, num_microbatches: int, seed: int) -> list:
    return run_distributed(torch_pipeline_rank, world_size=world_size, args=(num_microbatches, seed),
                           timeout_s=TIMEOUT_S)


class _Failing(torch.nn.Module):
    """Wraps a stage; raises ValueError in the forward of micro-batch `fail_at` (counted from 0)."""

    def __init__(self, stage, fail_at: int):
        super().__init__()
        self.inner, self.fail_at, self.calls = stage, fail_at, 0
        self.is_first, self.is_last, self.width = stage.is_first, stage.is_last, stage.width

    def forward(self, x):
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise ValueError("injected failure in the stage's forward")
        return self.inner(x)


def failing_pipeline_rank(info, failing_rank: int, fail_at: int) -> None:
    from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage

    from common.mesh import build_mesh

    mesh = build_mesh(pp=info.world_size)
    stage = PipelineStage(tiny_model(num_layers=4, seed=1).to(info.device), stage_index=mesh.pp_rank,
                          num_stages=mesh.pp_size)
    if info.rank == failing_rank:
        stage = _Failing(stage, fail_at)
    tokens, targets = corpus_batch(batch_size=4, seq_len=9, seed=1)
    PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(num_microbatches=4, schedule="gpipe")
                    ).step(tokens.to(info.device), targets.to(info.device))


def failing_pipeline(world_size: int, failing_rank: int, fail_at: int) -> str:
    """The error message run_distributed reports (the failing rank's traceback), or "no error"."""
    from common.launch import DistributedError

    try:
        run_distributed(failing_pipeline_rank, world_size=world_size, args=(failing_rank, fail_at), timeout_s=TIMEOUT_S)
    except DistributedError as error:
        return str(error)
    return "no error"


def tp_pp_rank(info, num_microbatches: int, seed: int, schedule: str) -> dict:
    """tp = 2 x pp = world / 2: a pipeline whose stages are tensor-parallel."""
    from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage
    from lab04_model_parallel.sharding import apply_tensor_parallel

    from common.mesh import build_mesh

    mesh = build_mesh(pp=info.world_size // 2, tp=2)
    model = apply_tensor_parallel(tiny_model(num_layers=4, seed=seed).to(info.device), tp_group=mesh.tp_group)
    tokens, targets = corpus_batch(batch_size=4, seq_len=9, seed=seed)
    stage = PipelineStage(model, stage_index=mesh.pp_rank, num_stages=mesh.pp_size)
    runtime = PipelineRuntime(stage, pp_group=mesh.pp_group, loss_fn=model.loss_from_logits,
                              config=PipelineConfig(num_microbatches=num_microbatches, schedule=schedule))
    loss = runtime.step(tokens.to(info.device), targets.to(info.device))
    return {"loss": None if loss is None else loss.cpu(), "grads": _grads(stage), "pp_rank": mesh.pp_rank,
            "tp_rank": mesh.tp_rank}


def tp_pp(world_size: int, num_microbatches: int, seed: int, schedule: str = "1f1b") -> list:
    return run_distributed(tp_pp_rank, world_size=world_size, args=(num_microbatches, seed, schedule),
                           timeout_s=TIMEOUT_S)


# -----------------------------------------------------------------------------
# PipeTransformer


def elastic_batch(step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two alternating batches of 8 (an "epoch" of 16 samples seen twice and more): tokens, targets, sample ids."""
    tokens, targets = corpus_batch(batch_size=8, seq_len=9, seed=seed + step % 2)
    return tokens, targets, torch.arange(8) + 8 * (step % 2)


def elastic_rank(info, plan: dict, seed: int) -> dict:
    from lab04_model_parallel.pipetransformer import ElasticPipeline, PipeTransformerConfig

    model = tiny_model(num_layers=plan["num_layers"], seed=seed).to(info.device)
    trainer = ElasticPipeline(model, config=PipeTransformerConfig(num_microbatches=2, lr=plan["lr"],
                                                                  alpha=plan["alpha"]))
    out: dict = {"losses": [], "meshes": [], "norms": [], "frozen": []}
    for step in range(plan["steps"]):
        if step in plan["freeze"]:
            trainer.freeze(plan["freeze"][step])
        if step in plan.get("auto_freeze", ()):
            out["computed"] = None if trainer.cache is None else trainer.cache.computed
            trainer.auto_freeze()
        tokens, targets, ids = elastic_batch(step, seed)
        out["losses"].append(trainer.train_step(tokens.to(info.device), targets.to(info.device), ids))
        out["meshes"].append((trainer.mesh.dp_size, trainer.mesh.pp_size))
        out["norms"].append(list(trainer.last_grad_norms))
        out["frozen"].append(trainer.num_frozen)
    trainer.sync_model()
    out["params"] = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    return out


def elastic(world_size: int, plan: dict, seed: int) -> list:
    return run_distributed(elastic_rank, world_size=world_size, args=(plan, seed), timeout_s=TIMEOUT_S)


def freeze_points(cases: list[tuple]) -> list:
    """freeze_point(grad_norms, num_frozen, alpha=alpha) for each case, or the error it raised."""
    from lab04_model_parallel.pipetransformer import freeze_point

    out = []
    for norms, num_frozen, alpha in cases:
        try:
            out.append(freeze_point(norms, num_frozen, alpha=alpha))
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


def gradient_norms(seed: int) -> list[float]:
    """block_gradient_norms of a 3-block model after one backward, block 1 frozen (no gradients)."""
    from lab04_model_parallel.pipetransformer import block_gradient_norms

    model = tiny_model(num_layers=3, seed=seed)
    model.blocks[1].requires_grad_(False)
    model.loss(*corpus_batch(batch_size=2, seq_len=8, seed=seed)).backward()
    return block_gradient_norms(list(model.blocks))


def prefix_cache(seed: int) -> dict:
    """A FrozenPrefixCache over the embedding and block 0 of a tiny model, asked for ids [3, 1, 3, 0] then
    [1, 0, 2, 2]: its outputs, how many samples it computed, and the batch sizes its prefix ran on."""
    from lab04_model_parallel.pipetransformer import FrozenPrefixCache

    model = tiny_model(num_layers=2, seed=seed)
    tokens, _ = corpus_batch(batch_size=4, seq_len=8, seed=seed)  # sample i is row i
    calls = []

    def prefix(rows):
        calls.append(rows.shape[0])
        x = model.embed(rows)
        return model.blocks[0](x, model.rope_cos[:8], model.rope_sin[:8])

    cache = FrozenPrefixCache(prefix)
    out = {"outputs": [], "computed": [], "requires_grad": []}
    for ids in ([3, 1, 3, 0], [1, 0, 2, 2]):
        ids = torch.tensor(ids)
        y = cache(ids, tokens[ids])
        out["outputs"].append(y.detach())
        out["computed"].append(cache.computed)
        out["requires_grad"].append(y.requires_grad)
    out["calls"] = calls
    return out


def compressions(cases: list[tuple[int, int, int]]) -> list:
    """compress_pipeline(active, stages, blocks_per_stage=capacity) for each case, or the error it raised."""
    from lab04_model_parallel.pipetransformer import compress_pipeline

    out = []
    for active, stages, capacity in cases:
        try:
            out.append(compress_pipeline(active, stages, blocks_per_stage=capacity))
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


def formulas(cases: list[dict]) -> list:
    """Every arithmetic function on each case of keyword arguments: {"fn": name, "config": {...}, ...}."""
    from lab04_model_parallel import arithmetic

    out = []
    for case in cases:
        case = dict(case)
        fn = getattr(arithmetic, case.pop("fn"))
        config = ModelConfig(**case.pop("config"))
        try:
            out.append(fn(config, **case))
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


# -----------------------------------------------------------------------------
# Arithmetic against counted bytes


def arithmetic_rank(info, seed: int) -> dict:
    """Counted traffic of: a TensorParallelTransformer step (dp 2 x tp 2), the same with sequence parallelism, and
    a tp 2 x pp 2 pipeline step; with the formulas' predictions and the parameters each rank holds."""
    with CollectiveLog() as log:
        from lab04_model_parallel import arithmetic
        from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage
        from lab04_model_parallel.sharding import TensorParallelConfig, apply_tensor_parallel

        from common.mesh import build_mesh

        out: dict = {}
        case = dict(num_layers=3, num_kv_heads=1)  # K/V heads copied at tp 2
        model = tiny_model(seed=seed, **case).to(info.device)
        tokens, targets = corpus_batch(batch_size=4, seq_len=8, seed=seed)
        tokens, targets = tokens.to(info.device), targets.to(info.device)
        mesh = build_mesh(dp=2, tp=2)
        for sp in (False, True):
            parallel = apply_tensor_parallel(model, tp_group=mesh.tp_group,
                                             config=TensorParallelConfig(sequence_parallel=sp))
            log.calls.clear()
            parallel.loss(tokens, targets).backward()
            out[f"tp sp={sp}"] = {"counted": log.totals(),
                                  "predicted": arithmetic.tp_communication_bytes(
                                      model.config, batch_size=4, seq_len=8, tp=2, dtype_bytes=8,
                                      sequence_parallel=sp),
                                  "params": sum(p.numel() for p in parallel.parameters())}
        mesh = build_mesh(pp=2, tp=2)
        parallel = apply_tensor_parallel(model, tp_group=mesh.tp_group)
        stage = PipelineStage(parallel, stage_index=mesh.pp_rank, num_stages=2)
        runtime = PipelineRuntime(stage, pp_group=mesh.pp_group, loss_fn=parallel.loss_from_logits,
                                  config=PipelineConfig(num_microbatches=2))
        log.calls.clear()
        runtime.step(tokens, targets)
        counted = log.totals()
        out["pp"] = {"counted": {"send": counted.get("isend", 0), "recv": counted.get("irecv", 0)},
                     "predicted": arithmetic.pp_communication_bytes(model.config, batch_size=4, seq_len=8,
                                                                    num_stages=2, stage=mesh.pp_rank, dtype_bytes=8),
                     "params": sum(p.numel() for p in stage.parameters()),
                     "predicted_params": arithmetic.parameters_per_rank(model.config, tp=2, pp=2, stage=mesh.pp_rank),
                     "pp_rank": mesh.pp_rank}
    return out


def arithmetic_counts(seed: int) -> list:
    return run_distributed(arithmetic_rank, world_size=4, args=(seed,), timeout_s=TIMEOUT_S)


# -----------------------------------------------------------------------------
# For the tests (in the grader): put the ranks' slices back together


def assemble(name: str, shards: list[torch.Tensor], config: ModelConfig, tp_size: int) -> torch.Tensor:
    """The full tensor from tensor-parallel ranks' slices (the inverse of tp_slice). Copies that must agree (the
    replicated parameters, the copies of a K/V head) are checked to agree, with AssertionError naming them."""
    kind = split_kind(name, config, tp_size)
    if kind == "rows":
        return torch.cat(shards, dim=0)
    if kind == "cols":
        return torch.cat(shards, dim=1)
    groups = [shards] if kind == "same" else [shards[h * (tp_size // config.num_kv_heads):
                                                     (h + 1) * (tp_size // config.num_kv_heads)]
                                              for h in range(config.num_kv_heads)]
    for copies in groups:
        for rank, copy in enumerate(copies[1:], start=1):
            if copy.shape != copies[0].shape or not torch.allclose(copy, copies[0], rtol=1e-9, atol=1e-12):
                raise AssertionError(f"{name}: the copies held by different tensor-parallel ranks differ (copy "
                                     f"{rank} against copy 0): a replicated parameter's gradient must be the same "
                                     "on every rank that holds it")
    return groups[0][0] if kind == "same" else torch.cat([copies[0] for copies in groups], dim=0)


def _single_process(case: dict, seed: int, index: int, dp: int) -> tuple:
    model = tiny_model(seed=seed + index, **case["model"])
    tokens, targets = corpus_batch(batch_size=case["batch"], seq_len=case["seq"], seed=seed + index)
    if "ignore" in case:  # the first row of each data-parallel replica's share starts with padding
        for chunk in targets.chunk(dp):
            chunk[0, : case["ignore"]] = -100
    return model, tokens, targets


def check_tp_model(got: list, cases: list, *, dp: int, tp: int, seed: int, sequence_parallel: bool) -> None:
    for index, case in enumerate(cases):
        model, tokens, targets = _single_process(case, seed, index, dp)
        shares = [(tokens.chunk(dp)[d], targets.chunk(dp)[d]) for d in range(dp)]
        losses = [model.loss(tok, tar) for tok, tar in shares]
        sum(losses).div(dp).backward()  # the data-parallel average of the replicas' mean losses
        expected = gradients(model)
        what = "TensorParallelTransformer" + (" (sequence parallel)" if sequence_parallel else "")
        where = describe(dp=dp, tp=tp, model=case["model"], batch=(case["batch"], case["seq"]))
        for rank, out in enumerate(got):
            out = out[index]
            check_close(out["loss"], losses[out["dp_rank"]].detach(), name=f"{what}.loss on rank {rank}",
                        inputs=where)
            assert out["model_unchanged"], f"apply_tensor_parallel must leave the full model unchanged ({where})"
        for name, full in expected.items():
            for d in range(dp):
                shards = [got[d * tp + k][index]["grads"].get(name) for k in range(tp)]
                assert all(s is not None for s in shards), f"{what}: no gradient for {name} on some rank ({where})"
                check_close(assemble(name, shards, model.config, tp), full,
                            name=f"{what}: gradient of {name} gathered from replica {d}'s ranks", inputs=where)


# -----------------------------------------------------------------------------
# On GPUs (NCCL)


def gpu_rank(info, seed: int) -> dict:
    """fp32 on CUDA over NCCL: a tp = world model's loss and gradients, and a 1F1B pipeline over world stages with
    its CUDA-event timeline."""
    from lab04_model_parallel.pipeline import PipelineConfig, PipelineRuntime, PipelineStage
    from lab04_model_parallel.sharding import apply_tensor_parallel

    from common.mesh import build_mesh

    tokens, targets = (t.to(info.device) for t in corpus_batch(batch_size=4, seq_len=16, seed=seed))
    out = {}
    mesh = build_mesh(tp=info.world_size)
    model = apply_tensor_parallel(tiny_model(seed=seed, dtype=torch.float32).to(info.device), tp_group=mesh.tp_group)
    loss = model.loss(tokens, targets)
    loss.backward()
    out["tp"] = {"loss": loss.detach().cpu(), "grads": _grads(model)}
    mesh = build_mesh(pp=info.world_size)
    stage = PipelineStage(tiny_model(seed=seed, dtype=torch.float32).to(info.device), stage_index=mesh.pp_rank,
                          num_stages=mesh.pp_size)
    runtime = PipelineRuntime(stage, pp_group=mesh.pp_group, config=PipelineConfig(num_microbatches=4))
    loss = runtime.step(tokens, targets)
    out["pp"] = {"loss": None if loss is None else loss.cpu(), "grads": _grads(stage),
                 "timeline": [(e.kind, e.microbatch, e.start, e.end) for e in runtime.timeline]}
    return out


def gpu_checks(world_size: int, seed: int) -> list:
    return run_distributed(gpu_rank, world_size=world_size, args=(seed,), backend="nccl", timeout_s=120)
