"""Lab 10 hidden tests (collectives): groups of 3 and 6 on 8-device nodes, strides that leave nodes half used."""

import math

import pytest

from autograder.lab10_auto_parallel.formulas import group_time
from autograder.lab10_auto_parallel.workers import call

CLUSTER = {"name": "h100-nvlink-ib", "gpus_per_node": 8, "num_nodes": 8, "intra": {"alpha": 3e-6, "bandwidth": 4e11},
           "inter": {"alpha": 1.1e-5, "bandwidth": 4.5e10}}


@pytest.mark.points(1)
def test_odd_groups(student):
    """all-reduce, reduce-scatter and all-gather on groups of 3, 6, 12 and 24 with strides 1, 2, 3 and 4."""
    keys = [(k, p, s) for k in ("all_reduce", "reduce_scatter", "all_gather") for p, s in ((3, 1), (6, 2), (12, 1),
                                                                                          (24, 2), (6, 3), (4, 4))]
    got = student.run(call, [{"module": "collectives", "fn": "collective_time", "args": [("k", k), ("n", 777_777)],
                              "kwargs": {"group_size": p, "cluster": CLUSTER, "stride": s}} for k, p, s in keys])
    for (kind, p, stride), value in zip(keys, got):
        want = group_time(kind, 777_777, p, stride, CLUSTER)
        assert math.isclose(value, want, rel_tol=1e-9), f"collective_time({kind}, p={p}, stride={stride}) = {value}"
