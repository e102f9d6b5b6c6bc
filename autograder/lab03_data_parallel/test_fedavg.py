"""Lab 03, part 4: federated averaging with simulated non-IID clients (fedavg.py).

The client updates, the aggregates and the single large-batch SGD step they must equal are computed here, in float64,
from the same seeded models and batches the worker used.
"""

import copy

import pytest
import torch

from common.testing import check_close, describe, random_tensor


def error_of(call) -> str:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - its class and message go back to the test
        return f"{type(error).__name__}: {error}"
    return "no error"


# -----------------------------------------------------------------------------
# split_non_iid


def non_iid_split(total: int, cases: list[dict]) -> list:
    """Producer: split_non_iid(torch.arange(total), **case) for each case: the shards, or the error."""
    from lab03_data_parallel.fedavg import split_non_iid

    tokens = torch.arange(total)
    out = []
    for case in cases:
        try:
            out.append(list(split_non_iid(tokens, **case)))
        except Exception as error:  # noqa: BLE001
            out.append(f"{type(error).__name__}: {error}")
    return out


def non_iid_sizes(total: int, num_clients: int, size_skew: float, min_tokens: int) -> list[int]:
    """Producer: the shard sizes of split_non_iid(torch.arange(total), ...) with seed 5."""
    from lab03_data_parallel.fedavg import split_non_iid

    shards = split_non_iid(torch.arange(total), num_clients=num_clients, seed=5, size_skew=size_skew,
                           min_tokens=min_tokens)
    return [s.numel() for s in shards]


@pytest.mark.points(1)
def test_split_non_iid_sizes_are_log_normal(student):
    """Over 2000 clients, the logs of the sizes above min_tokens spread like sigma·z (their standard deviation is
    size_skew, within sampling error), and they sum to the corpus."""
    import math

    for skew in (0.5, 1.5):
        sizes = student.run(non_iid_sizes, 4_000_000, 2000, skew, 100)
        assert len(sizes) == 2000 and sum(sizes) == 4_000_000, f"split_non_iid gave {len(sizes)} shards of {sum(sizes)}"
        logs = torch.tensor([math.log(max(n - 100, 1)) for n in sizes[:-1]], dtype=torch.float64)
        assert abs(logs.std().item() - skew) < 0.15 * skew + 0.05, (
            f"split_non_iid(size_skew={skew}, 2000 clients): the log sizes above min_tokens have standard deviation "
            f"{logs.std().item():.3f}, expected about {skew} (log-normal weights exp(size_skew·z))")


@pytest.mark.points(1)
def test_split_non_iid_partitions_the_corpus(student):
    """The shards are contiguous, cover every token once, respect min_tokens, differ in size with skew and not without,
    depend only on the seed, and too few tokens for the clients raise ValueError."""
    cases = [dict(num_clients=6, seed=3, size_skew=1.0, min_tokens=100),
             dict(num_clients=6, seed=3, size_skew=1.0, min_tokens=100),
             dict(num_clients=6, seed=4, size_skew=1.0, min_tokens=100),
             dict(num_clients=4, seed=0, size_skew=0.0, min_tokens=10),
             dict(num_clients=1, seed=0, size_skew=2.0, min_tokens=5),
             dict(num_clients=7, seed=1, size_skew=0.5, min_tokens=1429),
             dict(num_clients=6, seed=0, min_tokens=1700)]
    got = student.run(non_iid_split, 10_007, cases)
    tokens = torch.arange(10_007)
    for case, shards in zip(cases[:6], got[:6]):
        assert isinstance(shards, list), f"split_non_iid(T=10007, {case}) raised {shards}"
        sizes = [s.numel() for s in shards]
        assert len(shards) == case["num_clients"] and torch.equal(torch.cat(shards), tokens), (
            f"split_non_iid(T=10007, {case}): shards of sizes {sizes} do not concatenate to the corpus")
        assert min(sizes) >= case["min_tokens"], f"split_non_iid(T=10007, {case}): sizes {sizes} break min_tokens"
    sizes = [[s.numel() for s in shards] for shards in got[:4]]
    assert max(sizes[0]) > 1.5 * min(sizes[0]), f"split_non_iid with size_skew=1: sizes {sizes[0]} are not skewed"
    assert sizes[1] == sizes[0], f"split_non_iid is not deterministic in its seed: {sizes[0]} then {sizes[1]}"
    assert sizes[2] != sizes[0], f"split_non_iid gave the same sizes {sizes[0]} for seeds 3 and 4"
    assert max(sizes[3]) - min(sizes[3]) <= 4, f"split_non_iid with size_skew=0 should give near-equal sizes: {sizes[3]}"
    assert isinstance(got[6], str) and got[6].startswith("ValueError"), (
        f"split_non_iid of 10007 tokens into 6 clients of at least 1700 should raise ValueError, got {got[6]!r:.100}")


# -----------------------------------------------------------------------------
# fedavg_aggregate


def aggregate(states: list[dict], weights: list[float]) -> dict:
    """Producer: fedavg_aggregate(states, weights)."""
    from lab03_data_parallel.fedavg import fedavg_aggregate

    return fedavg_aggregate(states, weights)


def aggregate_errors(states: list[dict]) -> dict:
    """Producer: fedavg_aggregate with bad arguments."""
    from lab03_data_parallel.fedavg import fedavg_aggregate

    other_keys = [dict(states[0]), {("z" + k): v for k, v in states[1].items()}]
    return {"too few weights": error_of(lambda: fedavg_aggregate(states, [1.0] * (len(states) - 1))),
            "a zero weight": error_of(lambda: fedavg_aggregate(states, [1.0, 0.0] + [1.0] * (len(states) - 2))),
            "a negative weight": error_of(lambda: fedavg_aggregate(states, [-1.0] + [1.0] * (len(states) - 1))),
            "no states": error_of(lambda: fedavg_aggregate([], [])),
            "different keys": error_of(lambda: fedavg_aggregate(other_keys, [1.0, 1.0]))}


def client_states(shapes: dict, clients: int, dtype=torch.float32) -> list[dict]:
    return [{k: random_tensor(*s, dtype=dtype, seed=10 * i + j) for j, (k, s) in enumerate(shapes.items())}
            for i in range(clients)]


@pytest.mark.points(2)
def test_aggregate_is_sample_weighted(student):
    """fedavg_aggregate returns Σ (n_k/n) w_k for every floating entry, in the entry's dtype, copies client 0's
    integer entries, returns a single client's state unchanged, and refuses mismatched lengths, non-positive weights, no states and differing keys with ValueError."""
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 3)}
    for weights in ([3.0, 11.0, 1.0], [2.0], [0.5, 0.25, 4.0, 1.0]):
        states = client_states(shapes, len(weights))
        for client, state in enumerate(states):
            state["count"] = torch.tensor([7, 9]) + client  # an integer entry: client 0's is kept
        got = student.run(aggregate, states, weights)
        assert torch.equal(got["count"], torch.tensor([7, 9])), (
            f"fedavg_aggregate should copy client 0's integer entries, got {got['count']}")
        for key in shapes:
            expected = sum(w * st[key].double() for w, st in zip(weights, states)) / sum(weights)
            check_close(got[key], expected, name=f"fedavg_aggregate ({key})",
                        inputs=describe(num_samples=weights, shape=shapes[key]))
            assert got[key].dtype == torch.float32, f"fedavg_aggregate changed {key}'s dtype to {got[key].dtype}"
    for label, message in student.run(aggregate_errors, client_states(shapes, 3)).items():
        assert message.startswith("ValueError"), f"fedavg_aggregate with {label} should raise ValueError: {message}"


# -----------------------------------------------------------------------------
# client_update and a round


def fedavg_model():
    from common.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", max_seq_len=32)).double()


def client_batches(counts: list[int], steps: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    from common.data import get_batch, load_corpus

    corpus = load_corpus(max_tokens=20_000)
    return [[get_batch(corpus, batch_size=n, seq_len=16, seed=40 + n + 7 * step) for step in range(steps)]
            for n in counts]


def one_round(counts: list[int], steps: int, lr: float) -> dict:
    """Producer: client_update of each client (counts[k] sequences a batch, `steps` batches) from one global model,
    the sample-weighted aggregate, and what the global model looks like afterwards."""
    from lab03_data_parallel.fedavg import client_update, fedavg_aggregate

    model = fedavg_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    states, losses = [], []
    for batches in client_batches(counts, steps):
        state, loss = client_update(model, batches, lr=lr)
        states.append(state)
        losses.append(torch.as_tensor(loss, dtype=torch.float64))
    return {"states": states, "losses": losses, "averaged": fedavg_aggregate(states, counts),
            "global unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items()),
            "global grads": [name for name, w in model.named_parameters() if w.grad is not None]}


def sgd_reference(batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> tuple[dict, float]:
    """Plain SGD in float64 on a copy of the model, one step per batch: (state, mean loss)."""
    model = copy.deepcopy(fedavg_model())
    losses = []
    for tokens, targets in batches:
        loss = model.loss(tokens, targets)
        loss.backward()
        with torch.no_grad():
            for weight in model.parameters():
                weight.sub_(lr * weight.grad)
                weight.grad = None
        losses.append(loss.item())
    return model.state_dict(), sum(losses) / len(losses)


@pytest.mark.points(2)
def test_one_local_step_equals_large_batch_sgd(student):
    """With one local step on each client's whole data, a FedAvg round is one SGD step on the union of the data,
    which only sample weighting achieves when clients hold different amounts (2, 5 and 1 sequences)."""
    counts = [2, 5, 1]
    got = student.run(one_round, counts, 1, 0.3)
    batches = [b[0] for b in client_batches(counts)]
    union = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    state, _ = sgd_reference([union], 0.3)
    for name, value in state.items():
        check_close(got["averaged"][name], value, name=f"FedAvg round with one local step ({name})",
                    inputs=describe(client_batches=counts, lr=0.3))
    for client, batch in enumerate(batches):
        _, loss = sgd_reference([batch], 0.3)
        check_close(got["losses"][client], torch.tensor(loss, dtype=torch.float64),
                    name="client_update (training loss of its one step)", inputs=describe(client=client, lr=0.3))
    assert got["global unchanged"] and not got["global grads"], (
        f"client_update changed the global model (gradients on {got['global grads'][:3]}, or its weights)")


@pytest.mark.points(2)
def test_client_update_is_local_sgd(student):
    """client_update takes one plain SGD step per batch on a copy (three batches here), returns that state and the
    mean of its training losses, and leaves the global model untouched."""
    counts = [3, 2]
    got = student.run(one_round, counts, 3, 0.2)
    for client, batches in enumerate(client_batches(counts, 3)):
        state, loss = sgd_reference(batches, 0.2)
        inputs = describe(client=client, batch_size=counts[client], local_steps=3, lr=0.2)
        for name, value in state.items():
            check_close(got["states"][client][name], value, name=f"client_update ({name})", inputs=inputs)
        check_close(got["losses"][client], torch.tensor(loss, dtype=torch.float64),
                    name="client_update (mean training loss)", inputs=inputs)
    assert got["global unchanged"] and not got["global grads"], "client_update changed the global model"


def three_rounds() -> dict:
    """Producer: three FedAvg rounds on non-IID shards from a seeded tiny model; the final state."""
    from common.data import load_corpus, split_corpus
    from common.model import ModelConfig, Transformer
    from lab03_data_parallel.fedavg import FedAvgConfig, fedavg_round, split_non_iid

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=32))
    train, _ = split_corpus(load_corpus(max_tokens=60_000))
    config = FedAvgConfig(num_clients=4, clients_per_round=2, local_steps=3, batch_size=4, seq_len=32, lr=0.3)
    shards = split_non_iid(train, num_clients=4, seed=0)
    for round_index in range(3):
        fedavg_round(model, shards, config=config, round_index=round_index)
    return model.state_dict()


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_rounds_reduce_the_loss(student):
    """Three FedAvg rounds on non-IID shards lower the global model's loss on held-out text (measured here)."""
    from common.data import get_batch, load_corpus, split_corpus
    from common.model import ModelConfig, Transformer

    state = student.run(three_rounds)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=32))
    _, val = split_corpus(load_corpus(max_tokens=60_000))
    tokens, targets = get_batch(val, batch_size=16, seq_len=32, seed=0)
    with torch.no_grad():
        before = model.loss(tokens, targets).item()
        model.load_state_dict(state)
        after = model.loss(tokens, targets).item()
    assert after < before - 0.05, f"3 FedAvg rounds moved the held-out loss from {before:.4f} to {after:.4f}"
