"""The shared infrastructure: model, data, measurement, tolerances, the process launcher, and the target switch."""

import sys
import time
from pathlib import Path

import pytest
import torch

from common.data import ByteTokenizer, batches, get_batch, load_corpus, split_corpus
from common.launch import DistributedError, DistributedTimeout, run_distributed
from common.measure import SavedTensorMeter, count_flops, saved_activation_bytes, transformer_train_flops
from common.model import ModelConfig, Transformer, naive_attention, sdpa_attention
from common.testing import check_close, describe, random_tensor, tolerance

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))  # spawned ranks inherit sys.path
import dist_workers  # noqa: E402


# ---- model


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_model_forward_backward_and_gqa(num_kv_heads):
    config = ModelConfig.preset("tiny", num_kv_heads=num_kv_heads)
    model = Transformer(config)
    tokens = torch.randint(0, 256, (2, 17))
    logits = model(tokens)
    assert logits.shape == (2, 17, 256)
    loss = model.loss(tokens, tokens)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3  # near-uniform at init
    assert all(p.grad is not None for p in model.parameters())


def test_presets_have_the_promised_sizes():
    assert 0.05e6 < Transformer(ModelConfig.preset("tiny")).num_params() < 0.5e6
    gpt2 = ModelConfig.preset("gpt2")
    assert (gpt2.num_layers, gpt2.width, gpt2.num_heads) == (12, 768, 12)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_config_validation_names_the_rule():
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ModelConfig(width=66, num_heads=4)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(ModelConfig.preset("tiny"))(torch.zeros(1, 65, dtype=torch.long))


def test_attention_implementations_agree():
    q = random_tensor(2, 4, 9, 16, dtype=torch.float64, seed=0)
    k = random_tensor(2, 2, 9, 16, dtype=torch.float64, seed=1)
    v = random_tensor(2, 2, 9, 16, dtype=torch.float64, seed=2)
    for causal in (True, False):
        check_close(sdpa_attention(q, k, v, causal=causal), naive_attention(q, k, v, causal=causal),
                    name="sdpa vs naive attention", inputs=describe(q=q, causal=causal))


def test_pluggable_attention_is_called():
    model = Transformer(ModelConfig.preset("tiny"))
    calls = []

    def spy(q, k, v, *, causal):
        calls.append(q.shape)
        return sdpa_attention(q, k, v, causal=causal)

    model.set_attention(spy)
    model(torch.randint(0, 256, (1, 8)))
    assert len(calls) == model.config.num_layers


# ---- data


def test_corpus_is_embedded_and_deterministic():
    tokens = load_corpus()
    assert len(tokens) > 100_000 and tokens.dtype == torch.long and int(tokens.max()) < 256
    assert torch.equal(tokens, load_corpus())
    train, val = split_corpus(tokens)
    assert len(train) + len(val) == len(tokens)
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("héllo wörld")) == "héllo wörld"


def test_batches_are_seeded_and_shifted():
    tokens = load_corpus(max_tokens=5000)
    x1, y1 = get_batch(tokens, batch_size=4, seq_len=32, seed=3)
    x2, y2 = get_batch(tokens, batch_size=4, seq_len=32, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    state = torch.get_rng_state()
    list(batches(tokens, batch_size=2, seq_len=8, seed=0, num_batches=3))
    assert torch.equal(state, torch.get_rng_state()), "drawing batches must not touch the global RNG"


# ---- measurement and tolerances


def test_saved_tensor_meter_counts_distinct_activations_only():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(32, 64, requires_grad=True)
    bytes_saved = saved_activation_bytes(lambda: torch.tanh(x @ weight), exclude=[weight])
    # matmul saves x (and weight, excluded); tanh saves its output (32 x 64 floats)
    assert bytes_saved == 2 * 32 * 64 * 4
    with SavedTensorMeter() as meter:
        (x * x).sum()
    assert meter.total_bytes == 32 * 64 * 4 and meter.num_tensors == 2  # x saved twice, counted once


def test_flop_counting():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4
    assert transformer_train_flops(100, 10) == 6000


def test_check_close_names_function_input_and_error():
    expected = torch.linspace(1, 2, 10, dtype=torch.float64)
    check_close(expected * (1 + 1e-9), expected, name="f", inputs="x")
    with pytest.raises(AssertionError) as error:
        check_close(expected + 1e-3, expected, name="my_function", inputs=describe(x=expected))
    message = str(error.value)
    assert "my_function" in message and "x=(10,) float64" in message and "abs error" in message
    assert tolerance(torch.bfloat16).rtol > tolerance(torch.float32).rtol > tolerance(torch.float64).rtol
    with pytest.raises(AssertionError, match="shape"):
        check_close(expected[:3], expected, name="f")


# ---- launcher


@pytest.mark.parametrize("world_size", [2, 4])
def test_run_distributed_all_reduce(world_size):
    results = run_distributed(dist_workers.all_reduce_rank, world_size=world_size, backend="gloo", timeout_s=60)
    total = world_size * (world_size + 1) / 2
    assert [r["rank"] for r in results] == list(range(world_size))
    assert all(r["sum"] == total and r["world"] == world_size for r in results)


def test_rank_exception_reports_its_traceback():
    with pytest.raises(DistributedError, match="rank 1 of 2 raised") as error:
        run_distributed(dist_workers.raise_on_rank_one, world_size=2, backend="gloo", timeout_s=60)
    assert "rank one is broken on purpose" in str(error.value)


def test_deadlock_becomes_a_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTimeout, match="did not finish"):
        run_distributed(dist_workers.skip_the_collective_on_rank_zero, world_size=2, backend="gloo", timeout_s=8)
    assert time.monotonic() - start < 30


def test_the_grader_scale_stretches_the_limit(monkeypatch):
    """$SLM_TIME_LIMIT_SCALE (the grader's --time-limit-scale, set in its worker) multiplies timeout_s; a value that
    is not a positive number is refused before any rank starts."""
    monkeypatch.setenv("SLM_TIME_LIMIT_SCALE", "0.5")
    with pytest.raises(DistributedTimeout, match="did not finish within 4 s"):
        run_distributed(dist_workers.skip_the_collective_on_rank_zero, world_size=2, backend="gloo", timeout_s=8)
    for bad in ("0", "-1", "fast", "nan"):
        monkeypatch.setenv("SLM_TIME_LIMIT_SCALE", bad)
        with pytest.raises(ValueError, match="SLM_TIME_LIMIT_SCALE must be a positive number"):
            run_distributed(dist_workers.skip_the_collective_on_rank_zero, world_size=2, backend="gloo", timeout_s=8)


def test_hard_exit_and_sys_exit_are_reported():
    with pytest.raises(DistributedError, match="exited with code 7"):
        run_distributed(dist_workers.hard_exit_on_last_rank, world_size=3, backend="gloo", timeout_s=60)
    with pytest.raises(DistributedError, match="SystemExit"):
        run_distributed(dist_workers.sys_exit, world_size=2, backend="gloo", timeout_s=60)


def test_launcher_validates_its_input():
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(dist_workers.all_reduce_rank, world_size=0)
    with pytest.raises(ValueError, match="backend"):
        run_distributed(dist_workers.all_reduce_rank, world_size=2, backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="one GPU per rank"):
            run_distributed(dist_workers.all_reduce_rank, world_size=2, backend="nccl")


# ---- target switch


def test_use_target_and_check_lab(tmp_path):
    from common.target import check_lab, resolve_target, use_target

    assert resolve_target("reference").name == "reference"
    with pytest.raises(FileNotFoundError):
        resolve_target(tmp_path / "missing")
    (tmp_path / "lab01_memory").mkdir()
    (tmp_path / "lab01_memory" / "__init__.py").write_text("MARK = 'submission'\n")
    saved = list(sys.path)
    try:
        path = use_target(tmp_path)
        import lab01_memory

        assert lab01_memory.MARK == "submission"
        check_lab("lab01_memory", path)
        with pytest.raises(ImportError, match="outside the target"):
            check_lab("lab01_memory", resolve_target("labs"))
    finally:
        sys.path[:] = saved
        sys.modules.pop("lab01_memory", None)


def test_planned_deaths_and_tensor_results():
    """may_die lets chosen ranks exit without a result; tensors come back intact after their rank has exited."""
    results = run_distributed(dist_workers.tensor_unless_last, world_size=3, backend="gloo", timeout_s=60,
                              may_die={2}, pass_store=True)
    assert results[2] is None
    for rank in (0, 1):
        assert torch.equal(results[rank], torch.arange(rank + 1, dtype=torch.float32) * 1.5)
    with pytest.raises(ValueError, match="may_die"):
        run_distributed(dist_workers.all_reduce_rank, world_size=2, may_die={5})


# ---- the process mesh


def test_mesh_lays_out_tp_fastest_then_pp_then_dp():
    results = run_distributed(dist_workers.mesh_groups, world_size=8, args=(2, 2, 2), timeout_s=120)
    for rank, out in enumerate(results):
        dp_rank, pp_rank, tp_rank = rank // 4, (rank // 2) % 2, rank % 2
        assert out["coords"] == (dp_rank, pp_rank, tp_rank)
        assert out["rank_back"] == rank
        assert out["tp"] == [rank - tp_rank, rank - tp_rank + 1]
        assert out["pp"] == [dp_rank * 4 + tp_rank, dp_rank * 4 + 2 + tp_rank]
        assert out["dp"] == [rank % 4, rank % 4 + 4]
        assert out["tp_sum"] == sum(out["tp"])


def test_mesh_refuses_a_grid_that_is_not_the_world():
    messages = run_distributed(dist_workers.mesh_wrong_size, world_size=2, timeout_s=60)
    assert all("dp (3) x pp (1) x tp (1) = 3 must equal the world size (2)" in m for m in messages)
