"""Lab 05's test machinery: the test model and batches, the single-process expectation (the grader computes it), and
the rank functions and producers that run the submission's engines in the worker.

Nothing here imports lab05_zero at module level: rank functions import it inside, so the grader can import this
module for the expectations, and spawned ranks import it by name (they inherit the worker's sys.path).

Every rank function returns plain data: CPU tensors, numbers, strings, lists and dicts. Observations are made with
the test's own instruments (its gradient hooks, registered before the engine's; module hooks registered after
them; storage sizes; wrapped torch.distributed collectives), never with the submission's bookkeeping alone.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn

from common.data import get_batch, load_corpus
from common.dist import DistInfo
from common.model import ModelConfig, Transformer

MODEL = dict(num_layers=3, width=32, num_heads=4, num_kv_heads=2, ffn_width=41, max_seq_len=32, tie_embeddings=True)
SEQ_LEN = 12
ROWS = 2  # rows of a micro-batch on one rank
ADAMW = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)  # away from AdamW's defaults
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TRACED = ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor", "reduce_scatter", "all_gather_single",
          "all_gather_into_tensor", "all_gather", "broadcast")

# -----------------------------------------------------------------------------
# The model and the data (grader and workers build the same ones from the same seeds)


def make_model(*, seed: int, dtype: torch.dtype = torch.float64, num_layers: int = 3,
               unused: bool = False) -> Transformer:
    """The tiny decoder with a tied embedding, a frozen norm weight (random, so a wrong update would show) and an
    up-projection with a 41-element bias in block 1 (an odd size: no world size > 1 divides that unit). `unused`
    adds a parameter to the last block that no forward uses (it never gets a gradient)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", **{**MODEL, "num_layers": num_layers}))
    if unused:
        model.blocks[-1].unused_proj = nn.Linear(MODEL["width"], 3, bias=False)
    model.blocks[min(1, num_layers - 1)].mlp.up_proj = nn.Linear(MODEL["width"], MODEL["ffn_width"], bias=True)
    frozen = model.blocks[0].attn_norm.weight
    frozen.requires_grad_(False)
    with torch.no_grad():
        frozen.copy_(1.0 + torch.rand(frozen.shape))  # not ones: a wrong update, or no broadcast, would show
    return model.to(dtype)


def unit_of(name: str) -> str:
    """The unit a parameter belongs to under the default units (the blocks; everything else is root)."""
    parts = name.split(".")
    return f"blocks.{parts[1]}" if parts[0] == "blocks" else "root"


def unit_numels(model: nn.Module) -> dict[str, int]:
    """Trainable elements per unit (a tied weight once)."""
    numels: dict[str, int] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            numels[unit_of(name)] = numels.get(unit_of(name), 0) + param.numel()
    return numels


def padded(numel: int, world_size: int) -> int:
    return -(-numel // world_size) * world_size


def global_batch(step: int, *, world_size: int, micro: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's whole batch: ROWS * micro rows per rank, (B, SEQ_LEN) int64 each."""
    return get_batch(load_corpus(max_tokens=20_000), batch_size=ROWS * micro * world_size, seq_len=SEQ_LEN,
                     seed=seed * 1000 + step)


def rank_microbatches(step: int, *, rank: int, world_size: int, micro: int, seed: int) -> list:
    tokens, targets = global_batch(step, world_size=world_size, micro=micro, seed=seed)
    mine = tokens.chunk(world_size)[rank], targets.chunk(world_size)[rank]
    return list(zip(mine[0].chunk(micro), mine[1].chunk(micro)))


def probe_tokens(seed: int) -> torch.Tensor:
    return get_batch(load_corpus(max_tokens=20_000), batch_size=2, seq_len=SEQ_LEN, seed=seed + 777)[0]


# -----------------------------------------------------------------------------
# The grader's expectation: one process, the whole batch (what DDP computes), torch.optim.AdamW


def expected_training(*, steps: int, world_size: int, micro: int, seed: int, adamw: dict | None = None,
                      dtype: torch.dtype = torch.float64, num_layers: int = 3, unused: bool = False) -> dict:
    """Rank 0's initial model trained on every rank's micro-batches: the loss of each step is the mean over ranks and
    micro-batches (DDP's average of gradients), AdamW over the trainable parameters.

    Returns:
        {"params": name -> tensor (tied names both present), "losses": [float per step], "logits": probe logits}.
    """
    model = make_model(seed=seed, dtype=dtype, num_layers=num_layers, unused=unused)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **{**ADAMW, **(adamw or {})})
    losses = []
    for step in range(steps):
        total = 0.0
        for rank in range(world_size):
            for tokens, targets in rank_microbatches(step, rank=rank, world_size=world_size, micro=micro, seed=seed):
                loss = model.loss(tokens, targets) / (micro * world_size)
                loss.backward()
                total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    with torch.no_grad():
        logits = model(probe_tokens(seed))
    params = {name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)}
    return {"params": params, "losses": losses, "logits": logits}


# -----------------------------------------------------------------------------
# Instruments (in the ranks)


def allocated_units(model: nn.Module) -> dict[str, int]:
    """unit -> bytes of the distinct parameter storages of its trainable parameters that hold memory now."""
    seen: dict[tuple[str, int], tuple[str, int]] = {}
    for name, param in model.named_parameters():
        storage = param.untyped_storage()
        if param.requires_grad and storage.nbytes() > 0:
            seen[(unit_of(name), storage.data_ptr())] = (unit_of(name), storage.nbytes())
    units: dict[str, int] = {}
    for unit, nbytes in seen.values():
        units[unit] = units.get(unit, 0) + nbytes
    return units


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage reachable from a live tensor (or its .grad) in this process."""
    gc.collect()
    by_storage: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            for tensor in (obj, obj.grad):
                if tensor is not None and tensor.untyped_storage().nbytes() > 0:
                    by_storage[(str(tensor.device), tensor.untyped_storage().data_ptr())] = tensor.untyped_storage().nbytes()
    return sum(by_storage.values())


class CollectiveTrace:
    """Inside: calls of the traced torch.distributed collectives are logged as (name, gradients seen so far)."""

    def __init__(self, counter: list[int]):
        self.counter, self.calls = counter, []

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in TRACED if hasattr(dist, name)}
        for name, function in self.saved.items():
            def traced(*args, _name=name, _function=function, **kwargs):
                self.calls.append((_name, self.counter[0]))
                return _function(*args, **kwargs)
            setattr(dist, name, traced)
        return self

    def __exit__(self, *exc):
        for name, function in self.saved.items():
            setattr(dist, name, function)


def gathered_parameters(engine: nn.Module, model: nn.Module, tokens: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Every parameter as the model sees it inside a no-grad forward through the engine (ZeRO-3 gathers them
    there), captured by pre-hooks on the modules that own them; and the logits."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for module_name, module in model.named_modules():
        if list(module.parameters(recurse=False)):
            def capture(mod, args, prefix=module_name):
                for name, param in mod.named_parameters(recurse=False):
                    captured[f"{prefix}.{name}" if prefix else name] = param.detach().to("cpu", copy=True)
            handles.append(module.register_forward_pre_hook(capture))
    with torch.no_grad():
        logits = engine(tokens.to(next(iter(model.buffers())).device))
    for handle in handles:
        handle.remove()
    return captured, logits.detach().cpu()


def master_weights(engine: nn.Module) -> dict[str, torch.Tensor]:
    """The master shards of every rank, gathered by the test (all_gather of the documented groups/optimizer)."""
    out = {}
    group = getattr(engine, "group", None)
    for flat_group, master in zip(engine.groups, engine.optimizer.masters):
        device = flat_group.shard.device
        full = torch.empty(flat_group.layout.padded_numel, dtype=master.dtype, device=device)
        dist.all_gather_into_tensor(full, master.to(device).contiguous(), group=group)
        for name, view in zip(flat_group.names, flat_group.layout.views(full)):
            out[name] = view.to("cpu", copy=True)
    return out


def make_config(spec: dict):
    from lab05_zero.config import ZeROConfig

    options = dict(spec.get("config", {}))
    if options.get("param_dtype") is not None:
        options["param_dtype"] = DTYPES[options["param_dtype"]]
    return ZeROConfig(**{**ADAMW, **spec.get("adamw", {}), **options})


def launch(worker, *, world_size: int, args: tuple, timeout_s: float) -> list:
    """common.launch.run_distributed, with a failing rank's own exception first in the message (then the whole
    traceback), so that a scorecard line reads "rank 1 of 4 raised NotImplementedError: lab05: ...". A deadlock
    raises run_distributed's DistributedTimeout, which names the ranks that did not finish."""
    from common.launch import DistributedError, DistributedTimeout, run_distributed

    try:
        return run_distributed(worker, world_size=world_size, args=args, timeout_s=timeout_s)
    except DistributedTimeout:
        raise
    except DistributedError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        headline = lines[0].removesuffix(":")
        raise RuntimeError(f"{headline} {lines[-1]}\n{error}") from None


# -----------------------------------------------------------------------------
# Training a stage, with the instruments on


def train_worker(info, spec: dict) -> dict:
    """Train one engine as `spec` says; return losses, parameters, masters and what the instruments saw.

    spec: {"config": ZeROConfig fields (param_dtype by name), "steps", "micro", "seed", optional "units": "none"
    (one root unit), "model_dtype", "offload_trace", "ddp": also train torch DDP on the same data}.
    """
    from lab05_zero.config import apply_zero

    rank, world = info.rank, info.world_size
    steps, micro, seed = spec["steps"], spec["micro"], spec["seed"]
    model = make_model(seed=seed + rank, dtype=DTYPES[spec.get("model_dtype", "float64")],
                       unused=spec.get("unused", False)).to(info.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    counter = [0]
    out: dict = {"snapshots": [], "receive_calls": [], "grads_left": [], "dtypes": {}}
    for name, param in model.named_parameters():  # registered before the engine's hooks, so they run first
        if param.requires_grad:
            def seen(p, name=name):
                counter[0] += 1
                out["snapshots"].append(("backward", name, allocated_units(model)))
            param.register_post_accumulate_grad_hook(seen)
    units = {"none": lambda: [], "unused-first": lambda: [model.blocks[-1].unused_proj, *model.blocks]}
    if spec.get("offload_trace"):
        from lab05_zero import offload

        original = offload.OffloadAdamW.receive

        def receive(self, index, grad, _original=original):
            out["receive_calls"].append(counter[0])
            return _original(self, index, grad)
        offload.OffloadAdamW.receive = receive
    engine = apply_zero(model, config=make_config(spec), units=units[spec["units"]]() if "units" in spec else None)
    for index, block in enumerate(model.blocks):  # after the engine's pre-hooks: they have gathered by now
        block.register_forward_pre_hook(
            lambda m, a, index=index: out["snapshots"].append(("forward", f"blocks.{index}", allocated_units(model))))
    losses, traces = [], []
    for step in range(steps):
        total = torch.zeros((), dtype=torch.float64)
        for tokens, targets in rank_microbatches(step, rank=rank, world_size=world, micro=micro, seed=seed):
            counter[0] = 0
            with CollectiveTrace(counter) as trace:
                loss = engine.loss(tokens.to(info.device), targets.to(info.device)) / micro
                loss.backward()
            traces.append(trace.calls)
            out.setdefault("event_marks", []).append(len(getattr(engine, "events", [])))
            total += loss.detach().double().cpu()
            out["grads_left"].append(sorted(n for n, p in model.named_parameters() if p.grad is not None
                                            and p.grad.untyped_storage().nbytes() > 0))
            out["snapshots"].append(("after_backward", "", allocated_units(model)))
            out["dtypes"] = {"param": str(trainable[0].dtype), "loss": str(loss.dtype),
                             "grad": str(trainable[0].grad.dtype) if trainable[0].grad is not None else ""}
        engine.step()
        out["snapshots"].append(("after_step", "", allocated_units(model)))
        total = total.to(info.device)  # NCCL reduces device tensors only
        dist.all_reduce(total)
        losses.append(float(total) / world)
    out["snapshots"] = [s for s in out["snapshots"] if s[0] != "backward" or spec.get("backward_snapshots")]
    out["losses"] = losses
    out["traces"] = traces
    out["params"], out["logits"] = gathered_parameters(engine, model, probe_tokens(seed))
    out["after_eval"] = allocated_units(model)
    out["masters"] = master_weights(engine)
    out["master_dtypes"] = sorted({str(m.dtype) for m in engine.optimizer.masters})
    out["state_devices"] = sorted({str(t.device) for t in engine.optimizer.state_tensors()})
    out["num_trainable"] = len(trainable)
    out["peak_gathered"] = int(getattr(engine, "peak_gathered_bytes", -1))
    out["events"] = [list(event) for event in getattr(engine, "events", [])]
    if spec.get("ddp"):
        out["ddp_params"] = ddp_training(info, spec)
    return out


def ddp_training(info, spec: dict) -> dict:
    """torch DDP with torch's functional AdamW on the same data: what the expectation stands for."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.adamw import adamw

    rank, world, seed = info.rank, info.world_size, spec["seed"]
    model = make_model(seed=seed + rank).to(info.device)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
    params = [p for p in model.parameters() if p.requires_grad]
    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)) for p in params]
    options = {**ADAMW, **spec.get("adamw", {})}
    for step in range(spec["steps"]):
        batches = rank_microbatches(step, rank=rank, world_size=world, micro=spec["micro"], seed=seed)
        for index, (tokens, targets) in enumerate(batches):
            context = ddp.no_sync() if index < len(batches) - 1 else contextlib.nullcontext()
            with context:  # DDP all-reduces in the backward of a forward that went through it
                logits = ddp(tokens)
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()) / spec["micro"]
                loss.backward()
        with torch.no_grad():
            adamw(params, [p.grad for p in params], [s[0] for s in state], [s[1] for s in state], [],
                  [s[2] for s in state], foreach=False, capturable=False, differentiable=False, fused=None,
                  grad_scale=None, found_inf=None, has_complex=False, amsgrad=False, beta1=options["betas"][0],
                  beta2=options["betas"][1], lr=options["lr"], weight_decay=options["weight_decay"],
                  eps=options["eps"], maximize=False)
        for param in params:
            param.grad = None
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def train(specs: list[dict], world_size: int, timeout_s: float = 150.0) -> list[list[dict]]:
    """Producer: each spec trained on `world_size` ranks, all in one distributed run; [spec][rank] -> results."""
    results = launch(train_many, world_size=world_size, args=(specs,), timeout_s=timeout_s)
    return [[results[rank][index] for rank in range(world_size)] for index in range(len(specs))]


def train_many(info, specs: list[dict]) -> list[dict]:
    return [train_worker(info, spec) for spec in specs]


@contextlib.contextmanager
def local_group(world_size: int, *, cuda: bool = False):
    """This process as rank 0 of a group of `world_size`, without spawning: a real group of one (gloo, or NCCL on
    GPU 0 when `cuda`), or torch's fake process group for world_size > 1 (its collectives do nothing, so values are
    meaningless but every shape, storage and hook is what rank 0 of a real run has)."""
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if world_size == 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield DistInfo(rank=0, local_rank=0, world_size=world_size, backend="nccl" if cuda else "gloo", device=device)
    finally:
        dist.destroy_process_group()


def train_local(specs: list[dict], world_size: int, cuda: bool = False) -> list[dict]:
    """Producer: train_worker for each spec in this process, as rank 0 of local_group(world_size)."""
    with local_group(world_size, cuda=cuda) as info:
        return [train_worker(info, spec) for spec in specs]


# -----------------------------------------------------------------------------
# Memory


def memory_worker(info, cases: list[list], param_dtype: str = "bfloat16") -> dict:
    """For each (stage, offload): `param_dtype` in flight, one step; the submission's measure_memory, the test's
    count of every live tensor byte before and after, and ZeRO-3's gathered bytes as the test sees them."""
    out = {}
    for stage, offload in cases:
        out[f"{stage}{'+offload' if offload else ''}"] = _memory_case(info, stage, offload, DTYPES[param_dtype])
        gc.collect()  # the case's engine and model are gone before the next one counts its "before"
    return out


def _memory_case(info, stage: int, offload: bool, param_dtype: torch.dtype) -> dict:
    from lab05_zero.config import ZeROConfig, apply_zero
    from lab05_zero.memory import measure_memory

    batches = rank_microbatches(0, rank=info.rank, world_size=info.world_size, micro=1, seed=5)
    model = make_model(seed=5 + info.rank, dtype=torch.float32).to(info.device)
    before = live_tensor_bytes()
    config = ZeROConfig(stage=stage, param_dtype=param_dtype, offload=offload, **ADAMW)
    engine = apply_zero(model, config=config)
    gathered = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, a: gathered.append(sum(allocated_units(model).values())))
    for tokens, targets in batches:
        engine.loss(tokens.to(info.device), targets.to(info.device)).backward()
    engine.step()
    measured = measure_memory(engine)
    del batches, tokens, targets, block
    after = live_tensor_bytes()
    return {"measured": [float(measured.params), float(measured.grads), float(measured.optimizer),
                         float(measured.host)],
            "live_delta": after - before, "gathered": max(gathered),
            "peak": int(getattr(engine, "peak_gathered_bytes", -1))}


def measure(cases: list[list], world_size: int, param_dtype: str = "bfloat16") -> dict:
    """Producer: memory_worker as rank 0 of local_group(world_size) (memory does not depend on the values)."""
    with local_group(world_size) as info:
        return memory_worker(info, cases, param_dtype)


# -----------------------------------------------------------------------------
# Checkpoints


def checkpoint_worker(info, phase: dict) -> dict:
    """Build an engine (phase["stage"]), load phase["load"] if given, train steps [first, first + steps), save to
    phase["save"] if given; return the master weights and the files written."""
    from lab05_zero.checkpoint import load_checkpoint, save_checkpoint
    from lab05_zero.config import apply_zero

    rank, world = info.rank, info.world_size
    # the first phase starts from rank 0's model (seed); later ones from other weights: the load must matter
    model = make_model(seed=phase["seed"] + rank + (10 if phase.get("load") else 0)).to(info.device)
    spec = {"config": {"stage": phase["stage"], "offload": phase.get("offload", False)}}
    engine = apply_zero(model, config=make_config(spec))
    if phase.get("load"):
        load_checkpoint(engine, phase["load"])
    for step in range(phase["first"], phase["first"] + phase["steps"]):
        tokens, targets = global_batch(step, world_size=4, micro=1, seed=phase["seed"])  # 8 rows, any world size
        mine = tokens.chunk(world)[rank], targets.chunk(world)[rank]
        engine.loss(mine[0].to(info.device), mine[1].to(info.device)).backward()
        engine.step()
    if phase.get("save"):
        save_checkpoint(engine, phase["save"])
    dist.barrier()
    return {"masters": master_weights(engine), "step_count": int(engine.optimizer.step_count),
            "files": sorted(os.listdir(phase["save"])) if phase.get("save") else [],
            "frozen": model.blocks[0].attn_norm.weight.detach().cpu().clone()}


def reshard(phases: list[dict], timeout_s: float = 150.0) -> list[list[dict]]:
    """Producer: each phase on its own world size, in order, sharing one checkpoint folder; [phase][rank]."""
    folder = tempfile.mkdtemp(prefix="lab05-ckpt-")
    results = []
    for index, phase in enumerate(phases):
        phase = dict(phase)
        phase["load"] = os.path.join(folder, f"phase{index - 1}") if index > 0 else None
        phase["save"] = os.path.join(folder, f"phase{index}") if index < len(phases) - 1 else None
        results.append(launch(checkpoint_worker, world_size=phase["world_size"], args=(phase,), timeout_s=timeout_s))
    return results


# -----------------------------------------------------------------------------
# Verdicts (grader side): compare a run with the expectation


def check_training(results: list[dict], want: dict, *, name: str, inputs: str, dtype: str = "float64",
                   masters: bool = True) -> None:
    """Every rank's losses, gathered parameters, logits and master weights equal the single-process expectation."""
    from common.testing import check_all_close, check_close

    for rank, got in enumerate(results):
        where = f"{inputs}, rank={rank}"
        check_close(torch.tensor(got["losses"], dtype=torch.float64), torch.tensor(want["losses"], dtype=torch.float64),
                    name=f"{name}: loss of each step (mean over ranks)", inputs=where, dtype=dtype)
        used = {key: value for key, value in want["params"].items() if "unused" not in key}  # no forward sees it
        check_all_close(got["params"], used, name=f"{name}: parameters after training, as the model sees them in a "
                        "forward", inputs=where, dtype=dtype)
        check_close(got["logits"], want["logits"], name=f"{name}: logits of a no-grad forward after training",
                    inputs=where, dtype=dtype)
        if masters:
            trainable = {key: value for key, value in want["params"].items() if key in got["masters"]}
            check_all_close(got["masters"], {key: want["params"][key] for key in got["masters"]},
                            name=f"{name}: master weights (all ranks' shards)", inputs=where,
                            dtype="float64" if dtype == "float64" else "float32")
            assert len(trainable) == len(got["masters"])


# -----------------------------------------------------------------------------
# Peers: DeepSpeed ZeRO 1-3 and FSDP2, next to the submission's stages, in the same ranks


def peer_worker(info, steps: int, seed: int, with_deepspeed: bool = True) -> dict:
    """Loss trajectories (mean over ranks) of the submission's stages 1-3, DeepSpeed's stages 1-3 (torch's AdamW,
    no op built) and FSDP2's fully_shard (one unit per block), all fp32 on the same data."""
    from lab05_zero.config import ZeROConfig, apply_zero

    rank, world = info.rank, info.world_size
    out: dict = {}

    def trajectory(loss_fn, backward, step_fn) -> list[float]:
        losses = []
        for step in range(steps):
            tokens, targets = rank_microbatches(step, rank=rank, world_size=world, micro=1, seed=seed)[0]
            loss = loss_fn(tokens.to(info.device), targets.to(info.device))
            backward(loss)
            step_fn()
            total = loss.detach().double().cpu().clone()
            dist.all_reduce(total)
            losses.append(float(total) / world)
        return losses

    for stage in (1, 2, 3):
        engine = apply_zero(make_model(seed=seed + rank, dtype=torch.float32).to(info.device),
                            config=ZeROConfig(stage=stage, **ADAMW))
        out[f"ours ZeRO-{stage}"] = trajectory(engine.loss, lambda loss: loss.backward(), engine.step)
    if with_deepspeed:
        out.update(deepspeed_trajectories(info, trajectory, seed))
    out.update(fsdp2_trajectory(info, trajectory, seed))
    return out


def deepspeed_trajectories(info, trajectory, seed: int) -> dict:
    import deepspeed
    import deepspeed.ops

    extensions = tempfile.mkdtemp(prefix="lab05-torch-extensions-")
    os.environ["TORCH_EXTENSIONS_DIR"] = extensions
    # every JIT-compiled op reads as unavailable, so DeepSpeed builds nothing (its CPU shared-memory all-reduce
    # would take minutes to compile); torch's AdamW does the optimizer step
    deepspeed.ops.__compatible_ops__ = {}
    out = {}
    for stage in (1, 2, 3):
        model = make_model(seed=seed, dtype=torch.float32).to(info.device)  # rank 0's initial weights
        # DeepSpeed 0.19 clips the gradient norm at 1.0 unless told otherwise: the other runs do not clip
        config = {"train_micro_batch_size_per_gpu": ROWS, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
                  "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": ADAMW["lr"], "betas": list(ADAMW["betas"]),
                                                            "eps": ADAMW["eps"], "weight_decay": ADAMW["weight_decay"],
                                                            "torch_adam": True, "adam_w_mode": True}}}
        engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
        out[f"DeepSpeed ZeRO-{stage}"] = trajectory(engine.module.loss, engine.backward, engine.step)
    out["extensions built"] = sorted(os.listdir(extensions))
    return out


def fsdp2_trajectory(info, trajectory, seed: int) -> dict:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    model = make_model(seed=seed, dtype=torch.float32).to(info.device)  # rank 0's initial weights
    mesh = DeviceMesh.from_group(dist.group.WORLD, info.device.type)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "loss")  # model.loss runs the root's gather like model(...) does
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)

    def step() -> None:
        optimizer.step()
        optimizer.zero_grad()
    return {"FSDP2 fully_shard": trajectory(model.loss, lambda loss: loss.backward(), step)}


def peers(world_size: int, steps: int, seed: int, with_deepspeed: bool = True, timeout_s: float = 240.0) -> list[dict]:
    """Producer: peer_worker on `world_size` ranks."""
    return launch(peer_worker, world_size=world_size, args=(steps, seed, with_deepspeed), timeout_s=timeout_s)
