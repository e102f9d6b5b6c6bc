"""Producers and rank functions of lab 03's distributed tests; shared builders for the tests' expectations.

Three kinds of functions live here:
- *producers* (`ring_collectives`, `ddp_training`, ...) run in the grading worker through `student.run`. Each calls
  `common.launch.run_distributed(rank_fn, ...)` and returns the ranks' results as plain data;
- *rank functions* (`ring_rank`, `ddp_rank`, ...) run in the spawned ranks, which import them from this module by name.
  Each imports the lab inside the function, calls the student's code and returns tensors, numbers and strings;
- *builders* (`make_model`, `global_batch`, `ring_input`, `local_loss`, ...) that the ranks use to build their inputs
  and that the tests (in the grader) use to compute what is expected: single-process training, the sum over ranks of
  known inputs. Nothing a rank returns is ever used as an expectation.

Nothing here imports the lab at module level (the worker refuses), nor anything from `autograder`.

The ring collectives must use point-to-point messages only. `guard_collectives()`, called in each rank *before* the lab
is imported (so a module that captures `dist.all_reduce` at import captures the ban), makes every torch collective
raise, at the torch.distributed, ProcessGroup and Backend levels and as dispatcher ops, and counts the bytes each rank
sends and receives through ProcessGroup.send/recv (which dist.send/recv/isend/irecv and batch_isend_irecv all reach).
The tests then require the ring's volume: 2(p-1)/p of the tensor for an all-reduce, (p-1)/p for a reduce-scatter or an
all-gather, per rank within the rounding of uneven chunks, and exactly 2(p-1) or (p-1) times the tensor over all ranks.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from common.data import get_batch, load_corpus
from common.launch import run_distributed
from common.model import ModelConfig, Transformer
from common.testing import random_tensor

# torch.distributed functions that move data collectively (send/recv and barrier stay allowed)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced",
               "all_reduce_coalesced", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
               "_all_gather_base", "broadcast", "broadcast_object_list", "reduce", "all_to_all", "all_to_all_single",
               "gather", "gather_object", "scatter", "scatter_object_list")
# the same at the level of ProcessGroup and Backend objects (what dist.* calls underneath)
GROUP_COLLECTIVES = ("allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced",
                     "allgather_into_tensor_coalesced", "_allgather_base", "all_gather_single",
                     "all_gather_single_coalesced", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_single",
                     "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced", "broadcast", "reduce",
                     "alltoall", "alltoall_base", "all_to_all_single", "gather", "scatter")
# and as dispatcher ops (torch.ops.c10d.* and the functional collectives' torch.ops._c10d_functional.*)
C10D_OPS = ("allreduce_", "allreduce_coalesced_", "allgather_", "_allgather_base_", "allgather_coalesced_",
            "allgather_into_tensor_coalesced_", "reduce_scatter_", "_reduce_scatter_base_",
            "reduce_scatter_tensor_coalesced_", "broadcast_", "reduce_", "alltoall_", "alltoall_base_", "gather_",
            "scatter_")
FUNCTIONAL_OPS = ("all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_",
                  "all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced",
                  "reduce_scatter_tensor", "reduce_scatter_tensor_coalesced", "all_to_all_single", "broadcast",
                  "broadcast_")

# -----------------------------------------------------------------------------
# Builders: the ranks build their inputs with these, the tests their expectations


def ring_cases(world_size: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes that divide unevenly by the world size, including fewer elements than ranks."""
    return [((1,), torch.float32), ((world_size + 1,), torch.float64), ((13, 5), torch.float32),
            ((1003,), torch.float32), ((3, 7, 11), torch.float64)]


def ring_input(shape: tuple[int, ...], dtype: torch.dtype, *, case: int, rank: int, seed: int) -> torch.Tensor:
    """Global rank `rank`'s input for ring case `case`."""
    return random_tensor(*shape, dtype=dtype, seed=seed * 10_000 + case * 100 + rank)


def split_sizes(numel: int, parts: int) -> list[int]:
    """Sizes of the chunks torch.tensor_split makes: the first numel % parts one element longer."""
    return [len(piece) for piece in torch.arange(numel).tensor_split(parts)]


def make_model(*, seed: int, num_layers: int = 2, tie: bool = True, frozen: bool = True, unused: bool = True
               ) -> Transformer:
    """A tiny fp32 model with a tied embedding, a frozen norm weight and a parameter that no forward uses."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", num_layers=num_layers, max_seq_len=32, tie_embeddings=tie))
    if frozen:
        model.blocks[0].attn_norm.weight.requires_grad_(False)
        with torch.no_grad():  # a frozen weight that is not all ones, so a wrong update would show
            model.blocks[0].attn_norm.weight.mul_(1.5)
    if unused:
        model.unused_head = nn.Linear(8, 3, bias=False)  # registered last: the first bucket in reverse order
    return model


def global_batch(*, batch_size: int, step: int, seed: int, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return get_batch(load_corpus(max_tokens=20_000), batch_size=batch_size, seq_len=seq_len, seed=seed * 100 + step)


def rows(tokens: torch.Tensor, targets: torch.Tensor, *, part: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Part `part` of `parts` equal row blocks (the tests' own slicing, to shard the reference's batch)."""
    size = tokens.shape[0] // parts
    return tokens[part * size:(part + 1) * size], targets[part * size:(part + 1) * size]


def local_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, *, use_head: bool) -> torch.Tensor:
    """The language-model loss, plus a term through `unused_head` when use_head (a parameter some ranks never use)."""
    loss = model.loss(tokens, targets)
    if use_head:
        features = model.embed(tokens)[..., :8]  # (B, N, 8)
        loss = loss + model.unused_head(features).pow(2).mean()
    return loss


@torch.no_grad()
def sgd_step(model: nn.Module, lr: float = 0.5) -> None:
    """Plain SGD, then clear the gradients. (torch.optim's first step imports torch._dynamo: seconds per rank.)"""
    for weight in [w for w in model.parameters() if w.grad is not None]:
        weight.sub_(weight.grad, alpha=lr)
        weight.grad = None


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: w.detach().cpu().clone() for name, w in model.named_parameters()}


def grad_snapshot(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if w.grad is None else w.grad.detach().cpu().clone() for name, w in model.named_parameters()}


def subgroup_members(world_size: int) -> list[list[int]]:
    """The two subgroups of the subgroup tests: even and odd global ranks."""
    return [list(range(0, world_size, 2)), list(range(1, world_size, 2))]


# -----------------------------------------------------------------------------
# The ban on torch collectives, and the byte counters of point-to-point messages


def guard_collectives() -> dict:
    """Make every torch collective raise in this process; count the bytes sent and received point to point.

    Call before importing the lab. Returns the live counters {"sent": bytes, "received": bytes, "messages": n}.
    """
    counts = {"sent": 0, "received": 0, "messages": 0}

    def forbidden(name: str):
        def call(*args, **kwargs):
            raise RuntimeError(f"the ring collectives must be built from point-to-point messages (isend/irecv, "
                               f"send/recv) only, but called {name}")
        return call

    import torch.distributed.distributed_c10d as c10d

    for module in (dist, c10d):
        for name in COLLECTIVES:
            if hasattr(module, name):
                setattr(module, name, forbidden(f"torch.distributed.{name}"))
    classes = [dist.ProcessGroup, torch._C._distributed_c10d.Backend]
    classes += [getattr(dist, name) for name in ("ProcessGroupGloo", "ProcessGroupNCCL") if hasattr(dist, name)]
    for cls in classes:
        for name in GROUP_COLLECTIVES:
            if hasattr(cls, name):
                setattr(cls, name, forbidden(f"{cls.__name__}.{name}"))
    try:  # imported first: it registers autograd formulas on the ops banned below
        import torch.distributed._functional_collectives as functional

        for name in dir(functional):
            value = getattr(functional, name)
            if callable(value) and not isinstance(value, type) and any(
                    key in name for key in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")):
                setattr(functional, name, forbidden(f"torch.distributed._functional_collectives.{name}"))
    except ImportError:
        pass
    for namespace, names in ((torch.ops.c10d, C10D_OPS), (torch.ops._c10d_functional, FUNCTIONAL_OPS)):
        for name in names:
            try:
                setattr(namespace, name, forbidden(f"torch.ops.{namespace.name}.{name}"))
            except (AttributeError, RuntimeError):
                pass

    def counting(original, key: str):
        def call(self, tensors, *args, **kwargs):
            counts[key] += sum(t.numel() * t.element_size() for t in tensors)
            counts["messages"] += 1
            return original(self, tensors, *args, **kwargs)
        return call

    for cls in (dist.ProcessGroup, torch._C._distributed_c10d.Backend):
        cls.send = counting(cls.send, "sent")
        cls.recv = counting(cls.recv, "received")
        cls.recv_anysource = counting(cls.recv_anysource, "received")
    return counts


def _traffic(counts: dict, before: dict) -> dict:
    return {key: counts[key] - before[key] for key in ("sent", "received", "messages")}


def _error_text(call) -> str:
    """'ExceptionClass: message' of what call() raised, or 'no error'."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the class name goes back to the test
        return f"{type(error).__name__}: {error}"
    return "no error"


# -----------------------------------------------------------------------------
# Part 1: ring collectives


def ring_collectives(world_size: int, seed: int, subgroups: bool = False, timeout_s: float = 90.0) -> list[dict]:
    """Producer: every ring collective on every case, on every rank (in two concurrent subgroups if asked)."""
    return run_distributed(ring_rank, world_size=world_size, args=(seed, subgroups), timeout_s=timeout_s)


def ring_rank(info, seed: int, subgroups: bool) -> dict:
    group = None
    if subgroups:  # created before the ban: new_group may use collectives of the default group
        groups = [dist.new_group(members) for members in subgroup_members(info.world_size)]
        group = groups[info.rank % 2]
    counts = guard_collectives()
    from lab03_data_parallel.collectives import ring_all_gather, ring_all_reduce, ring_reduce_scatter

    members = subgroup_members(info.world_size)[info.rank % 2] if subgroups else list(range(info.world_size))
    size, me = len(members), members.index(info.rank)
    out: dict = {"rank": info.rank, "members": members, "cases": []}
    for case, (shape, dtype) in enumerate(ring_cases(size)):
        x = ring_input(shape, dtype, case=case, rank=info.rank, seed=seed).to(info.device)
        row: dict = {"shape": shape, "dtype": str(dtype).removeprefix("torch.")}

        before = dict(counts)
        target = x.clone()
        returned = ring_all_reduce(target, group=group)
        row["all_reduce"] = target.cpu()
        row["all_reduce returned"] = returned.cpu() if isinstance(returned, torch.Tensor) else repr(returned)
        row["all_reduce in place"] = returned is target
        row["all_reduce traffic"] = _traffic(counts, before)

        row["all_reduce avg"] = ring_all_reduce(x.clone(), group=group, op="avg").cpu()
        # a non-contiguous view must be reduced in place too
        strided = x.clone().reshape(x.shape[0], -1).t() if x.dim() > 1 else x.clone()
        ring_all_reduce(strided, group=group)
        row["all_reduce non-contiguous"] = (strided.t().reshape(shape) if x.dim() > 1 else strided).cpu()

        before = dict(counts)
        kept = x.clone()
        row["reduce_scatter"] = ring_reduce_scatter(x, group=group).cpu()
        row["reduce_scatter traffic"] = _traffic(counts, before)
        row["input kept"] = bool(torch.equal(x, kept))
        row["reduce_scatter avg"] = ring_reduce_scatter(x, group=group, op="avg").cpu()

        start = sum(split_sizes(x.numel(), size)[:me])
        shard = x.reshape(-1)[start:start + split_sizes(x.numel(), size)[me]].clone()
        before = dict(counts)
        row["all_gather"] = ring_all_gather(shard, numel=x.numel(), group=group).cpu()
        row["all_gather traffic"] = _traffic(counts, before)
        out["cases"].append(row)
    # a shard of the wrong size is refused before any message is sent (every rank raises, so none waits)
    out["bad shard"] = _error_text(lambda: ring_all_gather(torch.ones(3, device=info.device),
                                                           numel=100 * size + 1, group=group))
    out["bad op"] = _error_text(lambda: ring_all_reduce(torch.ones(4, device=info.device), group=group, op="max"))
    return out


# -----------------------------------------------------------------------------
# Parts 2 and 3: data-parallel training


def ddp_training(world_size: int, variants: list[str], steps: int, seed: int, *, subgroups: bool = False,
                 partly_unused: bool = False, local_batch: int = 2, timeout_s: float = 90.0) -> list[dict]:
    """Producer: train each variant ("naive" or "bucketed:<cap MB>") for `steps` SGD steps on every rank."""
    return run_distributed(ddp_rank, world_size=world_size, timeout_s=timeout_s,
                           args=(variants, steps, seed, subgroups, partly_unused, local_batch))


def ddp_group_layout(world_size: int, rank: int, subgroups: bool) -> tuple[list[int], int]:
    """(the members of this rank's data-parallel group, the index of the group's data stream)."""
    if not subgroups:
        return list(range(world_size)), 0
    return subgroup_members(world_size)[rank % 2], rank % 2


def ddp_rank(info, variants: list[str], steps: int, seed: int, subgroups: bool, partly_unused: bool,
             local_batch: int) -> dict:
    """Replicas start from different seeds (so the broadcast is tested); with subgroups, the even and the odd ranks
    train two independent replicas on two data streams; with partly_unused, only group rank 0 uses unused_head."""
    group = None
    if subgroups:
        groups = [dist.new_group(members) for members in subgroup_members(info.world_size)]
        group = groups[info.rank % 2]
    members, stream = ddp_group_layout(info.world_size, info.rank, subgroups)
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
    from lab03_data_parallel.ddp_naive import NaiveDDP, shard_batch

    me, size = members.index(info.rank), len(members)
    out: dict = {}
    for variant in variants:
        model = make_model(seed=seed + info.rank).to(info.device)
        if variant == "naive":
            ddp = NaiveDDP(model, group=group)
            sync = ddp.sync_gradients
        else:
            ddp = BucketedDDP(model, group=group, config=BucketConfig(bucket_cap_mb=float(variant.split(":")[1])))
            sync = ddp.finish
            out[f"{variant} buckets"] = [list(b) for b in ddp.bucket_indices]
        out[f"{variant} initial"] = snapshot(ddp.module)
        for step in range(steps):
            tokens, targets = global_batch(batch_size=local_batch * size, step=step, seed=seed + 1000 * stream)
            tokens, targets = shard_batch(tokens, targets, rank=me, world_size=size)
            local_loss(ddp.module, tokens.to(info.device), targets.to(info.device),
                       use_head=partly_unused and me == 0).backward()
            sync()
            if step == steps - 1:
                out[f"{variant} grads"] = grad_snapshot(ddp.module)
            sgd_step(ddp.module)
        out[f"{variant} params"] = snapshot(ddp.module)
    return out


@functools.lru_cache(maxsize=16)
def reference_training(*, seed: int, steps: int, group_size: int, stream: int, first_rank: int,
                       partly_unused: bool = False, local_batch: int = 2) -> dict:
    """Single process (in the grader): the first rank's initial model, each step's loss the mean over the group's
    ranks of their losses on their rows, so its gradient is the average DDP must produce."""
    model = make_model(seed=seed + first_rank)
    out = {"initial": snapshot(model)}
    for step in range(steps):
        tokens, targets = global_batch(batch_size=local_batch * group_size, step=step, seed=seed + 1000 * stream)
        total = sum(local_loss(model, *rows(tokens, targets, part=r, parts=group_size), use_head=partly_unused and r == 0)
                    for r in range(group_size))
        (total / group_size).backward()
        if step == steps - 1:
            out["grads"] = grad_snapshot(model)
        sgd_step(model)
    out["params"] = snapshot(model)
    return out


def mismatched_wrappers(timeout_s: float = 60.0) -> list[dict]:
    """Producer: NaiveDDP and BucketedDDP on replicas that differ across ranks (each must raise on every rank)."""
    return run_distributed(mismatch_rank, world_size=2, timeout_s=timeout_s)


def mismatch_rank(info) -> dict:
    """Rank 1 differs: a weight frozen on rank 1 only (same shapes: a broadcast would not notice), then a narrower
    model (the broadcast would fail or hang), then one extra parameter. Every rank must raise ValueError each time."""
    from lab03_data_parallel.ddp_bucketed import BucketedDDP
    from lab03_data_parallel.ddp_naive import NaiveDDP

    out = {}
    for how in MISMATCHES:
        for name, wrapper in (("NaiveDDP", NaiveDDP), ("BucketedDDP", BucketedDDP)):
            model = mismatched_model(how, info.rank).to(info.device)
            out[f"{name} {how}"] = _error_text(lambda: wrapper(model, group=None))
    return out


MISMATCHES = ("requires_grad", "width", "count")


def mismatched_model(how: str, rank: int) -> Transformer:
    """Rank `rank`'s replica in mismatch case `how`: rank 0's is the plain tiny model."""
    torch.manual_seed(0)
    width = 32 if how == "width" and rank == 1 else 64
    model = Transformer(ModelConfig.preset("tiny", width=width, max_seq_len=32))
    if how == "requires_grad" and rank == 1:
        model.blocks[1].mlp_norm.weight.requires_grad_(False)
    if how == "count" and rank == 1:
        model.extra = nn.Linear(4, 4, bias=False)
    return model


def overlap_log(cap_mb: float, timeout_s: float = 60.0) -> list[dict]:
    """Producer: one logged backward of bucketed DDP per rank, with every all-reduce call recorded."""
    return run_distributed(overlap_rank, world_size=2, args=(cap_mb,), timeout_s=timeout_s)


def overlap_rank(info, cap_mb: float) -> dict:
    """ProcessGroup.allreduce (what dist.all_reduce calls) is wrapped before the lab is imported, to record how many
    gradients were ready (by hooks of this function's own) and how many elements each call reduced."""
    calls: list[tuple[int, int]] = []
    ready: list[str] = []
    original = dist.ProcessGroup.allreduce

    def recording(self, tensors, *args, **kwargs):
        calls.append((len(ready), sum(t.numel() for t in tensors) if isinstance(tensors, list) else tensors.numel()))
        return original(self, tensors, *args, **kwargs)

    dist.ProcessGroup.allreduce = recording
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP

    model = make_model(seed=1, num_layers=4, frozen=False, unused=False).to(info.device)
    ddp = BucketedDDP(model, group=None, config=BucketConfig(bucket_cap_mb=cap_mb, record_events=True))
    calls.clear()
    names = {id(w): n for n, w in model.named_parameters()}
    for weight in ddp.module.parameters():
        weight.register_post_accumulate_grad_hook(lambda w: ready.append(names[id(w)]))
    tokens, targets = global_batch(batch_size=2 * info.world_size, step=0, seed=1)
    ddp.module.loss(tokens.to(info.device), targets.to(info.device)).backward()
    calls_during_backward = list(calls)
    ddp.finish()
    return {
        "events": [(kind, detail) for kind, detail, *_ in ddp.events],
        "num_buckets": ddp.num_buckets,
        "bucket_indices": [list(b) for b in ddp.bucket_indices],
        "sizes": [w.numel() for w in ddp.params],
        "names": list(ddp.param_names),
        "ready": ready,
        "calls": calls,
        "calls_during_backward": calls_during_backward,
    }


def no_sync_training(num_microbatches: int, iterations: int, seed: int, *, head_in_first_only: bool = False,
                     timeout_s: float = 60.0) -> list[dict]:
    """Producer: gradient accumulation with no_sync() on 2 ranks."""
    return run_distributed(no_sync_rank, world_size=2, timeout_s=timeout_s,
                           args=(num_microbatches, iterations, seed, head_in_first_only))


def no_sync_rank(info, num_microbatches: int, iterations: int, seed: int, head_in_first_only: bool) -> dict:
    """All micro-batches but the last inside no_sync(). With head_in_first_only, unused_head gets a gradient in the
    first micro-batch only: it has a .grad at finish() but its hook did not fire in the synchronised backward."""
    calls = []
    original = dist.ProcessGroup.allreduce

    def counting(self, tensors, *args, **kwargs):
        calls.append(1)
        return original(self, tensors, *args, **kwargs)

    dist.ProcessGroup.allreduce = counting
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
    from lab03_data_parallel.ddp_naive import shard_batch

    rank, world = info.rank, info.world_size
    ddp = BucketedDDP(make_model(seed=seed + rank).to(info.device), group=None, config=BucketConfig(bucket_cap_mb=0.02))
    out: dict = {"calls inside no_sync": []}
    for iteration in range(iterations):
        tokens, targets = global_batch(batch_size=2 * num_microbatches * world, step=iteration, seed=seed)
        tokens, targets = shard_batch(tokens.to(info.device), targets.to(info.device), rank=rank, world_size=world)
        pieces = list(zip(tokens.chunk(num_microbatches), targets.chunk(num_microbatches)))
        calls.clear()
        with ddp.no_sync():
            for index, (micro_tokens, micro_targets) in enumerate(pieces[:-1]):
                use_head = head_in_first_only and index == 0
                (local_loss(ddp.module, micro_tokens, micro_targets, use_head=use_head) / num_microbatches).backward()
        out["calls inside no_sync"].append(len(calls))
        (local_loss(ddp.module, *pieces[-1], use_head=False) / num_microbatches).backward()
        ddp.finish()
        out[f"grads {iteration}"] = grad_snapshot(ddp.module)
        sgd_step(ddp.module)
    return out


@functools.lru_cache(maxsize=16)
def reference_accumulation(*, num_microbatches: int, iterations: int, seed: int, world_size: int,
                           head_in_first_only: bool) -> dict:
    """Single process (in the grader): the mean over ranks of the sum of each rank's micro-batch losses."""
    model = make_model(seed=seed)
    out = {}
    for iteration in range(iterations):
        tokens, targets = global_batch(batch_size=2 * num_microbatches * world_size, step=iteration, seed=seed)
        total = 0.0
        for r in range(world_size):
            local_tokens, local_targets = rows(tokens, targets, part=r, parts=world_size)
            for k in range(num_microbatches):
                micro = rows(local_tokens, local_targets, part=k, parts=num_microbatches)
                total = total + local_loss(model, *micro, use_head=head_in_first_only and k == 0) / num_microbatches
        (total / world_size).backward()
        out[f"grads {iteration}"] = grad_snapshot(model)
        sgd_step(model)
    return out


# -----------------------------------------------------------------------------
# Part 5: fault tolerance (run_distributed with may_die and pass_store: the victim rank really dies)


def fault_run(world_size: int, victim: int, die_at_call: int, calls: int, seed: int, *, how: str = "before",
              op: str = "sum", detect_timeout_s: float = 10.0, grace_s: float = 2.0, late_s: float = 0.0,
              timeout_s: float = 75.0) -> list:
    """Producer: every rank calls all_reduce `calls` times; the victim dies in call `die_at_call`, `how`:
    "before" it enters it, "launched" right after starting its gloo all-reduce (mid-collective), or "completed" as
    soon as its own all-reduce has completed (it holds the sum, but never tells the others); or, with "late", it does
    not die but enters that call `late_s` seconds after the others (a straggler)."""
    return run_distributed(fault_rank, world_size=world_size, may_die={victim}, pass_store=True, backend="gloo",
                           timeout_s=timeout_s,
                           args=(victim, die_at_call, calls, seed, how, op, detect_timeout_s, grace_s, late_s))


def fault_input(*, seed: int, call: int, rank: int) -> torch.Tensor:
    return random_tensor(5, 3, dtype=torch.float64, seed=seed * 1000 + call * 10 + rank)


class _DiesWhenDone:
    """A gloo Work that ends its process the moment its all-reduce is seen complete."""

    def __init__(self, work):
        self._work = work

    def is_completed(self) -> bool:
        if self._work.is_completed():
            os._exit(17)
        return False

    def wait(self, *args, **kwargs):
        self._work.wait(*args, **kwargs)
        os._exit(17)

    def __getattr__(self, name):
        return getattr(self._work, name)


def _arm_victim(how: str) -> None:
    """Make this rank's next gloo all-reduce fatal (ProcessGroupGloo is what the reducer builds its views from)."""
    original = dist.ProcessGroupGloo.allreduce

    def allreduce(self, *args, **kwargs):
        work = original(self, *args, **kwargs)
        if how == "launched":
            time.sleep(0.01)  # the op is under way: its first messages may have left
            os._exit(17)
        return _DiesWhenDone(work)

    dist.ProcessGroupGloo.allreduce = allreduce


def fault_rank(info, store_address, victim: int, die_at_call: int, calls: int, seed: int, how: str, op: str,
               detect_timeout_s: float, grace_s: float, late_s: float) -> list:
    from lab03_data_parallel.fault_tolerant import FaultToleranceConfig, FaultTolerantAllReduce

    host, port = store_address
    store = dist.TCPStore(host, port, is_master=False)
    reducer = FaultTolerantAllReduce(store, rank=info.rank, world_size=info.world_size,
                                     config=FaultToleranceConfig(detect_timeout_s=detect_timeout_s, grace_s=grace_s))
    results = []
    for call in range(calls):
        late = info.rank == victim and call == die_at_call and how == "late"
        dying = info.rank == victim and call == die_at_call and not late
        if late:
            time.sleep(late_s)  # a straggler, not a corpse
        if dying and how == "before":
            os._exit(17)  # no cleanup, no goodbye: the sockets just close
        if dying:
            _arm_victim(how)
        x = fault_input(seed=seed, call=call, rank=info.rank)
        start = time.perf_counter()
        got = reducer.all_reduce(x.clone(), op=op)
        if dying:
            os._exit(17)  # the reducer never called ProcessGroupGloo.allreduce: die on the way out instead
        results.append({"got": got, "members": list(reducer.members), "seconds": time.perf_counter() - start,
                        "log": [(c, attempt, event) for c, attempt, event, *_ in reducer.log if c == call]})
    return results


# -----------------------------------------------------------------------------
# NCCL (two GPUs)


def nccl_peer_run(seed: int, timeout_s: float = 150.0) -> list[dict]:
    """Producer: the NCCL comparison on two GPUs."""
    return run_distributed(nccl_peer_rank, world_size=2, backend="nccl", args=(seed,), timeout_s=timeout_s)


def nccl_input(*, seed: int, rank: int) -> torch.Tensor:
    return random_tensor(100_003, dtype=torch.bfloat16, seed=seed + rank)


def nccl_peer_rank(info, seed: int) -> dict:
    """On NCCL under bf16 autocast: the ring all-reduce of a bf16 tensor, and one step of naive and bucketed DDP
    beside torch DDP (the peer, run here on the same GPUs) on a small model; gradients returned in fp32."""
    from lab03_data_parallel.collectives import ring_all_reduce
    from lab03_data_parallel.ddp_bucketed import BucketConfig, BucketedDDP
    from lab03_data_parallel.ddp_naive import NaiveDDP

    out: dict = {"ring bf16": ring_all_reduce(nccl_input(seed=seed, rank=info.rank).to(info.device)).float().cpu()}
    tokens, targets = global_batch(batch_size=4, step=info.rank, seed=seed, seq_len=128)
    tokens, targets = tokens.to(info.device), targets.to(info.device)
    for name in ("torch", "naive", "bucketed"):
        torch.manual_seed(seed)
        module = Transformer(ModelConfig.preset("small", tie_embeddings=True)).to(info.device)
        if name == "torch":
            model = torch.nn.parallel.DistributedDataParallel(module, device_ids=[info.local_rank])
        elif name == "naive":
            model = NaiveDDP(module, group=None)
        else:
            model = BucketedDDP(module, group=None, config=BucketConfig(bucket_cap_mb=1.0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        if name == "naive":
            model.sync_gradients()
        elif name == "bucketed":
            model.finish()
        out[name] = {n: w.grad.float().cpu() for n, w in module.named_parameters()}
    return out
