"""Training LoRAs on a quantized base (QLoRA), through the core trainer on tiny models on CPU: every scheme (sft,
differential, trajectory, distillpatch) on every stored base format, with and without block offload. The base's
stored tensors never change and never receive a gradient; the LoRA trains; block offload changes no number; the
saved LoRA names the base's format in its metadata; a resumed run equals an uninterrupted one bit for bit, and a
checkpoint made on a base stored another way is refused."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open

from quant_bases import BASES, base_model  # tests/quant_bases.py
from zimage_core.lora import new_lora, save_lora
from zimage_core.offload import enable_block_offload
from zimage_core.training import ConfigError, TrainConfig, build_cache, train
from zimage_core.training.toy import make_toy_dataset, toy_encoders

SCHEMES = ("sft", "differential", "trajectory", "distillpatch")
SLOW = pytest.mark.slow  # the whole matrix: ~5 min on one core; the suite runs sft on every base, resume on Q4_K


def matrix(values, fast):
    return [v if v in fast else pytest.param(v, marks=SLOW) for v in values]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    folder = make_toy_dataset(tmp / "data", n=2, sizes=((64, 64),))
    cache = build_cache(folder, tmp / "cache", toy_encoders(), prompts=["a red square"])
    helper = base_model("fp32", tmp)  # LoRA files of the base's shapes (every format keeps the logical shapes)
    for name, seed in (("preset", 3), ("sft", 4), ("patch", 5)):
        lora = new_lora(helper, rank=4, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        for m in lora.modules.values():
            m.up.copy_(torch.randn(m.up.shape, generator=gen) * 0.1)
        save_lora(lora, tmp / f"{name}.safetensors")
    return tmp, cache


def config(tmp, scheme: str, name: str, **kw) -> TrainConfig:
    extra = {"differential": dict(preset_lora=str(tmp / "preset.safetensors")),
             "trajectory": dict(init_lora=str(tmp / "sft.safetensors"), teacher_steps=4, student_steps=2),
             "distillpatch": dict(distill_patch=str(tmp / "patch.safetensors"))}[scheme] if scheme != "sft" else {}
    base = dict(scheme=scheme, rank=4, lr=3e-3, steps=3, output_dir=str(tmp / "out"), output_name=name,
                validate=False, checkpoint_every=0, log_every=0, base_model="tiny:0", save_dtype="fp32", **extra)
    base.update(kw)
    return TrainConfig(**base)


def stored_digest(model) -> str:
    """Every parameter and buffer of the base, as stored (quantized bytes included)."""
    h = hashlib.sha256()
    for name, t in sorted([*model.named_parameters(), *model.named_buffers()]):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def runs(workspace):
    """(format, scheme, offload) -> TrainResult, each trained once."""
    tmp, cache = workspace
    done = {}

    def get(fmt: str, scheme: str, offload: bool):
        key = (fmt, scheme, offload)
        if key not in done:
            model = base_model(fmt, tmp)
            if offload:
                enable_block_offload(model, "cpu", "cpu")
            before = stored_digest(model)
            name = f"{fmt.replace(':', '_')}_{scheme}_{'block' if offload else 'none'}"
            result = train(model, config(tmp, scheme, name), cache, log=None)
            assert stored_digest(model) == before  # the quantized base is never written
            assert all(p.grad is None for p in model.parameters())  # nor reached by a gradient
            done[key] = result
        return done[key]

    return get


@pytest.mark.parametrize("scheme", matrix(SCHEMES, fast=("sft",)))
@pytest.mark.parametrize("fmt", BASES)
def test_every_scheme_trains_on_every_base_and_offload_changes_nothing(runs, fmt, scheme):
    plain = runs(fmt, scheme, False)
    assert plain.step == 3 and all(torch.isfinite(torch.tensor(plain.losses)))
    assert max(float(m.up.abs().max()) for m in plain.lora.modules.values()) > 0  # it trained
    recorded = metadata(plain.lora_path)["base_format"]
    assert recorded == BASES[fmt]
    offloaded = runs(fmt, scheme, True)
    assert offloaded.losses == plain.losses
    for path, m in plain.lora.modules.items():
        assert torch.equal(m.up, offloaded.lora.modules[path].up)
        assert torch.equal(m.down, offloaded.lora.modules[path].down)


@pytest.mark.parametrize("fmt", BASES)
def test_the_base_format_changes_the_lora(runs, fmt):
    """Each stored base is a different base (its rounding), so its LoRA differs from the full-precision one's."""
    if fmt == "fp32":
        pytest.skip("the reference itself")
    ref, quant = runs("fp32", "sft", False), runs(fmt, "sft", False)
    assert ref.losses[0] != quant.losses[0]


@pytest.mark.parametrize("offload", [False, pytest.param(True, marks=SLOW)], ids=["resident", "block-offload"])
@pytest.mark.parametrize("fmt", matrix([f for f in BASES if f != "fp32"], fast=("Q4_K",)))
def test_resume_on_a_quantized_base_is_bit_identical(workspace, runs, fmt, offload):
    tmp, cache = workspace
    full = runs(fmt, "sft", offload)
    model = base_model(fmt, tmp)
    if offload:
        enable_block_offload(model, "cpu", "cpu")
    name = f"resume_{fmt.replace(':', '_')}_{offload}"
    seen = []
    part = train(model, config(tmp, "sft", name, checkpoint_every=1), cache, log=None,
                 progress=lambda s, t, l: seen.append(s), should_stop=lambda: len(seen) >= 2)
    assert part.interrupted and part.step == 2
    resumed = train(model, config(tmp, "sft", name, checkpoint_every=1, resume="auto"), cache, log=None)
    assert resumed.step == 3 and resumed.losses == full.losses
    for path, m in full.lora.modules.items():
        assert torch.equal(m.up, resumed.lora.modules[path].up)
    # the same checkpoint on the full-precision base is another run: refused, naming both formats
    with pytest.raises(ConfigError, match=f"stored as {BASES[fmt]}.*stored as float32"):
        train(base_model("fp32", tmp), config(tmp, "sft", name, steps=4, resume="auto"), cache, log=None)


def test_headless_cli_trains_on_a_gguf_file_with_offload_and_host_inputs(workspace, runs, capsys):
    """`python -m zimage_core train` with base_model = a Q4_K GGUF file, --offload block and
    --checkpoint-inputs-on-host: the LoRA the core trainer makes on the same base, to the bit."""
    from zimage_core.__main__ import main
    from zimage_core.training.checkpoint import load_checkpoint

    tmp, _ = workspace
    path = tmp / "tiny_Q4_K.gguf"
    base_model("Q4_K", tmp)  # writes the file
    toml = tmp / "cli_q4k.toml"
    toml.write_text("\n".join([
        'scheme = "sft"', f'base_model = "{path.as_posix()}"', f'cache_dir = "{(tmp / "cache").as_posix()}"',
        f'output_dir = "{(tmp / "out").as_posix()}"', 'output_name = "cli_q4k"', "rank = 4", "lr = 3e-3",
        "steps = 3", "checkpoint_every = 0", "log_every = 0", "validate = false", 'save_dtype = "fp32"']) + "\n")
    code = main(["train", "--config", str(toml), "--device", "cpu", "--dtype", "fp32", "--quiet", "--offload",
                 "block", "--checkpoint-inputs-on-host"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert metadata(tmp / "out" / "cli_q4k.safetensors")["base_format"] == "gguf:Q4_K"
    assert load_checkpoint(tmp / "out" / "cli_q4k.ckpt.safetensors")["config"]["checkpoint_inputs_on_host"] is True
    core = runs("Q4_K", "sft", False)
    from safetensors.torch import load_file

    core_file, cli_file = (load_file(str(tmp / "out" / f"{n}.safetensors")) for n in ("Q4_K_sft_none", "cli_q4k"))
    assert core_file.keys() == cli_file.keys() and len(core_file) > 0
    assert all(torch.equal(core_file[k], cli_file[k]) for k in core_file)
    assert core.lora_path.name == "Q4_K_sft_none.safetensors"
