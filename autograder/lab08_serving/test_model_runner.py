"""Lab 08, part 4: the model runner (model_runner.py): cache addressing, writing K/V, batched prefill attention, and
the runner's logits against the model's own forward pass without a cache.

The model is common.model's tiny preset in float64 (GQA 4/2), so a correct paged forward gives the plain model's
logits to ~1e-12; the Triton decode path is checked in float32.
"""

import pytest
import torch

from common.testing import check_close, describe


def _cases():
    """serving_cases, under its name here (the grader) or in the worker."""
    try:
        import serving_cases
    except ImportError:
        from autograder.lab08_serving import serving_cases
    return serving_cases


# -----------------------------------------------------------------------------
# Producers: run in the worker


def slots_of(tables: list[list[int]], seq_index: list[int], positions: list[int], block_size: int) -> torch.Tensor:
    from lab08_serving.model_runner import slot_mapping

    return slot_mapping(torch.tensor(tables, dtype=torch.int32), torch.tensor(seq_index), torch.tensor(positions),
                        block_size)


def written(seed: int, slots: list[int], num_blocks: int, block_size: int) -> dict:
    from lab08_serving.model_runner import write_kv_cache

    generator = torch.Generator().manual_seed(seed)
    k = torch.randn(len(slots), 2, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(len(slots), 2, 8, generator=generator, dtype=torch.float64)
    k_cache = torch.full((num_blocks, block_size, 2, 8), 7.0, dtype=torch.float64)
    v_cache = torch.full((num_blocks, block_size, 2, 8), -7.0, dtype=torch.float64)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots))
    return {"k_cache": k_cache, "v_cache": v_cache}


def _prefill_inputs(seed: int, new_lens: list[int], num_cached: list[int], block_size: int):
    """A random cache holding every sequence's context, block tables, and q plus the new tokens' k, v (read from the
    cache rows of the new positions, as the runner writes them there first)."""
    generator = torch.Generator().manual_seed(seed)
    contexts = [c + n for c, n in zip(num_cached, new_lens)]
    per_seq = [-(-m // block_size) for m in contexts]
    num_blocks = sum(per_seq) + 2
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, start = [], 0
    for count in per_seq:
        tables.append(order[start:start + count] + [order[-1]] * (max(per_seq) - count))
        start += count
    k_cache = torch.randn(num_blocks, block_size, 2, 16, generator=generator, dtype=torch.float64)
    v_cache = torch.randn(num_blocks, block_size, 2, 16, generator=generator, dtype=torch.float64)
    q = torch.randn(sum(new_lens), 4, 16, generator=generator, dtype=torch.float64)
    rows = [tables[i][p // block_size] * block_size + p % block_size
            for i, (c, m) in enumerate(zip(num_cached, contexts)) for p in range(c, m)]
    k = k_cache.view(-1, 2, 16)[rows]
    v = v_cache.view(-1, 2, 16)[rows]
    return q, k, v, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32)


def prefill_batch(seed: int, new_lens: list[int], num_cached: list[int], block_size: int) -> torch.Tensor:
    from lab08_serving.model_runner import PrefillBatch, prefill_attention_batch

    q, k, v, k_cache, v_cache, tables = _prefill_inputs(seed, new_lens, num_cached, block_size)
    batch = PrefillBatch(new_lens=new_lens, num_cached=num_cached, block_tables=tables)
    return prefill_attention_batch(q, k, v, k_cache, v_cache, batch, sm_scale=0.25)


def runner_logits(seed: int, *, dtype_name: str = "float64", backend: str = "torch", cuda_graphs: bool = False,
                  num_kv_heads: int = 2) -> list:
    """Prefill A and C, then B sharing A's first two blocks (8 cached tokens), then two decode steps of all three."""
    from lab08_serving.model_runner import ModelRunner

    cases = _cases()
    with cases.one_thread():
        model = cases.tiny_llama(seed=seed, dtype=getattr(torch, dtype_name), num_kv_heads=num_kv_heads)
        a, b_tail, c, steps = _run_tokens(seed)
        runner = ModelRunner(model, num_blocks=30, block_size=4, max_model_len=32, max_num_seqs=5,
                             attention_backend=backend, cuda_graphs=cuda_graphs)
        tables = {"a": [5, 2, 9], "b": [5, 2, 11, 14], "c": [20, 21]}
        logits = [runner.prefill([a, c], num_cached=[0, 0], block_tables=[tables["a"], tables["c"]])]
        logits.append(runner.prefill([a[:8] + b_tail], num_cached=[8], block_tables=[tables["b"]]))
        seqs = {"a": list(a), "b": a[:8] + b_tail, "c": list(c)}
        for step in steps:
            for name, token in zip("abc", step):
                seqs[name].append(token)
            logits.append(runner.decode(list(step), block_tables=[tables[n] for n in "abc"],
                                        context_lens=[len(seqs[n]) for n in "abc"]))
        return logits


def _run_tokens(seed: int):
    """Prompts A (10 tokens), B's own tail (5) and C (3), and the tokens fed in the two decode steps."""
    a, b_tail, c, fed = _cases().prompts_of([10, 5, 3, 6], seed=seed + 100)
    return a, b_tail, c, [tuple(fed[:3]), tuple(fed[3:])]


# -----------------------------------------------------------------------------
# Tests: run in the grader


@pytest.mark.points(2)
@pytest.mark.parametrize("block_size", [4, 3])
def test_slot_mapping(student, block_size):
    """Row = table[seq, p // bs] * bs + p % bs, for tokens of several sequences at positions across block borders."""
    tables = [[7, 2, 9, 4], [3, 8, 0, 1], [6, 5, 11, 10]]
    seq_index = [0, 0, 0, 1, 2, 2, 2, 1, 0]
    positions = [0, 3, 5, 11, 4, 1, 8, 7, 10]
    expected = torch.tensor([tables[s][p // block_size] * block_size + p % block_size
                             for s, p in zip(seq_index, positions)])
    got = student.run(slots_of, tables, seq_index, positions, block_size)
    assert isinstance(got, torch.Tensor) and got.tolist() == expected.tolist(), (
        f"slot_mapping(block_size={block_size}) = {got}, expected {expected.tolist()}")


@pytest.mark.points(2)
def test_write_kv_cache_writes_exactly_the_slots(student):
    """Each token's K and V land in its row of the flat cache; every other row is untouched."""
    slots = [5, 0, 13, 6, 11]
    got = student.run(written, 3, slots, 4, 4)
    generator = torch.Generator().manual_seed(3)
    k = torch.randn(len(slots), 2, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(len(slots), 2, 8, generator=generator, dtype=torch.float64)
    k_cache = torch.full((16, 2, 8), 7.0, dtype=torch.float64)
    v_cache = torch.full((16, 2, 8), -7.0, dtype=torch.float64)
    for index, slot in enumerate(slots):
        k_cache[slot], v_cache[slot] = k[index], v[index]
    inputs = describe(slots=slots, cache=(4, 4, 2, 8))
    check_close(got["k_cache"], k_cache.view(4, 4, 2, 8), name="write_kv_cache (k_cache)", inputs=inputs)
    check_close(got["v_cache"], v_cache.view(4, 4, 2, 8), name="write_kv_cache (v_cache)", inputs=inputs)


@pytest.mark.points(3)
@pytest.mark.parametrize("new_lens, num_cached", [([5, 1, 7], [0, 0, 0]), ([3, 6, 2], [8, 0, 4]),
                                                  ([1, 4], [5, 3])])
def test_prefill_attention_batch(student, new_lens, num_cached):
    """Packed prompts: each sequence's new tokens attend causally over its own context only; a sequence with a
    cached prefix reads it from the cache through its block table."""
    got = student.run(prefill_batch, 4, new_lens, num_cached, 4)
    q, _, _, k_cache, v_cache, tables = _prefill_inputs(4, new_lens, num_cached, 4)
    expected, start = [], 0
    for i, (n, c) in enumerate(zip(new_lens, num_cached)):
        rows = [int(tables[i][p // 4]) * 4 + p % 4 for p in range(c + n)]
        keys, values = k_cache.view(-1, 2, 16)[rows], v_cache.view(-1, 2, 16)[rows]
        for t in range(n):
            out = torch.zeros(4, 16, dtype=torch.float64)
            for h in range(4):
                weights = torch.softmax(keys[:c + t + 1, h // 2] @ q[start + t, h] * 0.25, dim=0)
                out[h] = weights @ values[:c + t + 1, h // 2]
            expected.append(out)
        start += n
    check_close(got, torch.stack(expected), name="prefill_attention_batch",
                inputs=describe(new_lens=new_lens, num_cached=num_cached))


def _expected_logits(seed: int, dtype: torch.dtype, num_kv_heads: int = 2) -> list[torch.Tensor]:
    cases = _cases()
    with cases.one_thread():
        model = cases.tiny_llama(seed=seed, dtype=dtype, num_kv_heads=num_kv_heads)
        a, b_tail, c, steps = _run_tokens(seed)
        seqs = {"a": list(a), "b": a[:8] + b_tail, "c": list(c)}
        with torch.no_grad():
            last = {name: model(torch.tensor([seq]))[0, -1] for name, seq in seqs.items()}
            expected = [torch.stack([last["a"], last["c"]]), last["b"][None]]
            for step in steps:
                for name, token in zip("abc", step):
                    seqs[name].append(token)
                expected.append(torch.stack([model(torch.tensor([seqs[n]]))[0, -1] for n in "abc"]))
    return expected


def _check_logits(got, seed, dtype, what, num_kv_heads=2, **tolerance):
    names = ["prefill of A and C", "prefill of B after 8 cached tokens", "decode step 1", "decode step 2"]
    for logits, want, name in zip(got, _expected_logits(seed, dtype, num_kv_heads), names):
        check_close(logits, want, name=f"{what}: logits of the {name}", inputs=describe(seed=seed), **tolerance)
    assert len(got) == 4, f"{what}: expected 4 logit tensors, got {len(got)}"


@pytest.mark.points(3)
@pytest.mark.parametrize("seed", [0, 1])
def test_runner_logits_equal_the_models(student, seed):
    """Prefill (two prompts packed, then one sharing 8 cached tokens of another) and decode steps over the paged
    cache give the logits of the plain model run on the whole sequence (float64)."""
    _check_logits(student.run(runner_logits, seed), seed, torch.float64, "ModelRunner")


@pytest.mark.points(1)
def test_runner_padded_decode_path(student):
    """With cuda_graphs=True the decode batch of 3 is padded to the captured size 4 (a row reading and writing only
    the scratch block): on a CPU the padded path runs eagerly and gives the same logits."""
    _check_logits(student.run(runner_logits, 2, cuda_graphs=True), 2, torch.float64, "ModelRunner (cuda_graphs)")


@pytest.mark.points(2)
@pytest.mark.time_limit(120)
def test_runner_with_the_triton_kernel(student):
    """The decode steps through the Triton kernel (float32, interpreter on a CPU)."""
    # float32 through two layers: the paged and the plain forward sum in different orders, ~1e-6 apart
    _check_logits(student.run(runner_logits, 3, dtype_name="float32", backend="triton"), 3, torch.float32,
                  "ModelRunner (triton)", rtol=1e-4, atol=1e-5)
