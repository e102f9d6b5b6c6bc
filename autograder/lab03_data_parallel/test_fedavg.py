"""Lab 03, part 4: federated averaging with simulated non-IID clients (fedavg.py)."""

import pytest
import torch

from common.testing import check_close, describe, random_tensor


@pytest.mark.points(1)
def test_split_non_iid_partitions_the_corpus():
    """The shards are contiguous, cover every token once, respect min_tokens, differ in size, depend only on seed."""
    from lab03_data_parallel.fedavg import split_non_iid

    tokens = torch.arange(10_007)
    shards = split_non_iid(tokens, num_clients=6, seed=3, size_skew=1.0, min_tokens=100)
    sizes = [s.numel() for s in shards]
    assert len(shards) == 6 and torch.equal(torch.cat(shards), tokens), (
        f"split_non_iid(T=10007, num_clients=6): shards of sizes {sizes} do not concatenate to the corpus")
    assert min(sizes) >= 100, f"split_non_iid: sizes {sizes} break min_tokens=100"
    assert max(sizes) > 1.5 * min(sizes), f"split_non_iid with size_skew=1: sizes {sizes} are not skewed"
    again = [s.numel() for s in split_non_iid(tokens, num_clients=6, seed=3, size_skew=1.0, min_tokens=100)]
    assert again == sizes, f"split_non_iid is not deterministic in its seed: {sizes} then {again}"
    equal = [s.numel() for s in split_non_iid(tokens, num_clients=4, seed=0, size_skew=0.0, min_tokens=10)]
    assert max(equal) - min(equal) <= 4, f"split_non_iid with size_skew=0 should give near-equal sizes: {equal}"
    with pytest.raises(ValueError):
        split_non_iid(tokens[:50], num_clients=6, seed=0, min_tokens=100)


@pytest.mark.points(2)
def test_aggregate_is_sample_weighted():
    """fedavg_aggregate returns Σ (n_k/n) w_k for every floating entry, in the entry's dtype."""
    from lab03_data_parallel.fedavg import fedavg_aggregate

    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 3)}
    weights = [3.0, 11.0, 1.0]
    states = [{k: random_tensor(*s, seed=10 * i + j) for j, (k, s) in enumerate(shapes.items())} for i in range(3)]
    got = fedavg_aggregate(states, weights)
    for key in shapes:
        expected = sum(w * st[key].double() for w, st in zip(weights, states)) / sum(weights)
        check_close(got[key], expected, name=f"fedavg_aggregate ({key})",
                    inputs=describe(num_samples=weights, shape=shapes[key]))
        assert got[key].dtype == torch.float32, f"fedavg_aggregate changed {key}'s dtype to {got[key].dtype}"
    with pytest.raises(ValueError):
        fedavg_aggregate(states, [1.0, 2.0])
    with pytest.raises(ValueError):
        fedavg_aggregate(states, [1.0, 0.0, 2.0])


@pytest.mark.points(2)
def test_one_local_step_equals_large_batch_sgd():
    """With one local step on each client's whole data, a FedAvg round is one SGD step on the union of the data,
    which only sample weighting achieves when clients hold different amounts (2, 5 and 1 sequences)."""
    import copy

    from common.data import get_batch, load_corpus
    from common.model import ModelConfig, Transformer
    from lab03_data_parallel.fedavg import client_update, fedavg_aggregate

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=32)).double()
    corpus = load_corpus(max_tokens=20_000)
    batches = [get_batch(corpus, batch_size=n, seq_len=16, seed=40 + n) for n in (2, 5, 1)]
    states, counts = [], []
    for client_tokens, client_targets in batches:
        state, _ = client_update(model, [(client_tokens, client_targets)], lr=0.3)
        states.append(state)
        counts.append(client_tokens.shape[0])
    averaged = fedavg_aggregate(states, counts)
    reference = copy.deepcopy(model)
    reference.loss(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.3 * p.grad
    for name, value in reference.state_dict().items():
        check_close(averaged[name], value, name=f"FedAvg round with one local step ({name})",
                    inputs=describe(client_batches=counts, lr=0.3))
    for name, p in model.named_parameters():
        assert p.grad is None, f"client_update changed the global model ({name} has a gradient)"


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_rounds_reduce_the_loss():
    """Three FedAvg rounds on non-IID shards lower the global model's loss on held-out text."""
    from common.data import get_batch, load_corpus, split_corpus
    from common.model import ModelConfig, Transformer
    from lab03_data_parallel.fedavg import FedAvgConfig, fedavg_round, split_non_iid

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=32))
    train, val = split_corpus(load_corpus(max_tokens=60_000))
    config = FedAvgConfig(num_clients=4, clients_per_round=2, local_steps=3, batch_size=4, seq_len=32, lr=0.3)
    shards = split_non_iid(train, num_clients=4, seed=0)
    tokens, targets = get_batch(val, batch_size=16, seq_len=32, seed=0)
    with torch.no_grad():
        before = model.loss(tokens, targets).item()
    for round_index in range(3):
        fedavg_round(model, shards, config=config, round_index=round_index)
    with torch.no_grad():
        after = model.loss(tokens, targets).item()
    assert after < before - 0.05, f"3 FedAvg rounds ({config}) moved the held-out loss from {before:.4f} to {after:.4f}"
