"""Lab 05, part 6: mixed precision, bf16 (or fp16) parameters and gradients in flight, fp32 master shards."""

import pytest
import torch

from common.testing import check_close, describe

CASES = [(1, "bfloat16"), (2, "bfloat16"), (3, "bfloat16"), (2, "float16")]


# -----------------------------------------------------------------------------
# Tests: run in the grader (the producers are in workers.py)


def _update_error(masters: dict, want: dict, initial: dict) -> float:
    """|| (got - w0) - (want - w0) || / || want - w0 || over every trainable parameter: how far the low-precision run's
    total update is from the fp64 run's (bf16 gradients flip the sign of Adam's update where a gradient is ~0, so
    an elementwise tolerance would fail a correct run; a wrong run is off by 100% or more)."""
    error = sum(((masters[k].double() - want[k]) ** 2).sum() for k in masters)
    size = sum(((want[k] - initial[k].double()) ** 2).sum() for k in masters)
    return float((error / size).sqrt())


@pytest.mark.points(4)
@pytest.mark.time_limit(240)
def test_low_precision_in_flight_with_fp32_masters(student):
    """An fp32 model on two ranks, stages 1-3 with bf16 in flight and stage 2 with fp16, three steps of two
    micro-batches: the model computes with bf16/fp16 parameters (and, at stage 1, gradients), the master shards stay
    fp32 and the parameters are exactly the masters cast down; the losses follow fp64 single-process training within
    the low precision's tolerance, and the weights' total update within 15%."""
    from autograder.lab05_zero.workers import expected_training, make_model, train

    specs = [{"config": {"stage": stage, "param_dtype": dtype}, "steps": 3, "micro": 2, "seed": 25,
              "model_dtype": "float32"} for stage, dtype in CASES]
    results = student.run(train, specs, 2, timeout_s=200)
    want = expected_training(steps=3, world_size=2, micro=2, seed=25)
    initial = dict(make_model(seed=25).named_parameters())
    for (stage, dtype), ranks in zip(CASES, results):
        inputs = describe(stage=stage, world_size=2, param_dtype=dtype)
        for rank, got in enumerate(ranks):
            where = f"{inputs}, rank={rank}"
            assert got["dtypes"]["param"] == f"torch.{dtype}", (
                f"the model's trainable parameters are {got['dtypes']['param']} in the forward, expected {dtype} "
                f"({where})")
            if stage == 1:
                assert got["dtypes"]["grad"] == f"torch.{dtype}", f"gradients are {got['dtypes']['grad']} ({where})"
            assert got["master_dtypes"] == ["torch.float32"], f"master shards are {got['master_dtypes']} ({where})"
            for key, master in got["masters"].items():
                assert torch.equal(got["params"][key], master.to(getattr(torch, dtype))), (
                    f"parameter {key} in flight is not its fp32 master cast to {dtype} ({where})")
            check_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), dtype=dtype,
                        name="loss of each step", inputs=where)
            error = _update_error(got["masters"], want["params"], initial)
            assert error < 0.15, (f"the master weights moved {100 * error:.0f}% away from the fp64 run's update "
                                  f"(allowed 15%) ({where})")
