"""Lab 04, part 2: the vocabulary-parallel embedding and cross-entropy (vocab_parallel.py).

The cross-entropy must never gather the logits: the ranks record every collective they call (workers.CollectiveLog),
and the test allows three all-reduces' worth of T numbers, nothing gathered.
"""

import pytest
import torch
import torch.nn.functional as F

from autograder.lab04_model_parallel.workers import vocab, vocab_inputs
from common.testing import check_close, describe

GATHERS = ("all_gather", "all_gather_into_tensor", "gather", "all_gather_object", "all_to_all", "all_to_all_single",
           "broadcast", "isend", "irecv", "send", "recv")


def _expected(vocab_size: int, seed: int) -> dict:
    data = vocab_inputs(seed, vocab_size)
    table = data["table"].clone().requires_grad_()
    y = F.embedding(data["tokens"], table)
    (y * data["embed_r"]).sum().backward()
    out = {"embed": {"y": y.detach(), "dw": table.grad}, "data": data}
    for name, dtype, offset in (("fp64", torch.float64, 0.0), ("fp32 far from zero", torch.float32, 500.0)):
        # the reference in float64 from the same (rounded) inputs: F.cross_entropy per token, 0 where ignored
        logits = (data["logits"] + offset).to(dtype).double().requires_grad_()
        losses = F.cross_entropy(logits, data["targets"], ignore_index=-100, reduction="none")
        (losses * data["loss_r"]).sum().backward()
        out[name] = {"losses": losses.detach(), "dlogits": logits.grad, "dtype": dtype}
    return out


@pytest.mark.points(8)
@pytest.mark.time_limit(200)
@pytest.mark.parametrize("world_size", [2, 4])
def test_embedding_and_cross_entropy(student, world_size):
    """VocabParallelEmbedding equals nn.Embedding (each rank's rows get their gradient); vocab_parallel_cross_entropy
    equals F.cross_entropy per token (ignored targets give 0 and no gradient; logits near 500 in fp32 do not
    overflow), its gradient is each rank's columns of the full one, and it calls only all-reduces, of at most 3 T
    numbers in all, never gathering the logits; a vocabulary the group does not divide raises ValueError."""
    V, t = 24, world_size
    got = student.run(vocab, world_size, 3, V)
    want = _expected(V, 3)
    rows = V // t
    for r, out in enumerate(got):
        where = describe(world_size=t, rank=r, vocab_size=V, tokens=(3, 5))
        check_close(out["embed"]["y"], want["embed"]["y"], name="VocabParallelEmbedding output", inputs=where)
        check_close(out["embed"]["dw"], want["embed"]["dw"][r * rows:(r + 1) * rows],
                    name="VocabParallelEmbedding weight gradient (this rank's rows)", inputs=where)
        for name in ("fp64", "fp32 far from zero"):
            expect, have = want[name], out[name]
            where = describe(world_size=t, rank=r, logits=(11, V // t), dtype=name, ignored_targets=[3])
            check_close(have["losses"], expect["losses"], name="vocab_parallel_cross_entropy losses", inputs=where,
                        dtype=expect["dtype"])
            check_close(have["dlogits"], expect["dlogits"][:, r * rows:(r + 1) * rows],
                        name="vocab_parallel_cross_entropy gradient of this rank's logits", inputs=where,
                        dtype=expect["dtype"])
            kinds = [call[0] for call in have["calls"]]
            assert not any(kind in GATHERS for kind in kinds), (
                f"vocab_parallel_cross_entropy must not gather or send the logits; it called {kinds} ({where})")
            numbers = sum(nbytes for _, nbytes, _ in have["calls"]) / torch.empty(0, dtype=expect["dtype"]
                                                                                   ).element_size()
            assert numbers <= 3 * 11, (
                f"vocab_parallel_cross_entropy moved {numbers:g} numbers through collectives for T = 11 tokens; the "
                f"max, the sum of exponentials and the target logit need 3 T = 33 ({where}; calls {have['calls']})")
        message = out["error"]
        assert message.startswith("ValueError") and str(out["bad"]) in message and str(t) in message.replace(
            str(out["bad"]), ""), (
            f"VocabParallelEmbedding({out['bad']}, ...) over {t} ranks should raise ValueError naming "
            f"{out['bad']} and {t}, got: {message}")
