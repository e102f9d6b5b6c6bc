"""The serving engine: requests in, tokens out, one model step at a time over a paged KV cache.

What it saves: against static batching (HF `generate` over fixed batches), continuous batching keeps the batch full
(a finished sequence's slot is refilled at the next step), and the paged cache lets far more sequences run at once
(no max-length reservation), so the GPU reads each weight once for many more tokens. vLLM (Kwon et al. 2023,
arXiv:2309.06180) reported 2-4x the throughput of the best systems of the day; against HF `generate` the gap is larger.

One step (`LLMEngine.step`), the loop of vLLM and of nano-vllm:

    step = scheduler.schedule()                     which sequences prefill, which decode (scheduler.py)
    runner.copy_blocks(step.copies)                 copy-on-write before anything writes
    logits = runner.prefill(...), runner.decode(...)    one forward each (model_runner.py)
    token = sample(logits)                          per sequence (sampling.py)
    append it; a sequence that produced a stop token or reached max_tokens (or max_model_len) finishes and frees
    its blocks; a prompt with SamplingParams.n > 1 forks n - 1 sequences sharing its blocks after its prefill

Streaming: every step returns the tokens it produced (TokenEvent), so a caller can show them as they come.

Usage (vLLM's offline API):
    llm = LLM(model, config=EngineConfig(block_size=16))
    outputs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=20))
    outputs[0].outputs[0].token_ids
    for event in llm.stream(prompts, params): print(event.request_id, event.token_id)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn

from .block_manager import BlockManager, BlockManagerConfig
from .kv_arithmetic import kv_bytes_per_token
from .metrics import RequestMetrics, StepRecord
from .model_runner import ATTENTION_BACKENDS, ModelRunner, llama_parts
from .sampling import SamplingParams, sample_next_tokens
from .scheduler import Scheduler, SchedulerConfig, Sequence

# -----------------------------------------------------------------------------
# Config and outputs


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine sizes its cache and batches.

    block_size: token slots per KV block.
    num_blocks: KV blocks; None: as many as fit in gpu_memory_utilization of the GPU beside the weights (on a CPU:
        max_num_seqs sequences of max_model_len), never more than max_num_seqs * blocks per max_model_len.
    max_num_seqs: running sequences at most (the decode batch).
    max_num_batched_tokens: tokens one step may compute; None: max(2048, max_model_len, max_num_seqs).
    max_model_len: the longest sequence (prompt + output); None: the model's maximum position.
    enable_prefix_caching: share the K/V of common prompt prefixes (block_manager.py).
    attention_backend: "triton" or "torch" for decode attention; None: triton on a GPU, torch on a CPU (where the
        Triton interpreter is slow).
    cuda_graphs: capture decode steps in CUDA graphs (model_runner.py); None: on a GPU only. True on a CPU runs the
        same padded path without capture.
    gpu_memory_utilization: fraction of GPU memory the engine may fill, in (0, 1].
    seed: seeds the generators of requests that give no seed.
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = False
    attention_backend: str | None = None
    cuda_graphs: bool | None = None
    gpu_memory_utilization: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_blocks", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1 (or None), got {getattr(self, name)}")
        if self.attention_backend not in (None, *ATTENTION_BACKENDS):
            raise ValueError(f"attention_backend must be None or one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class CompletionOutput:
    """Output `index` of a request: its tokens so far; finish_reason "stop", "length", or None while it runs."""

    index: int
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token: output `index` of request `request_id` produced token_id (finish_reason set on its last)."""

    request_id: int
    index: int
    token_id: int
    finish_reason: str | None


@dataclass
class _Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    outputs: list[CompletionOutput] = field(default_factory=list)


# -----------------------------------------------------------------------------
# The engine


class LLMEngine:
    """Continuous batching over a paged KV cache. Add requests any time; each `step()` advances every running one.

    Args:
        model: common.model.Transformer, a HF LlamaForCausalLM, or the path of a saved HF Llama (loaded to the GPU
            when there is one).
        config: sizes and switches (EngineConfig()).
    """

    def __init__(self, model: nn.Module | str, config: EngineConfig | None = None):
        config = config or EngineConfig()
        model = _load(model)
        parts = llama_parts(model)
        weight = next(model.parameters())
        self.config, self.device, self.vocab_size = config, weight.device, parts.vocab_size
        self.max_model_len = min(parts.max_positions, config.max_model_len or parts.max_positions)
        blocks_per_seq = -(-self.max_model_len // config.block_size)
        num_blocks = config.num_blocks or _default_num_blocks(model, parts, config, blocks_per_seq)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(f"the cache ({num_blocks} blocks x {config.block_size} slots) cannot hold one sequence "
                             f"of max_model_len ({self.max_model_len}) tokens: raise num_blocks or lower max_model_len")
        budget = config.max_num_batched_tokens or max(2048, self.max_model_len, config.max_num_seqs)
        if budget < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens ({budget}) must be >= max_model_len ({self.max_model_len}): "
                             "every prompt must fit in one step")
        self.block_manager = BlockManager(BlockManagerConfig(num_blocks=num_blocks, block_size=config.block_size,
                                                             enable_prefix_caching=config.enable_prefix_caching))
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget),
                                   self.block_manager)
        on_gpu = self.device.type == "cuda"
        backend = config.attention_backend or ("triton" if on_gpu else "torch")
        cuda_graphs = on_gpu if config.cuda_graphs is None else config.cuda_graphs
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=config.block_size,
                                  max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
                                  attention_backend=backend, cuda_graphs=cuda_graphs)
        self.requests: dict[int, _Request] = {}
        self.owners: dict[int, tuple[_Request, int]] = {}  # seq_id -> (its request, its output index)
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> its generator (sampled requests only)
        self.seed_source = random.Random(config.seed)
        self.next_request_id = 0
        self.next_seq_id = 0
        self.num_preemptions = 0
        self.trace: list[StepRecord] = []
        self.clock = time.perf_counter  # tests may substitute a deterministic clock

    # ---- requests

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Reject a request the engine could never serve, before it touches any state.

        Raises:
            ValueError: an empty prompt, a token outside [0, vocab_size), a prompt of max_model_len tokens or more
                (no room for one output token: the cache and the model hold max_model_len), or n > max_num_seqs.
            TypeError: params is not a SamplingParams.
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        # BEGIN SOLUTION
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: a request needs at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; the cache holds at most max_model_len "
                             f"= {self.max_model_len} per sequence, so a prompt may have {self.max_model_len - 1}")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.config.max_num_seqs})")
        # END SOLUTION

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; it joins the batch at the next step with room. Returns its request id.

        Raises:
            ValueError / TypeError: see `check_prompt`; nothing is queued then.
        """
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        self.check_prompt(prompt, params)
        request = _Request(self.next_request_id, prompt, params, RequestMetrics(arrival_time=self.clock()))
        self.next_request_id += 1
        self.requests[request.request_id] = request
        seq = self._new_sequence(request, list(prompt))
        seq.group_size = params.n
        self.scheduler.add(seq)
        return request.request_id

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def output(self, request_id: int) -> RequestOutput:
        """The request's outputs so far (all of them once it finished)."""
        request = self.requests[request_id]
        finished = len(request.outputs) == request.params.n and all(o.finish_reason for o in request.outputs)
        return RequestOutput(request.request_id, request.prompt, request.outputs, finished, request.metrics)

    # ---- one step

    def step(self) -> list[TokenEvent]:
        """Schedule, run the model, sample, and retire finished sequences; returns the tokens produced."""
        step = self.scheduler.schedule()
        num_batched_tokens = step.num_batched_tokens  # before the sampled tokens lengthen the sequences
        self.num_preemptions += len(step.preempted)
        produced: list[tuple[Sequence, int]] = []
        # BEGIN SOLUTION
        self.runner.copy_blocks(step.copies)
        tables = self.block_manager.block_tables
        if step.prefills:
            logits = self.runner.prefill([s.token_ids for s in step.prefills],
                                         num_cached=[s.num_cached_tokens for s in step.prefills],
                                         block_tables=[tables[s.seq_id] for s in step.prefills])
            rows, seqs = [], []
            for row, seq in enumerate(step.prefills):
                group = [seq] + [self._fork(seq, index) for index in range(1, seq.group_size)]
                seq.group_size = 1  # forked once; after a preemption it is recomputed alone
                rows += [row] * len(group)
                seqs += group
            produced += zip(seqs, self._sample(logits[rows], seqs))
        if step.decodes:
            logits = self.runner.decode([s.token_ids[-1] for s in step.decodes],
                                        block_tables=[tables[s.seq_id] for s in step.decodes],
                                        context_lens=[s.num_tokens for s in step.decodes])
            produced += zip(step.decodes, self._sample(logits, step.decodes))
        # END SOLUTION
        now = self.clock()
        events = [self._append(seq, token, now) for seq, token in produced]
        self._record(step, num_batched_tokens, now)
        return events

    # ---- helpers

    def _new_sequence(self, request: _Request, token_ids: list[int]) -> Sequence:
        """A sequence for output len(request.outputs) of the request, with its own generator if it samples."""
        seq = Sequence(seq_id=self.next_seq_id, token_ids=token_ids, num_prompt_tokens=len(request.prompt),
                       request=request)
        self.next_seq_id += 1
        index = len(request.outputs)
        request.outputs.append(CompletionOutput(index=index, token_ids=[]))
        request.metrics.token_times.append([])
        self.owners[seq.seq_id] = (request, index)
        if request.params.temperature > 0:
            seed = request.params.seed + index if request.params.seed is not None else self.seed_source.getrandbits(63)
            self.generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seed)
        return seq

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """Output `index` of the parent's request, sharing the parent's blocks (parallel sampling)."""
        # BEGIN SOLUTION
        child = self._new_sequence(parent.request, list(parent.token_ids))
        self.block_manager.fork(parent.seq_id, child.seq_id)
        self.scheduler.add_running(child)
        return child
        # END SOLUTION

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        return sample_next_tokens(logits, [s.request.params for s in seqs],
                                  [self.generators.get(s.seq_id) for s in seqs])

    def _append(self, seq: Sequence, token: int, now: float) -> TokenEvent:
        """Add a sampled token; finish the sequence on a stop token, max_tokens or max_model_len."""
        request, index = self.owners[seq.seq_id]
        # BEGIN SOLUTION
        seq.token_ids.append(token)
        output = request.outputs[index]
        output.token_ids.append(token)
        if token in request.params.stop_token_ids:
            output.finish_reason = "stop"
        elif len(output.token_ids) >= request.params.max_tokens or seq.num_tokens >= self.max_model_len:
            output.finish_reason = "length"
        if output.finish_reason is not None:
            self.scheduler.finish(seq)
        # END SOLUTION
        metrics = request.metrics
        metrics.token_times[index].append(now)
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        if output.finish_reason is not None and len(request.outputs) == request.params.n and all(
                o.finish_reason for o in request.outputs):
            metrics.finish_time = now
        return TokenEvent(request.request_id, index, token, output.finish_reason)

    def _record(self, step, num_batched_tokens: int, now: float) -> None:
        manager = self.block_manager
        self.trace.append(StepRecord(
            time=now, num_prefills=len(step.prefills), num_decodes=len(step.decodes),
            num_batched_tokens=num_batched_tokens, num_preempted=len(step.preempted), num_copies=len(step.copies),
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            used_blocks=manager.num_used_blocks, stored_tokens=sum(len(t) for t in manager.token_ids.values())))


def _load(model: nn.Module | str) -> nn.Module:
    """A module as is; a path: the HF model saved there, on the GPU when there is one."""
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be an nn.Module or the path of a saved HF model, got {type(model).__name__}")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype="auto")  # the dtype it was saved in
    return loaded.to("cuda") if torch.cuda.is_available() else loaded


def _default_num_blocks(model: nn.Module, parts, config: EngineConfig, blocks_per_seq: int) -> int:
    """As many blocks as fit in the GPU's usable memory beside the weights (a working reserve kept free), capped at
    what max_num_seqs sequences of max_model_len need; on a CPU, exactly that cap."""
    cap = config.max_num_seqs * blocks_per_seq
    weight = next(model.parameters())
    if weight.device.type != "cuda":
        return cap
    per_block = config.block_size * kv_bytes_per_token(
        num_layers=len(parts.layers), num_heads=parts.num_heads, head_dim=parts.head_dim, dtype=weight.dtype,
        attention="gqa", num_kv_heads=parts.num_kv_heads)
    free, total = torch.cuda.mem_get_info(weight.device)
    reserve = 4 * 2**30  # activations of the largest step, CUDA graphs, the allocator's slack
    usable = free - (1 - config.gpu_memory_utilization) * total - reserve
    return max(1, min(cap, int(usable // per_block)))


# -----------------------------------------------------------------------------
# The offline API


class LLM:
    """vLLM's offline interface: `LLM(model).generate(prompts, SamplingParams(...))`.

    Args:
        model: see LLMEngine.
        config: EngineConfig.
    """

    def __init__(self, model: nn.Module | str, *, config: EngineConfig | None = None):
        self.engine = LLMEngine(model, config)

    def generate(self, prompts: list[list[int]] | list[str],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order.

        Args:
            prompts: token id lists, or strings (byte-level, for models with a 256-token vocabulary).
            params: one SamplingParams for all, or one per prompt.

        Raises:
            ValueError / TypeError: a prompt the engine cannot serve (its index is named); nothing runs then.
        """
        ids = self._add(prompts, params)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return [self.engine.output(i) for i in ids]

    def stream(self, prompts: list[list[int]] | list[str],
               params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[TokenEvent]:
        """Like generate, but yield each token as soon as a step produces it (request ids count from the first
        prompt of this call, in prompt order)."""
        ids = self._add(prompts, params)
        first = ids[0] if ids else 0
        while self.engine.has_unfinished_requests():
            for event in self.engine.step():
                yield TokenEvent(event.request_id - first, event.index, event.token_id, event.finish_reason)

    def _add(self, prompts, params) -> list[int]:
        if isinstance(prompts, str):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        encoded = [_encode(p, self.engine.vocab_size) for p in prompts]
        for index, (prompt, p) in enumerate(zip(encoded, params_list)):
            try:
                self.engine.check_prompt(prompt, p)
            except (ValueError, TypeError) as error:
                raise type(error)(f"prompt {index}: {error}") from None
        return [self.engine.add_request(prompt, p) for prompt, p in zip(encoded, params_list)]


def _encode(prompt: list[int] | str, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if vocab_size != 256:
            raise TypeError(f"text prompts need a byte-level model (vocab 256), this one has {vocab_size}: pass ids")
        from common.data import ByteTokenizer

        return ByteTokenizer().encode(prompt).tolist()
    return [int(t) for t in prompt]
