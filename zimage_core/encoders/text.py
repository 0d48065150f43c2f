"""Z-Image's prompt encoder: Qwen3-4B hidden states, computed as diffusers' `ZImagePipeline.encode_prompt` does.

The prompt is wrapped as one user turn with the generation prompt, `PROMPT_TEMPLATE` (diffusers renders it with
`apply_chat_template(add_generation_prompt=True, enable_thinking=True)` of Z-Image's Qwen3 tokenizer, ComfyUI's
`z_image.py` hard-codes the same string), tokenized with truncation at 512 tokens (diffusers and DiffSynth; ComfyUI
does not truncate), and the features are the second-to-last entry of `hidden_states` (the output of the
second-to-last decoder layer, without the final norm) at the prompt's tokens. diffusers pads every prompt to 512 and
drops the padded rows again; tokens after the prompt cannot change it (causal attention), so each prompt is encoded
alone and unpadded.

The template is applied as a string rather than through the tokenizer's own chat template, so the tokenizer folder
only supplies the vocabulary: Z-Image-Turbo's `tokenizer/`, Qwen3-4B's, or the `qwen25_tokenizer` folder that ComfyUI
ships and uses for Z-Image (whose own chat template would add a Qwen2.5 system prompt).

Weights: a transformers folder (`text_encoder/` of the diffusers repository: config.json + safetensors) or ComfyUI's
single file `qwen_3_4b.safetensors` (transformers' key names `model.layers.N...`, no lm_head), whose config is read
from the tensor shapes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..safetensors_io import describe_lookalike
from .common import EncoderError, common_prefix, open_safetensors, read_component_config, read_state_dict, require, \
    safetensors_files, weights_id

PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_SEQUENCE_LENGTH = 512  # diffusers' ZImagePipeline default, DiffSynth's too
HIDDEN_STATE = -2
# Not in the weights, so fixed as in Qwen3-4B's config.json (and ComfyUI's Qwen3_4BConfig).
QWEN3_ROPE_THETA = 1_000_000.0
QWEN3_RMS_EPS = 1e-6
QWEN3_MAX_POSITIONS = 40960
_SINGLE_FILE_PREFIXES = ("text_encoders.qwen3_4b.transformer.", "qwen3_4b.transformer.")
_PROBE = "model.layers.0.self_attn.q_norm.weight"  # Qwen3's per-head q norm: absent from Qwen2.5, Llama, CLIP, T5
_LOOKALIKES = [  # (key fragment, what the file probably is)
    ("text_model.encoder.layers.", "a CLIP text encoder"),
    ("embeddings.position_embedding.", "a CLIP text encoder"),
    ("encoder.block.", "a T5 encoder"),
    ("self_attn.k_proj.bias", "a Qwen2.5 text encoder (Qwen-Image's)"),
    ("post_feedforward_layernorm", "a Gemma model"),
    ("decoder.conv_in", "a VAE"),
    ("cap_embedder", "a Z-Image transformer"),
    ("self_attn.q_proj", "a Llama / Mistral style model without Qwen3's q/k norms"),
]
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
_TOKENIZER_ID_FILES = (*_TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json")


class PromptEncoder:
    """Callable prompt -> caption features [L, D] (fp32, CPU), L <= 512, as Z-Image reads them."""

    def __init__(self, model: torch.nn.Module, tokenizer, encoder_id: str, source: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.encoder_id = encoder_id
        self.source = source

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, prompt: str) -> Tensor:
        """[1, L] token ids of the templated prompt, truncated at MAX_SEQUENCE_LENGTH (with a warning)."""
        ids = self.tokenizer(PROMPT_TEMPLATE.format(prompt), return_tensors="pt").input_ids
        if ids.shape[1] > MAX_SEQUENCE_LENGTH:
            warnings.warn(f"prompt {prompt[:60]!r}... has {ids.shape[1]} tokens with its template; only the first "
                          f"{MAX_SEQUENCE_LENGTH} are encoded, as diffusers and DiffSynth do (ComfyUI keeps them all)",
                          stacklevel=2)
            ids = ids[:, :MAX_SEQUENCE_LENGTH]
        return ids

    @torch.no_grad()
    def __call__(self, prompt: str) -> Tensor:
        ids = self.token_ids(prompt).to(self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                         output_hidden_states=True)
        return out.hidden_states[HIDDEN_STATE][0].float().cpu()


def load_prompt_encoder(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PromptEncoder:
    """Qwen3 from a transformers folder or ComfyUI's single file, and its tokenizer folder (for a folder that
    carries its own tokenizer files, `tokenizer` may be omitted)."""
    transformers = require("transformers", "the headless text encoder (Qwen3-4B)")
    path = Path(path)
    if path.is_dir():
        model, files = _load_folder(transformers, path, dtype)
    elif path.is_file():
        model, files = _load_single_file(transformers, path, dtype)
    else:
        raise EncoderError(f"text encoder {path} does not exist (a transformers folder such as Z-Image-Turbo's "
                           "text_encoder/, or ComfyUI's qwen_3_4b.safetensors)")
    tok, tok_id = _load_tokenizer(transformers, tokenizer, path, model.config.vocab_size)
    model = model.to(device).eval().requires_grad_(False)
    encoder_id = f"qwen3:{weights_id(files)}:{str(dtype).removeprefix('torch.')}:tok={tok_id}:max{MAX_SEQUENCE_LENGTH}"
    return PromptEncoder(model, tok, encoder_id, path)


def _load_folder(transformers, folder: Path, dtype: torch.dtype):
    config_file, config = read_component_config(folder, "text encoder", "Z-Image-Turbo's text_encoder/")
    if config.get("model_type") != "qwen3":
        raise EncoderError(f"{config_file} describes a {config.get('model_type')!r} model "
                           f"({', '.join(config.get('architectures') or [])}), not Qwen3: Z-Image's text encoder is "
                           "Qwen3-4B")
    files = safetensors_files(folder, "text encoder")
    model = transformers.AutoModel.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
    return model, files


def _load_single_file(transformers, path: Path, dtype: torch.dtype):
    file = open_safetensors(path)
    prefix = common_prefix(file.keys(), _SINGLE_FILE_PREFIXES)
    shapes = {k[len(prefix):]: info.shape for k, info in file.tensors.items()}
    if _PROBE not in shapes or "model.embed_tokens.weight" not in shapes:
        what = describe_lookalike(shapes, _LOOKALIKES)
        raise EncoderError(f"{path} is not a Qwen3 text encoder (no {_PROBE}){what}: Z-Image needs Qwen3-4B "
                           "(qwen_3_4b.safetensors)")
    config = transformers.Qwen3Config(**_config_from_shapes(shapes))
    state = read_state_dict(file, prefix, skip=("lm_head.",))
    model, info = transformers.Qwen3Model.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                          output_loading_info=True)
    if info["missing_keys"]:
        raise EncoderError(f"{path} lacks {len(info['missing_keys'])} Qwen3 tensor(s), first: "
                           f"{sorted(info['missing_keys'])[:5]}")
    return model, [path]


def _config_from_shapes(shapes: dict[str, tuple]) -> dict:
    vocab, hidden = shapes["model.embed_tokens.weight"]
    head_dim = shapes[_PROBE][0]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("model.layers."))
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
                intermediate_size=shapes["model.layers.0.mlp.gate_proj.weight"][0],
                num_attention_heads=shapes["model.layers.0.self_attn.q_proj.weight"][0] // head_dim,
                num_key_value_heads=shapes["model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
                rope_theta=QWEN3_ROPE_THETA, rms_norm_eps=QWEN3_RMS_EPS,
                max_position_embeddings=QWEN3_MAX_POSITIONS, tie_word_embeddings=True)


def _load_tokenizer(transformers, folder: str | os.PathLike | None, weights: Path, vocab_size: int):
    if folder is None:
        raise EncoderError(f"{weights} carries no tokenizer: pass --tokenizer DIR (Z-Image-Turbo's tokenizer/ folder, "
                           "Qwen3-4B's, or ComfyUI's comfy/text_encoders/qwen25_tokenizer)")
    folder = Path(folder)
    if not folder.is_dir():
        raise EncoderError(f"tokenizer folder {folder} does not exist")
    present = [name for name in _TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise EncoderError(f"tokenizer folder {folder} holds none of {', '.join(_TOKENIZER_FILES)}")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001  transformers raises many types for a broken folder
        raise EncoderError(f"tokenizer folder {folder} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    if any(i is None or i == tok.unk_token_id for i in specials) or max(specials) >= vocab_size:
        raise EncoderError(f"tokenizer folder {folder} is not a Qwen tokenizer for this text encoder "
                           f"(<|im_start|>/<|im_end|> map to {specials}, the model has {vocab_size} embeddings)")
    digest = hashlib.sha256()
    for name in _TOKENIZER_ID_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return tok, digest.hexdigest()[:12]
