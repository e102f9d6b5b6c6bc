"""Lab 08, part 7: the engine (engine.py): continuous batching end to end.

The grader decodes every request itself with the same seeded model, greedily and without any cache (one full forward
pass per token, serving_cases.greedy_continuation), or with HF `generate`; the engine's outputs must match token for
token: with room for everything, under preemption with a cache too small for all requests, with requests arriving
mid-run, with parallel sampling (copy-on-write), with prefix caching, through the Triton kernel and through the padded
CUDA-graph path. Then streaming, seeded sampling and bad input.
"""

import pytest
import torch


def _cases():
    """serving_cases, under its name here (the grader) or in the worker."""
    try:
        import serving_cases
    except ImportError:
        from autograder.lab08_serving import serving_cases
    return serving_cases


# -----------------------------------------------------------------------------
# Producers: run in the worker


def _model(spec: dict):
    cases = _cases()
    spec = dict(spec)
    kind, dtype = spec.pop("kind", "common"), getattr(torch, spec.pop("dtype", "float64"))
    return cases.hf_llama(dtype=dtype, **spec) if kind == "hf" else cases.tiny_llama(dtype=dtype, **spec)


def serve(requests: list[dict], *, config: dict, model: dict) -> dict:
    """Run requests ({"prompt", "params", "arrive": step}) through an LLMEngine, adding each before step `arrive`."""
    import dataclasses

    from lab08_serving.engine import EngineConfig, LLMEngine
    from lab08_serving.sampling import SamplingParams

    with _cases().one_thread():
        engine = LLMEngine(_model(model), EngineConfig(**config))
        ids, step, rejected = {}, 0, {}
        last_arrival = max(r.get("arrive", 0) for r in requests)
        while step <= last_arrival or engine.has_unfinished_requests():
            for index, request in enumerate(requests):
                if request.get("arrive", 0) == step:
                    try:
                        ids[index] = engine.add_request(request["prompt"], SamplingParams(**request["params"]))
                    except ValueError as error:
                        rejected[index] = str(error)
            if engine.has_unfinished_requests():
                engine.step()
            step += 1
            if step > 2000:
                raise RuntimeError("the engine did not finish within 2000 steps")
        outputs = {i: [[o.token_ids, o.finish_reason] for o in engine.output(r).outputs] for i, r in ids.items()}
        metrics = {i: engine.output(r).metrics for i, r in ids.items()}
        return {"outputs": outputs, "rejected": rejected, "preemptions": engine.num_preemptions,
                "trace": [dataclasses.asdict(record) for record in engine.trace],
                "free": engine.block_manager.num_free_blocks, "num_blocks": engine.block_manager.config.num_blocks,
                "metrics": {i: {"arrival": m.arrival_time, "first": m.first_token_time, "finish": m.finish_time,
                                "times": m.token_times} for i, m in metrics.items()}}


def offline(prompts: list, params: dict, *, config: dict, model: dict, stream: bool = False, path: bool = False):
    """LLM(model).generate(prompts, SamplingParams(**params)), or the events of LLM.stream; `path`: the model is
    saved as a HF checkpoint in a temporary folder and loaded from there."""
    import tempfile

    from lab08_serving.engine import LLM, EngineConfig
    from lab08_serving.sampling import SamplingParams

    with _cases().one_thread(), tempfile.TemporaryDirectory() as folder:
        built = _model(model)
        if path:
            built.save_pretrained(folder)
            built = folder
        llm = LLM(built, config=EngineConfig(**config))
        if stream:
            return [[e.request_id, e.index, e.token_id, e.finish_reason]
                    for e in llm.stream(prompts, SamplingParams(**params))]
        return [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, SamplingParams(**params))]


def engine_error(prompt: list[int], params: dict, *, config: dict) -> None:
    from lab08_serving.engine import EngineConfig, LLMEngine
    from lab08_serving.sampling import SamplingParams

    engine = LLMEngine(_cases().tiny_llama(), EngineConfig(**config))
    engine.add_request(prompt, SamplingParams(**params))


def offline_error(prompts: list, *, config: dict) -> None:
    from lab08_serving.engine import LLM, EngineConfig
    from lab08_serving.sampling import SamplingParams

    LLM(_cases().tiny_llama(), config=EngineConfig(**config)).generate(prompts, SamplingParams(max_tokens=2))


# -----------------------------------------------------------------------------
# The grader's expectations


def _expected(requests: list[dict], model: dict, max_len: int = 64) -> dict:
    cases = _cases()
    spec = dict(model)
    spec.pop("kind", None)
    with cases.one_thread():
        built = cases.tiny_llama(dtype=getattr(torch, spec.pop("dtype", "float64")), **spec)
        expected = {}
        for index, request in enumerate(requests):
            params = request["params"]
            tokens = cases.greedy_continuation(built, request["prompt"], params["max_tokens"],
                                               tuple(params.get("stop_token_ids", ())), max_len=max_len)
            stopped = tokens and tokens[-1] in params.get("stop_token_ids", ())
            expected[index] = [[tokens, "stop" if stopped else "length"]] * params.get("n", 1)
    return expected


def _requests(lengths, max_tokens, *, seed, arrivals=None, **params):
    prompts = _cases().prompts_of(lengths, seed=seed)
    arrivals = arrivals or [0] * len(prompts)
    return [{"prompt": p, "params": dict(temperature=0.0, max_tokens=m, **params), "arrive": a}
            for p, m, a in zip(prompts, max_tokens, arrivals)]


def _check_outputs(got: dict, expected: dict, what: str) -> None:
    for index, want in expected.items():
        assert index in got["outputs"], f"{what}: request {index} produced no output ({got['rejected'].get(index)})"
        have = got["outputs"][index]
        for n, ((tokens, reason), (want_tokens, want_reason)) in enumerate(zip(have, want)):
            first = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens)) if a != b), None)
            assert tokens == want_tokens, (
                f"{what}: request {index} output {n} differs from plain greedy decoding"
                + (f" from token {first} on" if first is not None else f" in length ({len(tokens)} tokens, "
                   f"expected {len(want_tokens)})") + f":\n  got      {tokens}\n  expected {want_tokens}")
            assert reason == want_reason, (
                f"{what}: request {index} output {n} finished by {reason!r}, not {want_reason!r}")
        assert len(have) == len(want), f"{what}: request {index} has {len(have)} outputs, expected {len(want)}"
    assert got["free"] == got["num_blocks"], f"{what}: {got['num_blocks'] - got['free']} blocks still held at the end"


BASE = dict(lengths=[5, 17, 3, 30, 9, 12], max_tokens=[7, 20, 30, 10, 25, 16])
TINY = dict(kind="common", seed=0)

# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(2)
@pytest.mark.parametrize("prompt, params, config, match", [
    ([], dict(max_tokens=3), dict(), "empty"),
    (list(range(64)), dict(max_tokens=3), dict(), "max_model_len"),
    (list(range(30)), dict(max_tokens=3), dict(max_model_len=30), "max_model_len"),
    ([1, 2, 300], dict(max_tokens=3), dict(), "256"),
    ([1, 2, 3], dict(max_tokens=3, n=5), dict(max_num_seqs=4), "max_num_seqs"),
])
def test_bad_requests_are_rejected(student, prompt, params, config, match):
    """An empty prompt, a prompt the cache can never hold with room for one token (max_model_len tokens or more),
    token ids outside the vocabulary, more outputs than running slots: ValueError naming the rule."""
    with pytest.raises(ValueError, match=match):
        student.run(engine_error, prompt, params, config=config)


@pytest.mark.points(2)
def test_a_rejected_request_leaves_the_others_alone(student):
    """Between two good requests, one too long for the cache is rejected at once; the others run as if it never
    came. LLM.generate rejects a batch holding such a prompt before running anything, naming its index."""
    requests = _requests([5, 70, 7], [6, 4, 5], seed=13)
    got = student.run(serve, requests, config=dict(block_size=4), model=TINY)
    assert 1 in got["rejected"] and "max_model_len" in got["rejected"][1], f"rejections: {got['rejected']}"
    expected = _expected([requests[0], requests[2]], TINY)
    _check_outputs({**got, "outputs": {0: got["outputs"][0], 1: got["outputs"][2]}}, expected, "LLMEngine")
    with pytest.raises(ValueError, match="prompt 1"):
        student.run(offline_error, [r["prompt"] for r in requests], config=dict(block_size=4))


@pytest.mark.points(3)
@pytest.mark.parametrize("block_size", [4, 3])
def test_greedy_outputs_equal_plain_decoding(student, block_size):
    """Six requests of mixed lengths, one ending at a stop token, all admitted at once: token for token the plain
    model's greedy continuation, with the right finish reasons, and every block free at the end."""
    requests = _requests(**BASE, seed=1)
    plain = _expected(requests, TINY)
    requests[2]["params"]["stop_token_ids"] = [plain[2][0][0][5], 255]  # stops at its sixth token
    got = student.run(serve, requests, config=dict(block_size=block_size), model=TINY)
    _check_outputs(got, _expected(requests, TINY), f"LLMEngine (block_size={block_size})")


@pytest.mark.points(3)
@pytest.mark.parametrize("num_blocks, block_size, max_num_seqs", [(17, 4, 4), (22, 3, 6)])
def test_preemption_with_a_cache_too_small(student, num_blocks, block_size, max_num_seqs):
    """A cache that holds one longest sequence but not all requests at once: sequences are preempted and recomputed,
    and the outputs are still exactly the greedy ones."""
    requests = _requests(**BASE, seed=2)
    got = student.run(serve, requests, config=dict(block_size=block_size, num_blocks=num_blocks,
                                                   max_num_seqs=max_num_seqs), model=TINY)
    _check_outputs(got, _expected(requests, TINY), f"LLMEngine ({num_blocks} blocks of {block_size})")
    assert got["preemptions"] > 0, "no preemption happened, though the requests outgrow the cache"


@pytest.mark.points(2)
def test_requests_arriving_mid_run(student):
    """Requests added between steps join the running batch (their prefill runs beside others' decodes)."""
    requests = _requests(**BASE, seed=3, arrivals=[0, 0, 3, 3, 7, 12])
    got = student.run(serve, requests, config=dict(block_size=4, num_blocks=24, max_num_seqs=4), model=TINY)
    _check_outputs(got, _expected(requests, TINY), "LLMEngine (arrivals at steps 0, 0, 3, 3, 7, 12)")
    assert any(r["num_prefills"] and r["num_decodes"] for r in got["trace"]), "no step mixed prefill and decode"


@pytest.mark.points(1)
def test_sequences_stop_at_max_model_len(student):
    """A sequence ends ("length") when it holds max_model_len tokens, even before max_tokens."""
    requests = _requests([36, 20], [30, 30], seed=4)
    got = student.run(serve, requests, config=dict(block_size=4, max_model_len=40), model=TINY)
    _check_outputs(got, _expected(requests, TINY, max_len=40), "LLMEngine (max_model_len=40)")


@pytest.mark.points(2)
def test_parallel_sampling_shares_blocks_copy_on_write(student):
    """n = 3 greedy outputs of one prompt (and n = 2 of another) fork after the prefill, sharing its blocks; their
    first appends copy the shared, partly filled last block. All outputs equal the greedy continuation. n may equal
    max_num_seqs (3 here)."""
    requests = _requests([7, 10], [9, 6], seed=5)
    requests[0]["params"]["n"], requests[1]["params"]["n"] = 3, 2
    got = student.run(serve, requests, config=dict(block_size=4, max_num_seqs=3), model=TINY)
    _check_outputs(got, _expected(requests, TINY), "LLMEngine (n = 3 and n = 2)")
    assert sum(r["num_copies"] for r in got["trace"]) == 3, (
        f"copy-on-write copies per step {[r['num_copies'] for r in got['trace']]}: expected 3 in all "
        "(the 7-token and 10-token prompts end in shared, partly filled blocks: n - 1 copies each)")


@pytest.mark.points(2)
def test_prefix_caching_reuses_a_shared_prompt(student):
    """With prefix caching, later prompts that share a 13-token system prompt with a running one compute only their
    uncached tokens (full blocks of the prefix, never the last prompt token), and the outputs do not change."""
    system = _cases().prompts_of([13], seed=60)[0]
    requests = _requests([3, 8, 1], [8, 6, 7], seed=6, arrivals=[0, 1, 1])
    for request in requests:
        request["prompt"] = system + request["prompt"]
    got = student.run(serve, requests, config=dict(block_size=4, enable_prefix_caching=True), model=TINY)
    _check_outputs(got, _expected(requests, TINY), "LLMEngine (prefix caching)")
    cached = [12, 12]  # three full blocks of the system prompt, all within the first len - 1 tokens
    expected = 1 + sum(len(r["prompt"]) - c for r, c in zip(requests[1:], cached))
    assert got["trace"][1]["num_batched_tokens"] == expected, (
        f"step 1 computed {got['trace'][1]['num_batched_tokens']} tokens, expected {expected}: one decode and the "
        "two new prompts minus their 12 cached tokens each")


@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_triton_backend_on_cpu(student):
    """The engine with the Triton decode kernel (float32, the interpreter) and the padded CUDA-graph path."""
    model = dict(kind="common", seed=7, dtype="float32")
    requests = _requests([6, 11, 4], [5, 4, 6], seed=7)
    got = student.run(serve, requests, config=dict(block_size=4, attention_backend="triton", cuda_graphs=True,
                                                   max_num_seqs=5), model=model)
    _check_outputs(got, _expected(requests, model), "LLMEngine (triton, cuda_graphs)")


@pytest.mark.points(1)
def test_padded_decode_path(student):
    """cuda_graphs=True on a CPU: decode batches padded to the captured sizes, the same outputs."""
    requests = _requests(**BASE, seed=8)
    got = student.run(serve, requests, config=dict(block_size=4, cuda_graphs=True, max_num_seqs=6), model=TINY)
    _check_outputs(got, _expected(requests, TINY), "LLMEngine (cuda_graphs=True)")


@pytest.mark.points(3)
@pytest.mark.time_limit(180)
def test_hf_llama_matches_hf_generate(student):
    """A HF LlamaForCausalLM built from a config (float64), saved to a folder and served from there
    (`LLM(path)`): the engine's greedy outputs are HF generate's."""
    from autograder.lab08_serving.serving_cases import hf_greedy, hf_llama, one_thread, prompts_of

    prompts = prompts_of([6, 13, 2, 9], seed=9)
    config = dict(block_size=4, num_blocks=30, max_num_seqs=3)
    got = student.run(offline, prompts, dict(temperature=0.0, max_tokens=12), config=config,
                      model=dict(kind="hf", seed=9), path=True)
    with one_thread():
        hf = hf_llama(seed=9)
        expected = [hf_greedy(hf, p, 12) for p in prompts]
    for index, (outputs, want) in enumerate(zip(got, expected)):
        assert outputs == [want], f"prompt {index}: engine {outputs[0]}, HF generate {want}"


@pytest.mark.points(2)
def test_streaming_yields_tokens_as_they_come(student):
    """LLM.stream: each request's events spell its output in order, the last one carries the finish reason, and
    requests stream side by side (the short request's first token comes before the long one's last)."""
    requests = _requests([4, 9, 6], [12, 3, 7], seed=10)
    events = student.run(offline, [r["prompt"] for r in requests], dict(temperature=0.0, max_tokens=12),
                         config=dict(block_size=4), model=TINY)  # generate, for the outputs
    streamed = student.run(offline, [r["prompt"] for r in requests], dict(temperature=0.0, max_tokens=12),
                           config=dict(block_size=4), model=TINY, stream=True)
    expected = _expected([dict(r, params=dict(r["params"], max_tokens=12)) for r in requests], TINY)
    for index in range(3):
        mine = [e for e in streamed if e[0] == index]
        assert [e[2] for e in mine] == expected[index][0][0], f"request {index} streamed {[e[2] for e in mine]}"
        assert [e[3] for e in mine] == [None] * (len(mine) - 1) + ["length"], "the finish reason goes on the last"
        assert events[index] == [expected[index][0][0]], f"generate gave {events[index]} for request {index}"
    positions = {index: [i for i, e in enumerate(streamed) if e[0] == index] for index in range(3)}
    assert positions[1][0] < positions[0][-1] and positions[2][0] < positions[0][-1], "requests must stream together"


@pytest.mark.points(2)
def test_seeded_sampling_does_not_depend_on_the_batch(student):
    """A sampled request with a seed gives the same tokens alone and among other requests; its n = 2 outputs differ."""
    prompts = _cases().prompts_of([8, 5, 12], seed=11)
    params = dict(temperature=0.9, top_p=0.95, max_tokens=10, seed=5, n=2)
    alone = student.run(serve, [{"prompt": prompts[0], "params": params}], config=dict(block_size=4), model=TINY)
    crowd = [{"prompt": p, "params": params if i == 0 else dict(temperature=1.0, max_tokens=7), "arrive": i % 2}
             for i, p in enumerate(prompts)]
    together = student.run(serve, crowd, config=dict(block_size=4, num_blocks=18, max_num_seqs=3), model=TINY)
    assert alone["outputs"][0] == together["outputs"][0], (
        f"seeded request alone {alone['outputs'][0]} but among others {together['outputs'][0]}")
    first, second = alone["outputs"][0]
    assert first[0] != second[0], "the two sampled outputs of one request are identical: separate generators needed"


@pytest.mark.points(1)
def test_metrics_are_recorded(student):
    """Every request records its arrival, first token, token times (one per output token) and finish."""
    requests = _requests([5, 8], [4, 6], seed=12, arrivals=[0, 2])
    got = student.run(serve, requests, config=dict(block_size=4), model=TINY)
    for index, m in got["metrics"].items():
        outputs = got["outputs"][index]
        assert [len(t) for t in m["times"]] == [len(o[0]) for o in outputs], f"request {index}: token times {m}"
        times = m["times"][0]
        assert m["arrival"] <= m["first"] == times[0] and times == sorted(times) and m["finish"] == times[-1], (
            f"request {index}: inconsistent times {m}")
