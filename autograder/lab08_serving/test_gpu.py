"""Lab 08 on a GPU: the compiled decode kernel in bf16 at realistic shapes, and the engine with CUDA graphs.

These need CUDA and are reported "not graded here" on a machine without one. Expectations are computed here: float64
attention over the gathered cache on the CPU, and plain greedy decoding of the same model (a full forward pass per
token, float32 on the GPU, TF32 off) for the engine.
"""

import pytest
import torch

from common.testing import check_close, describe


def _cases():
    try:
        import serving_cases
    except ImportError:
        from autograder.lab08_serving import serving_cases
    return serving_cases


# -----------------------------------------------------------------------------
# Producers: run in the worker


def decode_bf16(case: dict, num_splits: int) -> torch.Tensor:
    from lab08_serving.paged_attention import paged_decode_attention

    q, k, v, tables, lens = (t.cuda() for t in _cases().paged_inputs(**case))
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return paged_decode_attention(q, k, v, tables, lens, num_splits=num_splits).float().cpu()


def serve_on_gpu(prompts: list[list[int]], max_tokens: list[int], *, hf: bool, config: dict) -> list[list[int]]:
    from lab08_serving.engine import LLM, EngineConfig
    from lab08_serving.sampling import SamplingParams

    cases = _cases()
    model = (cases.hf_llama(seed=3, dtype=torch.float32) if hf else cases.tiny_llama(seed=3, dtype=torch.float32))
    llm = LLM(model.cuda(), config=EngineConfig(**config))
    outputs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens])
    return [o.outputs[0].token_ids for o in outputs]


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.gpu
@pytest.mark.points(3)
@pytest.mark.time_limit(180)
@pytest.mark.parametrize("num_splits", [1, 6])
def test_bf16_decode_at_realistic_shapes(student, num_splits):
    """bf16, GQA 32/8, D = 128, blocks of 16, eight ragged contexts up to 1500 tokens sharing a prefix, one split
    and six: within bf16's tolerance of float64 attention."""
    from autograder.lab08_serving.test_paged_attention import _expected

    case = dict(B=8, H=32, H_kv=8, D=128, block_size=16, lens=[1, 1500, 777, 16, 1024, 333, 1201, 64], seed=50,
                shared_prefix_blocks=1)
    got = student.run(decode_bf16, case, num_splits)
    check_close(got, _expected(case).float(), name=f"paged_decode_attention (bf16, {num_splits} splits)",
                inputs=describe(**case), dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.points(2)
@pytest.mark.time_limit(180)
def test_fp32_kernel_compiled_matches_float64(student):
    """The compiled kernel in fp32 (full-precision dots) on the public cases, split-K included."""
    from autograder.lab08_serving.test_paged_attention import GQA, MHA, MQA, _check, decode_triton

    for case in (GQA, MQA, MHA):
        _check(student.run(decode_triton, case, num_splits=3), case, "paged_decode_attention (CUDA, fp32)")


def _greedy_on_gpu(hf: bool, prompts, max_tokens):
    cases = _cases()
    model = (cases.hf_llama(seed=3, dtype=torch.float32) if hf else cases.tiny_llama(seed=3, dtype=torch.float32))
    model = model.cuda()
    expected = []
    with torch.no_grad():
        for prompt, count in zip(prompts, max_tokens):
            tokens = torch.tensor([prompt], device="cuda")
            for _ in range(count):
                logits = model(tokens)
                logits = logits.logits if hasattr(logits, "logits") else logits
                tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            expected.append(tokens[0, len(prompt):].tolist())
    return expected


@pytest.mark.gpu
@pytest.mark.points(3)
@pytest.mark.time_limit(300)
@pytest.mark.parametrize("hf", [False, True])
def test_engine_with_cuda_graphs_is_greedy_exact(student, hf):
    """The engine on the GPU (Triton kernel, CUDA graphs captured for padded batch sizes, a cache small enough to
    preempt, prefix caching on): the plain model's greedy tokens, for common's model and a HF Llama (float32)."""
    prompts = _cases().prompts_of([5, 17, 3, 30, 9, 12, 21, 8, 2, 14], seed=60)
    max_tokens = [20, 9, 30, 14, 25, 16, 11, 19, 27, 6]
    config = dict(block_size=4, num_blocks=24, max_num_seqs=6, enable_prefix_caching=True, cuda_graphs=True)
    got = student.run(serve_on_gpu, prompts, max_tokens, hf=hf, config=config)
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = _greedy_on_gpu(hf, prompts, max_tokens)
    for index, (have, want) in enumerate(zip(got, expected)):
        assert have == want, f"request {index}: engine {have}, plain greedy {want}"
