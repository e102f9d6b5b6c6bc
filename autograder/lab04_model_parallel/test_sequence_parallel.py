"""Lab 04, part 4 (graded extension): sequence parallelism (sequence_parallel.py).

The sequence-parallel model must give the single-process loss and gradients, keep (B, N/t, C) activations between the
tensor-parallel regions, and replace the activation all-reduces by all-gathers and reduce-scatters.
"""

import pytest

from autograder.lab04_model_parallel.workers import check_tp_model, tp_model

SP_CASES = [
    {"model": {"num_layers": 2}, "batch": 2, "seq": 12},
    {"model": {"num_layers": 1, "num_kv_heads": 1, "tie_embeddings": True, "num_heads": 8}, "batch": 3, "seq": 8,
     "ignore": 5},
]


@pytest.mark.points(6)
@pytest.mark.time_limit(200)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sequence_parallel_model_matches_single_process(student, world_size):
    """With sequence_parallel=True: the loss and the gathered gradients equal the single-process ones (the norms'
    weight gradients summed over the ranks); embed_tokens returns (B, N/t, C); no all-reduce moves an activation
    (only all-gathers and reduce-scatters do); a sequence the group does not divide raises ValueError naming both."""
    t = world_size
    got = student.run(tp_model, t, 1, t, SP_CASES, 31, True)
    check_tp_model(got, SP_CASES, dp=1, tp=t, seed=31, sequence_parallel=True)
    for index, case in enumerate(SP_CASES):
        width = 64
        activation = case["batch"] * case["seq"] * width * 8
        for rank, out in enumerate(got):
            out = out[index]
            where = f"rank {rank} of {t}, batch {case['batch']} x {case['seq']}, model {case['model']}"
            assert out["embedded_shape"] == (case["batch"], case["seq"] // t, width), (
                f"TensorParallelTransformer.embed_tokens with sequence parallelism should return this rank's "
                f"positions, {(case['batch'], case['seq'] // t, width)}, got {out['embedded_shape']} ({where})")
            kinds = {name for name, _, _ in out["calls"]}
            assert {"all_gather", "reduce_scatter"} <= kinds or {"all_gather_into_tensor",
                                                                 "reduce_scatter_tensor"} <= kinds, (
                f"sequence parallelism should all-gather and reduce-scatter along the sequence; the collectives "
                f"called were {sorted(kinds)} ({where})")
            big = [(name, nbytes) for name, nbytes, _ in out["calls"] if name == "all_reduce"
                   and nbytes in (activation, activation // t)]
            assert not big, (f"with sequence parallelism no all-reduce should move an activation; these did: "
                             f"{big[:4]} ({where})")
            message = out["error"]
            assert message.startswith("ValueError") and str(t + 1) in message and str(t) in message.replace(
                str(t + 1), ""), (f"a sequence of {t + 1} tokens over {t} ranks should raise ValueError naming "
                                  f"{t + 1} and {t}, got: {message} ({where})")
