"""Lab 06 hidden tests (injection): other targets, GPT-2's shared names, and peft's state-dict keys."""

import pytest

from common.testing import check_all_close, check_close, describe


@pytest.mark.points(2)
@pytest.mark.parametrize("kind, config", [
    ("llama", dict(r=6, alpha=2.0, target_modules=("o_proj", "mlp.up_proj"), rank_stabilized=True)),
    ("gpt2", dict(r=3, alpha=9.0, target_modules=("c_proj",))),
])
def test_other_targets_equal_peft(student, kind, config):
    """o_proj and mlp.up_proj with rsLoRA on Llama; GPT-2's c_proj (attention's and the MLP's): peft's logits,
    loss and gradients."""
    from autograder.lab06_lora.test_inject import _peft_step, injected_step

    got = student.run(injected_step, kind, config, 8)
    want = _peft_step(kind, config, 8)
    assert got["layers"] == want["layers"], f"apply_lora({config}) adapted {got['layers']}, peft {want['layers']}"
    check_close(got["logits"], want["logits"], name=f"apply_lora ({kind}, {config}): logits", inputs=describe(**config))
    check_all_close(got["grads"], want["grads"], name=f"apply_lora ({kind}, {config}): gradients",
                    inputs=describe(**config))


@pytest.mark.points(1)
@pytest.mark.parametrize("kind, config", [("llama", dict(r=2, target_modules="all-linear")),
                                          ("gpt2", dict(r=2, target_modules=("c_attn", "c_fc")))])
def test_adapter_state_dict_keys_are_peft_keys(student, kind, config):
    """adapter_state_dict's keys are those peft writes (get_peft_model_state_dict)."""
    from peft import get_peft_model_state_dict

    from autograder.lab06_lora.hidden.producers import adapter_keys
    from autograder.lab06_lora.test_inject import _peft_model

    got = student.run(adapter_keys, kind, config)
    want = sorted(get_peft_model_state_dict(_peft_model(kind, config)))
    assert got == want, f"adapter_state_dict ({kind}, {config}) keys {got[:3]}..., peft's {want[:3]}..."


@pytest.mark.points(1)
def test_gpt2_all_linear_counts(student):
    from autograder.lab06_lora.test_inject import _peft_model, counts

    config = dict(r=7, target_modules="all-linear")
    got = student.run(counts, "gpt2", config)
    want = _peft_model("gpt2", config).get_nb_trainable_parameters()
    assert tuple(got["counts"]) == tuple(want), f"count_parameters (GPT-2 all-linear r7) = {got['counts']}, peft {want}"
