"""Lab 03, part 1: ring reduce-scatter, all-gather and all-reduce from send/recv, and the alpha-beta cost model
(collectives.py).

The ranks run the student's collectives with every torch collective banned before the lab is imported, and count the
bytes each rank sends and receives point to point (workers.guard_collectives). Expected values are computed here, in
float64, from the inputs every rank was given (workers.ring_input): the sum over ranks, its chunks, the shards'
concatenation.
"""

import pytest
import torch

from common.testing import check_close, describe

# -----------------------------------------------------------------------------
# The cost model (no communication)


def cost_model_values(ps: list[int], sizes: list[int], fit_sizes: list[int]) -> dict:
    """Producer: AlphaBeta(7 us, 150 GB/s).ring_time for every case, fit on its own times, and the errors."""
    from lab03_data_parallel.collectives import AlphaBeta

    model = AlphaBeta(alpha_s=7e-6, beta_s_per_byte=1 / 150e9)
    times = {f"{c} {p} {n}": torch.tensor(model.ring_time(c, n, p), dtype=torch.float64)
             for c in ("reduce_scatter", "all_gather", "all_reduce") for p in ps for n in sizes}
    fit_times = [2 * 3 * 7e-6 + 2 * 3 / 4 * n / 150e9 for n in fit_sizes]  # the exact model at p = 4
    fitted = AlphaBeta.fit(fit_sizes, fit_times, world_size=4)
    errors = {}
    for label, call in (("collective", lambda: model.ring_time("all_to_all", 10, 2)),
                        ("nbytes", lambda: model.ring_time("all_reduce", -1, 2)),
                        ("world_size", lambda: model.ring_time("all_reduce", 10, 0))):
        try:
            call()
            errors[label] = "no error"
        except Exception as error:  # noqa: BLE001
            errors[label] = f"{type(error).__name__}: {error}"
    return {"times": times, "fit": torch.tensor([fitted.alpha_s, fitted.beta_s_per_byte], dtype=torch.float64),
            "errors": errors}


@pytest.mark.points(2)
def test_alpha_beta_cost_model(student):
    """ring_time follows (p-1)·alpha + (p-1)/p·n·beta per pass (two passes for all-reduce), fit recovers the model
    from exact times, and an unknown collective raises ValueError."""
    ps, sizes = [1, 2, 3, 8], [0, 1000, 12_345_678]
    fit_sizes = [2**k for k in range(10, 28, 2)]
    got = student.run(cost_model_values, ps, sizes, fit_sizes)
    for collective in ("reduce_scatter", "all_gather", "all_reduce"):
        for p in ps:
            for n in sizes:
                one_pass = (p - 1) * 7e-6 + (p - 1) / p * n / 150e9
                expected = 2 * one_pass if collective == "all_reduce" else one_pass
                check_close(got["times"][f"{collective} {p} {n}"], torch.tensor(expected, dtype=torch.float64),
                            name=f"AlphaBeta.ring_time({collective!r})", inputs=describe(world_size=p, nbytes=n))
    check_close(got["fit"], torch.tensor([7e-6, 1 / 150e9], dtype=torch.float64),
                name="AlphaBeta.fit on exact model times", inputs=describe(sizes=len(fit_sizes), world_size=4),
                rtol=1e-4, atol=0)
    for label, call in (("collective", "'all_to_all', 10, 2"), ("nbytes", "'all_reduce', -1, 2"),
                        ("world_size", "'all_reduce', 10, 0")):
        message = got["errors"][label]
        assert message.startswith("ValueError") and label in message, (
            f"AlphaBeta.ring_time({call}) should raise ValueError naming {label}, got: {message}")


# -----------------------------------------------------------------------------
# Ring collectives on 2, 3 and 4 ranks


def ring_results(shared_run, world_size: int, *, subgroups: bool = False) -> list[dict]:
    """The ranks' results of workers.ring_collectives, run once per world size and shared by the tests below."""
    from autograder.lab03_data_parallel.workers import ring_collectives

    return shared_run(ring_collectives, world_size, 7, subgroups)


def expected_ring(members: list[int], seed: int = 7) -> list[dict]:
    """Per case: every member's input, their float64 sum, and the chunk sizes over len(members) ranks."""
    from autograder.lab03_data_parallel.workers import ring_cases, ring_input, split_sizes

    cases = []
    for case, (shape, dtype) in enumerate(ring_cases(len(members))):
        inputs = [ring_input(shape, dtype, case=case, rank=r, seed=seed).double() for r in members]
        total = torch.stack(inputs).sum(0)
        sizes = split_sizes(total.numel(), len(members))
        cases.append({"inputs": inputs, "sum": total, "sizes": sizes, "dtype": dtype,
                      "starts": [sum(sizes[:g]) for g in range(len(members))]})
    return cases


def check_values(results: list[dict], *, world_size: int, subgroups: bool = False) -> None:
    """Every collective's result on every rank and case against the float64 expectation, in the case's dtype."""
    from autograder.lab03_data_parallel.workers import split_sizes

    for out in results:
        members = out["members"]
        g = members.index(out["rank"])
        for case, (got, want) in enumerate(zip(out["cases"], expected_ring(members))):
            inputs = describe(world_size=world_size, rank=out["rank"], group=members if subgroups else "default",
                              shape=got["shape"], dtype=got["dtype"])
            dtype = want["dtype"]
            start, stop = want["starts"][g], want["starts"][g] + want["sizes"][g]
            shards = [x.reshape(-1)[s:s + n] for x, s, n in zip(want["inputs"], want["starts"], want["sizes"])]
            expected = {
                "all_reduce": want["sum"],
                "all_reduce avg": want["sum"] / len(members),
                "all_reduce non-contiguous": want["sum"],
                "reduce_scatter": want["sum"].reshape(-1)[start:stop],
                "reduce_scatter avg": want["sum"].reshape(-1)[start:stop] / len(members),
                "all_gather": torch.cat(shards),
            }
            for what, value in expected.items():
                name = f"ring_{what} (op='avg')" if what.endswith(" avg") else f"ring_{what}"
                check_close(got[what], value, name=name.replace(" avg", ""), inputs=inputs, dtype=dtype)
                assert got[what].dtype == dtype, f"{name} returned {got[what].dtype} for a {dtype} input ({inputs})"
            if not got["input kept"]:
                raise AssertionError(f"ring_reduce_scatter modified its input tensor ({inputs})")
            if not got["all_reduce in place"]:
                raise AssertionError(f"ring_all_reduce must reduce in place and return the tensor it was given, "
                                     f"like dist.all_reduce; it returned {got['all_reduce returned']!r:.80} ({inputs})")
        chunk = split_sizes(100 * len(members) + 1, len(members))[g]
        assert out["bad shard"].startswith("ValueError") and str(chunk) in out["bad shard"], (
            f"ring_all_gather with a 3-element shard for numel {100 * len(members) + 1} over {len(members)} ranks "
            f"should raise ValueError naming the chunk size expected of rank {out['rank']} ({chunk}), got: "
            f"{out['bad shard']}")
        assert out["bad op"].startswith("ValueError") and "op" in out["bad op"], (
            f"ring_all_reduce(op='max') should raise ValueError naming op on rank {out['rank']}, got: {out['bad op']}")


def check_traffic(results: list[dict], *, world_size: int) -> None:
    """The bytes each rank sent and received point to point: the ring's volume (module docstring of workers.py)."""
    for case in range(len(results[0]["cases"])):
        for what, passes in (("all_reduce", 2), ("reduce_scatter", 1), ("all_gather", 1)):
            groups: dict[tuple, list[dict]] = {}
            for out in results:
                groups.setdefault(tuple(out["members"]), []).append(out)
            for members, outs in groups.items():
                p = len(members)
                want = expected_ring(list(members))[case]
                element = torch.empty((), dtype=want["dtype"]).element_size()
                numel = want["sum"].numel()
                low, high = passes * (p - 1) * min(want["sizes"]), passes * (p - 1) * max(want["sizes"])
                inputs = describe(world_size=world_size, group=list(members), numel=numel,
                                  dtype=str(want["dtype"]).removeprefix("torch."))
                sent = [o["cases"][case][f"{what} traffic"]["sent"] // element for o in outs]
                received = [o["cases"][case][f"{what} traffic"]["received"] // element for o in outs]
                rule = (f"a ring {what.replace('_', '-')} sends {passes}(p-1)/p of the tensor per rank "
                        f"({low}..{high} elements here, by chunk rounding) and {passes}(p-1)·n = "
                        f"{passes * (p - 1) * numel} over all ranks")
                assert all(low <= s <= high for s in sent) and sum(sent) == passes * (p - 1) * numel, (
                    f"ring_{what}: the ranks sent {sent} elements point to point, but {rule} ({inputs})")
                assert sum(received) == sum(sent), (
                    f"ring_{what}: the ranks received {received} elements but sent {sent} ({inputs})")


@pytest.mark.points(6)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_collectives_match_torch(shared_run, world_size):
    """On random data of uneven sizes (fewer elements than ranks too), the ring collectives give the sum over ranks,
    its chunks and the shards' concatenation (what dist.all_reduce / reduce_scatter / all_gather give), in the input's
    dtype; all-reduce works in place (non-contiguous inputs too), reduce-scatter leaves its input alone, a shard of the
    wrong size and an unknown op raise ValueError."""
    check_values(ring_results(shared_run, world_size), world_size=world_size)


@pytest.mark.points(3)
@pytest.mark.time_limit(120)
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_moves_the_ring_volume_point_to_point(shared_run, world_size):
    """With every torch collective banned before the lab is imported, each rank sends and receives, through
    send/recv/isend/irecv, 2(p-1)/p of the tensor for an all-reduce and (p-1)/p for a reduce-scatter or all-gather."""
    check_traffic(ring_results(shared_run, world_size), world_size=world_size)
