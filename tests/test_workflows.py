"""The shipped workflows: up to date with the nodes, open cleanly in the real ComfyUI frontend, convert to the API
format as the frontend does, pass the real host's validation, and run on the tiny models (text encoder swapped)."""

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from comfy_fixtures import comfy_host, write_test_models, write_tiny_transformer  # noqa: E402,F401
from comfy_host import ComfyServer, write_dataset, write_inpaint_image  # noqa: E402
from tiny_encoders import tiny_encoders  # noqa: E402,F401  (fixture)
from frontend import chromium_path, open_workflow  # noqa: E402
import workflows as wf  # noqa: E402

pytestmark = pytest.mark.comfy
INPAINT_SIZE = 256  # the inpainting workflow's size is its image's: a small one keeps the VAE cheap on CPU
RUN_SIZE = 256  # the other workflows run at this latent size and RUN_STEPS training steps: the full-size random
RUN_STEPS = 10  # Flux VAE at 1024 px and 250 steps cost minutes per workflow on CPU and prove nothing more
SHIPPED = sorted((ROOT / "workflows").glob("*.json"))
NAMES = [p.stem for p in SHIPPED]


@pytest.fixture(scope="module")
def host(comfy_host):  # noqa: F811
    """The in-process host with the workflows' standard file names present (tiny weights where they run)."""
    from safetensors.torch import save_file
    from zimage_core.testing import tiny_controlnet, tiny_model

    from zimage_core import load_lora, save_lora

    files = write_test_models(comfy_host)
    models = comfy_host.models_dir
    write_tiny_transformer(models / "diffusion_models" / wf.MODEL_FILE, seed=0)
    write_tiny_transformer(models / "diffusion_models" / wf.BASE_MODEL_FILE, seed=5)  # a tiny "Z-Image base"
    user_lora = load_lora(models / "loras" / files.user_lora)
    # what train_sft would have written (train_distill starts from it; train_sft may replace it)
    save_lora(user_lora, models / "loras" / wf.SFT_LORA_FILE, metadata={"trainer": "zimage_core.training"})
    save_lora(user_lora, models / "loras" / wf.ADAPTER_FILE)  # stands in for the turbo training adapter
    for name, other in zip(wf.STACK_LORA_FILES, (files.user_lora, files.user_lora2)):  # the stacking workflow's
        save_lora(load_lora(models / "loras" / other), models / "loras" / name)
    (models / "text_encoders" / wf.TEXT_ENCODER_FILE).write_bytes(b"")  # only validated; swapped when run
    (models / "model_patches").mkdir(exist_ok=True)
    save_file(tiny_controlnet("2.1", base=tiny_model(0).config).state_dict(),
              str(models / "model_patches" / wf.CONTROLNET_FILE))
    write_dataset(comfy_host.base_dir / "input" / "zimage_control_src", n=1, size=96)
    shutil.copyfile(comfy_host.base_dir / "input" / "zimage_control_src" / "img0.png",
                    comfy_host.base_dir / "input" / wf.CONTROL_IMAGE)  # 96 px: fitted to the 1024 px latent
    write_inpaint_image(comfy_host.base_dir / "input" / wf.INPAINT_IMAGE, size=INPAINT_SIZE)
    comfy_host.tiny_width = tiny_model(0).config.cap_feat_dim
    return comfy_host


@pytest.fixture(scope="module")
def server(host):
    with ComfyServer(host.base_dir) as running:
        running.object_info = running.get_json("/object_info")
        yield running


def _load(name):
    return json.loads((ROOT / "workflows" / f"{name}.json").read_text())


def test_every_definition_is_shipped_with_a_thumbnail():
    assert sorted(w.name for w in wf.definitions()) == NAMES
    assert set(NAMES) == {"zimage_turbo_t2i", "zimage_turbo_quality_30step", "zimage_turbo_controlnet",
                          "zimage_turbo_inpaint", "train_sft", "train_differential", "train_distill",
                          "train_base_sample_turbo", "zimage_turbo_lora_stack_variety"}
    assert all((ROOT / "workflows" / f"{name}.jpg").is_file() for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_matches_the_nodes(server, name):
    """Regenerating from the live /object_info gives the shipped file: widget order and inputs are current."""
    definition = next(w for w in wf.definitions() if w.name == name)
    assert wf.build(definition, server.object_info) == _load(name)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_validates_in_the_real_host(server, host, name):
    prompt = wf.to_api(_load(name), server.object_info)
    ok, error, outputs, node_errors = host.validate(prompt)
    assert ok and not node_errors, (error, node_errors)
    assert outputs


# What the served frontend logs on an offline test server whatever the workflow (docs/comfy-host notes): a settings
# listener without a user, no template package, no internet for model sizes. Anything else fails the test.
BENIGN_CONSOLE = ("Cannot read properties of undefined (reading 'id')", "Error loading core workflow templates",
                  "Error fetching file size")


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (tools/setup_env.sh installs it)")
@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_in_the_frontend(server, name, tmp_path):
    """The workflow as the template browser hands it to the frontend (served from workflows/) opens cleanly."""
    from comfy_host import PACK_NAME

    served = server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
    assert served == _load(name)
    result = open_workflow(server.url, served)
    shots = Path(os.environ.get("ZIMAGE_SCREENSHOTS", tmp_path))  # tools/screenshots.sh refreshes docs/
    shots.mkdir(parents=True, exist_ok=True)
    (shots / f"{name}.png").write_bytes(result.screenshot_png)
    assert result.unknown_types == []
    assert result.widget_mismatches == []
    assert result.alerts == []
    print(f"{name}: console errors {result.console_errors}")
    assert [e for e in result.console_errors if not any(b in e for b in BENIGN_CONSOLE)] == []
    frontend = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result.api_prompt.items()}
    assert frontend == wf.to_api(_load(name), server.object_info)  # the offline converter agrees


@pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (tools/setup_env.sh installs it)")
def test_workflow_saved_before_the_sampler_input_still_opens_as_euler(server, host):
    """Workflows saved before the sampler's `sampler` widget (and the seed-variety widgets after it) existed lack
    their values at the end of widgets_values: the frontend fills in the defaults (euler, variety off) and the
    prompt it makes validates."""
    old = _load("zimage_turbo_t2i")
    node = next(n for n in old["nodes"] if n["type"] == "ZImageTurboSampler")
    assert node["widgets_values"][-4:] == ["euler", 0.0, 2, "shift"]
    node["widgets_values"] = node["widgets_values"][:-4]
    result = open_workflow(server.url, old)
    assert result.unknown_types == [] and result.alerts == []
    prompt = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in result.api_prompt.items()}
    assert prompt[str(node["id"])]["inputs"]["sampler"] == "euler"
    assert prompt[str(node["id"])]["inputs"]["variety"] == 0.0
    ok, error, _outputs, node_errors = host.validate(prompt)
    assert ok and not node_errors, (error, node_errors)


def _cheap(prompt: dict) -> dict:
    """The shipped graph at RUN_SIZE and at most RUN_STEPS training steps (everything else as shipped)."""
    for node in prompt.values():
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=RUN_SIZE, height=RUN_SIZE)
        if node["class_type"] == "ZImageTurboTrainLora":
            node["inputs"]["steps"] = min(node["inputs"]["steps"], RUN_STEPS)
    return prompt


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_the_tiny_model(server, host, name):
    prompt = _cheap(wf.swap_text_encoder(wf.to_api(_load(name), server.object_info), host.tiny_width))
    result = host.run(prompt, fresh=True)  # every output node runs, none is served from an earlier workflow
    assert result.valid, result.validation_error
    assert result.success, result.events[-1:]
    saved = [img for out in result.ui.values() for img in out.get("images", []) if img.get("type") == "output"]
    # trained workflows: base and trained side by side; inpainting: noise mask and ControlNet inpaint mode; the
    # stacking workflow: a batch of 4 seeds
    expected = 2 if name.startswith("train_") or name == "zimage_turbo_inpaint" else 1
    assert len(saved) == (4 if name == "zimage_turbo_lora_stack_variety" else expected)
    from PIL import Image

    size = (INPAINT_SIZE,) * 2 if name == "zimage_turbo_inpaint" else (RUN_SIZE, RUN_SIZE)
    for image in saved:
        path = Path(host.folder_paths.get_output_directory()) / image["subfolder"] / image["filename"]
        assert Image.open(path).size == size
    if name.startswith("train_"):
        previews = [img for out in result.ui.values() for img in out.get("images", []) if img.get("type") == "temp"]
        assert len(previews) == 2  # loss curve and validation grid shown in the UI


def test_workflows_are_listed_in_the_template_browser(server):
    """ComfyUI serves the pack's workflows/ folder to its template browser: the listing names its workflows, and
    every file the browser fetches (workflow and thumbnail) is byte for byte the one in workflows/."""
    listing = server.get_json("/api/workflow_templates")
    from comfy_host import PACK_NAME

    assert sorted(listing[PACK_NAME]) == NAMES
    for name in NAMES:
        for suffix in (".json", ".jpg"):
            status, served = server._request(f"/api/workflow_templates/{PACK_NAME}/{name}{suffix}")
            assert status == 200 and served == (ROOT / "workflows" / f"{name}{suffix}").read_bytes(), name + suffix
    status, thumbnail = server._request(f"/api/workflow_templates/{PACK_NAME}/zimage_turbo_t2i.jpg")
    assert status == 200 and thumbnail[:2] == b"\xff\xd8"  # a JPEG


def test_t2i_workflow_runs_on_comfyuis_own_text_encoder(server, host, tiny_encoders):  # noqa: F811
    """The shipped text-to-image workflow as shipped, CLIPLoader -> CLIPTextEncode included: ComfyUI's own Qwen3
    code, tokenizer and chat template read a tiny Qwen3 of the tiny model's caption width (only clip_name points at
    it), and its conditioning, attention_mask included, drives the pack's sampler."""
    from comfy_reference import tiny_qwen3_as_zimage_encoder
    from tiny_encoders import qwen3_config

    shutil.copyfile(tiny_encoders.text_single, host.models_dir / "text_encoders" / "qwen_3_4b_tiny.safetensors")
    prompt = _cheap(wf.to_api(_load("zimage_turbo_t2i"), server.object_info))
    loaders = [node for node in prompt.values() if node["class_type"] == "CLIPLoader"]
    assert loaders
    for node in loaders:
        node["inputs"]["clip_name"] = "qwen_3_4b_tiny.safetensors"
    with tiny_qwen3_as_zimage_encoder(qwen3_config()):
        result = host.run(prompt, fresh=True)
    assert result.valid, result.validation_error
    assert result.success, result.events[-1:]
    encoded = [result.output(k, 0) for k, node in prompt.items() if node["class_type"] == "CLIPTextEncode"]
    assert encoded and all("attention_mask" in c[0][1] for c in encoded)
