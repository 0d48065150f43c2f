"""Node input validation as newer ComfyUI does it, and the LoRA stack's handling of text-encoder keys.

ComfyUI after 0.3.75 checks every COMBO value against its options, except the inputs that the node's
`validate_inputs` names in its signature (execution.py: `inspect.getfullargspec(...).args`, or all inputs with
**kwargs); 0.3.75 itself does not check V3 combos. `newer_combo_errors` restates that rule on the live node classes,
so these tests fail when a combo the node must tolerate (an unused LoRA that was deleted) is left to the core check."""

import inspect
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_fixtures import comfy_host, comfy_models, t2i_prompt, train_prompt  # noqa: F401  (fixtures)

pytestmark = pytest.mark.comfy
DELETED = "deleted_adapter.safetensors"


def newer_combo_errors(host, node_id: str, inputs: dict) -> list[str]:
    """The inputs whose combo value ComfyUI > 0.3.75 would refuse as 'value not in list' (links are not checked)."""
    cls = host.nodes.NODE_CLASS_MAPPINGS[node_id]
    spec = inspect.getfullargspec(cls.validate_inputs)
    if spec.varkw is not None:
        return []
    info = host.object_info(node_id)["input"]
    errors = []
    for section in ("required", "optional"):
        for name, input_spec in info.get(section, {}).items():
            value = inputs.get(name)
            if name in spec.args or value is None or isinstance(value, list):
                continue
            kind = input_spec[0]
            options = kind if isinstance(kind, list) else (input_spec[1].get("options") if kind == "COMBO" else None)
            if options is not None and value not in options:
                errors.append(name)
    return errors


def test_newer_check_emulation_catches_an_uncovered_combo(comfy_host, comfy_models):
    """The emulation itself can fail: the loader's weight_dtype is left to the core check, so a bad value is
    reported, while its model_name (named in validate_inputs) is not."""
    inputs = {"model_name": "gone.safetensors", "weight_dtype": "fp4", "offload": "none"}
    assert newer_combo_errors(comfy_host, "ZImageTurboModelLoader", inputs) == ["weight_dtype"]


@pytest.mark.slow
def test_saved_trainer_workflow_with_deleted_unused_loras_still_runs(comfy_host, comfy_models):
    """Scheme sft with preset_lora / sft_lora naming files deleted since the workflow was saved: accepted by the newer
    rule and by 0.3.75's validation, and the training runs."""
    prompt = train_prompt(comfy_models, scheme="sft", steps=2, output_name="trained_deleted_unused",
                          preset_lora=DELETED, sft_lora="deleted_sft.safetensors")
    assert newer_combo_errors(comfy_host, "ZImageTurboTrainLora", prompt["11"]["inputs"]) == []
    result = comfy_host.run(prompt)
    assert result.valid, result.validation_error
    assert result.success, result.events[-1:]


@pytest.mark.parametrize("scheme,field", [("differential", "preset_lora"), ("distill", "sft_lora")])
def test_a_deleted_lora_the_scheme_uses_is_a_validation_error_naming_it(comfy_host, comfy_models, scheme, field):
    prompt = train_prompt(comfy_models, scheme=scheme, output_name=f"trained_missing_{scheme}",
                          **{field: DELETED})
    assert newer_combo_errors(comfy_host, "ZImageTurboTrainLora", prompt["11"]["inputs"]) == []
    ok, _error, _outputs, node_errors = comfy_host.validate(prompt)
    assert not ok
    details = str(node_errors["11"]["errors"])
    assert field in details and DELETED in details
    prompt["11"]["inputs"][field] = "None"
    ok, _error, _outputs, node_errors = comfy_host.validate(prompt)
    assert not ok and f"needs a {field}" in str(node_errors["11"]["errors"])


def test_unknown_scheme_is_refused_by_the_node_itself(comfy_host, comfy_models):
    prompt = train_prompt(comfy_models, output_name="trained_bad_scheme")
    prompt["11"]["inputs"]["scheme"] = "dpo"
    ok, _error, _outputs, node_errors = comfy_host.validate(prompt)
    assert not ok and "scheme 'dpo'" in str(node_errors["11"]["errors"])


@pytest.fixture(scope="module")
def lora_with_text_encoder(comfy_host, comfy_models):
    """The user LoRA plus a kohya text-encoder part (what trainers write when the text encoder is trained too)."""
    loras = comfy_host.models_dir / "loras"
    sd = load_file(str(loras / comfy_models.user_lora))
    for i in range(7):
        stem = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        sd[f"{stem}.lora_down.weight"] = torch.randn(4, 32)
        sd[f"{stem}.lora_up.weight"] = torch.randn(32, 4)
    name = "user_style_with_te.safetensors"
    save_file(sd, str(loras / name))
    yield name
    (loras / name).unlink()


def test_stack_applies_the_transformer_part_and_names_the_text_encoder_keys(comfy_host, comfy_models,
                                                                            lora_with_text_encoder):
    """Strict off (default): the image equals the same LoRA without its text-encoder part, and the node's report
    names the keys left out. Strict on: refused, naming the file."""
    with_te = comfy_host.run(t2i_prompt(comfy_models, loras=[(lora_with_text_encoder, 0.8)], save=False), fresh=True)
    assert with_te.success, with_te.events[-1:]
    report = with_te.ui["2"]["text"][0]
    assert "text encoder NOT applied" in report and "14 keys" in report
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in report
    plain = comfy_host.run(t2i_prompt(comfy_models, loras=[(comfy_models.user_lora, 0.8)], save=False), fresh=True)
    assert torch.equal(with_te.output("5", 0)["samples"], plain.output("5", 0)["samples"])

    strict = t2i_prompt(comfy_models, loras=[(lora_with_text_encoder, 0.8)], save=False)
    strict["2"]["inputs"]["strict"] = True
    refused = comfy_host.run(strict, fresh=True)
    assert not refused.success
    message = str(refused.error)
    assert lora_with_text_encoder in message and "text encoder" in message
