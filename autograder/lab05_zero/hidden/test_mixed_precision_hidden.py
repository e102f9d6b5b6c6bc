"""Lab 05 hidden tests (mixed precision): ZeRO-3 in fp16 on one real rank."""

import pytest
import torch

from common.testing import check_close, describe


@pytest.mark.points(1)
@pytest.mark.time_limit(90)
def test_zero3_fp16_one_rank(student):
    """fp16 parameters gathered in flight, fp32 masters: parameters are the masters cast down, losses close."""
    from autograder.lab05_zero.workers import expected_training, train_local

    spec = {"config": {"stage": 3, "param_dtype": "float16"}, "steps": 3, "micro": 1, "seed": 46,
            "model_dtype": "float32"}
    got = student.run(train_local, [spec], 1)[0]
    want = expected_training(steps=3, world_size=1, micro=1, seed=46)
    assert got["dtypes"]["param"] == "torch.float16" and got["master_dtypes"] == ["torch.float32"], got["dtypes"]
    for key, master in got["masters"].items():
        assert torch.equal(got["params"][key], master.half()), f"{key} is not its master cast to fp16"
    check_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), dtype="float16", name="losses",
                inputs=describe(stage=3, param_dtype="float16"))
