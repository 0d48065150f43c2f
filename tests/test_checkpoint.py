"""Checkpoint loading: every layout users have, the inferred config, fp8, bad files, and the real-size config."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import ZImageConfig, ZImageTransformer, inspect_checkpoint, load_transformer, save_transformer
from zimage_core.checkpoint import comfyui_state_dict

G = torch.Generator().manual_seed(11)
LATENTS, CAPTION = torch.randn(1, 16, 12, 10, generator=G), torch.randn(37, 48, generator=G)


def _out(model):
    with torch.no_grad():
        return model(LATENTS, torch.tensor([0.6]), [CAPTION])


@pytest.mark.parametrize("layout, prefix", [
    ("diffusers", ""), ("diffusers", "diffusion_model."), ("comfyui", ""), ("comfyui", "model.diffusion_model."),
])
def test_single_file_layouts_load_to_the_same_numbers(tiny, tmp_path, layout, prefix):
    path = save_transformer(tiny, tmp_path / "m.safetensors", layout=layout, prefix=prefix)
    loaded = load_transformer(path, dtype=torch.float32)
    assert loaded.config == tiny.config
    assert torch.equal(_out(loaded), _out(tiny))
    assert layout in loaded.weight_source.layout
    for name, tensor in tiny.state_dict().items():  # what the LoRA engine re-reads for exact restore
        assert torch.equal(loaded.weight_source.read(name), tensor), name


def test_comfyui_layout_fuses_qkv_rows_in_q_k_v_order(tiny):
    fused = comfyui_state_dict(tiny)
    attn = tiny.layers[0].attention
    assert torch.equal(fused["layers.0.attention.qkv.weight"],
                       torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
    assert "x_embedder.weight" in fused and "layers.0.attention.q_norm.weight" in fused


def test_sharded_diffusers_folder_with_and_without_config(tiny, tmp_path):
    folder = tmp_path / "Z-Image-Turbo" / "transformer"
    folder.mkdir(parents=True)
    state = tiny.state_dict()
    names = sorted(state)
    shards = {f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert torch.equal(_out(load_transformer(folder.parent, dtype=torch.float32)), _out(tiny))
    (folder / "config.json").write_text(json.dumps(tiny.config.to_diffusers()))
    assert torch.equal(_out(load_transformer(folder, dtype=torch.float32)), _out(tiny))


def test_bf16_load_streams_into_bf16(tiny, tmp_path):
    path = save_transformer(tiny, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    model = load_transformer(path)  # default dtype bf16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    assert (_out(model).float() - _out(tiny)).abs().max() < 0.1


def test_fp8_scaled_checkpoint_is_upcast_with_a_warning(tiny, tmp_path, caplog):
    state = comfyui_state_dict(tiny)
    stored = {}
    for key, value in state.items():
        if value.ndim == 2 and key.startswith("layers."):
            scale = value.abs().max() / 448.0
            stored[key] = (value / scale).to(torch.float8_e4m3fn)
            stored[key.replace(".weight", ".scale_weight")] = scale.reshape(())
            stored[key.replace(".weight", ".scale_input")] = torch.ones(())
        else:
            stored[key] = value
    stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    save_file(stored, str(tmp_path / "fp8.safetensors"))
    with caplog.at_level("WARNING", logger="zimage_core"):
        model = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert "fp8" in caplog.text and "degrades" in caplog.text
    qkv = stored["layers.0.attention.qkv.weight"].float() * stored["layers.0.attention.qkv.scale_weight"]
    assert torch.equal(model.layers[0].attention.to_k.weight, qkv[96:192])
    err = float((_out(model) - _out(tiny)).norm() / _out(tiny).norm())
    assert 1e-3 < err < 0.08, err  # fp8 rounding (3 mantissa bits), but the same model (as test_fp8.py)


def _sparse_checkpoint(path, shapes: dict[str, tuple], dtype="BF16"):
    """A real-size safetensors header whose data region is a hole in a sparse file: headers can be read at full
    size without writing the 12 GB."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_real_size_config_is_inferred_from_shapes(tmp_path):
    with torch.device("meta"):
        real = ZImageTransformer(ZImageConfig.turbo())
    comfy = {k: tuple(v.shape) for k, v in comfyui_state_dict(real).items()}
    assert comfy["layers.0.attention.qkv.weight"] == (3 * 3840, 3840)
    path = _sparse_checkpoint(tmp_path / "z_image_turbo_bf16.safetensors",
                              {"model.diffusion_model." + k: s for k, s in comfy.items()})
    assert path.stat().st_size > 12e9 and path.stat().st_blocks * 512 < 50e6  # sparse: nothing written
    config, layout = inspect_checkpoint(path)
    assert config == ZImageConfig.turbo()
    assert (config.dim, config.n_layers, config.n_heads, config.axes_dims) == (3840, 30, 30, (32, 48, 48))
    assert layout.startswith("comfyui")
    with torch.device("meta"):
        assert ZImageTransformer(config).num_parameters() == 6_154_908_736


def test_not_safetensors_files_are_rejected_clearly(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a model")
    with pytest.raises(ValueError, match="notes.safetensors is not a safetensors file"):
        load_transformer(text)
    pickled = tmp_path / "model.safetensors"
    pickled.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(ValueError, match="pickled PyTorch checkpoint"):
        load_transformer(pickled)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_transformer(tmp_path / "missing.safetensors")


def test_truncated_file_names_the_tensor(tiny, tmp_path):
    path = save_transformer(tiny, tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="is truncated: tensor"):
        load_transformer(path)


@pytest.mark.parametrize("keys, looks_like", [
    ({"double_blocks.0.img_attn.qkv.weight": (8, 8)}, "Flux"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (8, 8)}, "SDXL"),
    ({"diffusion_model.layers.0.attention.to_q.lora_A.weight": (4, 8)}, "LoRA"),
    ({"decoder.conv_in.weight": (8, 8)}, "VAE"),
])
def test_other_models_are_named(tmp_path, keys, looks_like):
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=rf"other.safetensors is not a Z-Image transformer: missing .*{looks_like}"):
        load_transformer(tmp_path / "other.safetensors")


def test_wrong_shapes_and_missing_tensors_are_listed(tiny, tmp_path):
    state = dict(tiny.state_dict())
    state["layers.1.attention.to_v.weight"] = torch.zeros(96, 95)
    del state["layers.0.feed_forward.w2.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError) as err:
        load_transformer(tmp_path / "broken.safetensors")
    message = str(err.value)
    assert "broken.safetensors" in message and "layers.0.feed_forward.w2.weight" in message
    assert "layers.1.attention.to_v.weight is [96, 95], the model needs [96, 96]" in message


def test_parameter_counts_read_well_at_every_size(tiny):
    from zimage_core.checkpoint import parameter_count

    assert [parameter_count(n) for n in (6_154_908_736, 1_940_000, 12_345, 999_999, 950)] == \
        ["6.15 B", "1.94 M", "12.3 K", "1 M", "950"]
    assert parameter_count(tiny.num_parameters()).endswith(" K")  # the tiny model: not "0.00 B"


def test_safetensors_header_length_starting_0x80_is_not_taken_for_a_pickle(tmp_path):
    """A safetensors header of 0x380 bytes makes the file start with b"\\x80\\x03", like a pickle: still safetensors."""
    import json as _json
    import struct

    from zimage_core.training.checkpoint import load_checkpoint

    header = _json.dumps({"__metadata__": {"format": "other"}}).encode().ljust(0x380, b" ")
    path = tmp_path / "run.ckpt.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert path.read_bytes()[:2] == b"\x80\x03"
    with pytest.raises(ValueError, match="not a zimage_core training checkpoint"):
        load_checkpoint(path)
