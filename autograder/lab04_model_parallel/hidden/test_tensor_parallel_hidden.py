"""Lab 04 hidden tests (tensor parallelism): three ranks, and another head layout at four."""

import pytest

from autograder.lab04_model_parallel.test_tensor_parallel import check_errors
from autograder.lab04_model_parallel.workers import tp_ops


@pytest.mark.points(2)
@pytest.mark.time_limit(200)
def test_three_ranks(student):
    """World size 3 (nothing may assume a power of two): f, g, the gather and the linears; the errors name 3."""
    from autograder.lab04_model_parallel.test_tensor_parallel import _linear_expectations
    from autograder.lab04_model_parallel.workers import operator_inputs
    from common.testing import check_close, describe

    got = student.run(tp_ops, 3, 9)
    data = operator_inputs(9, 3)
    want = _linear_expectations(data, 3)
    rows = 5
    for r, out in enumerate(got):
        where = describe(world_size=3, rank=r)
        check_close(out["f_grad"], sum(data["f_weights"]), name="copy_to_tp backward at t = 3", inputs=where)
        check_close(out["g_forward"], sum(data["g_inputs"]), name="reduce_from_tp forward at t = 3", inputs=where)
        check_close(out["column gather=True"]["y"], want["column gather=True"]["y"],
                    name="ColumnParallelLinear(gather_output=True) at t = 3", inputs=where)
        check_close(out["column gather=False"]["dw"], want["column gather=False"]["dw"][r * rows:(r + 1) * rows],
                    name="ColumnParallelLinear weight gradient at t = 3", inputs=where)
        check_close(out["row"]["y"], want["row"]["y"], name="RowParallelLinear at t = 3", inputs=where)
        check_close(out["row"]["dw"], want["row"]["dw"][:, 3 * r:3 * r + 3], name="RowParallelLinear weight "
                    "gradient at t = 3", inputs=where)
        check_errors(out["errors"], 3, r)
