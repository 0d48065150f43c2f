"""Key normalisation: every producer's LoRA key naming -> the model's module paths.

A key is `<prefix><module><suffix>`. The prefix (`transformer.`, `diffusion_model.`, `lora_unet_`, VideoX-Fun's
`lora_unet__`, `lycoris_`, peft's `base_model.model.`, any nesting of these, or none) and the suffix
(`.lora_A.default.weight`, `.lora_down.weight`, `.lora.up.weight`, `.alpha`, `.diff`, LyCORIS names) are recognised
from fixed lists. Text-encoder keys (`lora_te_`, `text_encoder.`, `text_encoders.`) are set aside by name: this
engine patches the transformer only, and the caller decides whether the rest may be left out. The module part is compared with '.' replaced by '_', which makes the dotted
(diffusers, ComfyUI) and the underscore-joined (kohya/musubi, lycoris_) spellings of one module the same string, so
one table of known Z-Image modules in both naming trees resolves all of them. ComfyUI's fused `attention.qkv`
resolves to the three separate projections, each taking a row block of the fused delta (exact for any LoRA)."""

from __future__ import annotations

import json
import re
from collections import defaultdict

from torch import Tensor

from .weights import LoraError, LoraModule, LoraWeights

# `lora_unet__` (VideoX-Fun: its module path starts with the root's empty name) before `lora_unet_`; a key may nest
# several (peft wrapping a pipeline: `base_model.model.transformer.`), which are stripped in turn.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "lora_unet__",
            "lora_unet_", "lora_transformer_", "lycoris_")
# Text-encoder parts of a combined LoRA: kohya / musubi / VideoX-Fun (`lora_te_`, `lora_te1_`), diffusers / peft and
# OneTrainer (`text_encoder.`, `text_encoder_2.`), ComfyUI's LoRA extractor and OneTrainer's COMFY format
# (`text_encoders.`).
TEXT_ENCODER = re.compile(r"^(?:base_model\.model\.)?(?:lora_te\d*_|text_encoder(?:_\d+)?\.|text_encoders\.)")

# suffix -> role; checked in this order (the first that ends the key wins)
SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),
    *((f".{n}", n) for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")),
    *((f".{n}", n) for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
)
# Adapter methods whose effect is not a weight delta this engine can add exactly (DoRA renormalises each weight row,
# OFT/BOFT rotate it) or whose layout it does not implement: refusing the file is better than applying part of it.
# (pattern on the key, method name); peft keys may carry an adapter name (`.default`) after the part.
UNSUPPORTED = tuple((re.compile(pattern), what) for pattern, what in (
    (r"\.dora_scale$", "DoRA (weight-decomposed LoRA)"),
    (r"\.lora_magnitude_vector(\.|$)", "DoRA (weight-decomposed LoRA, peft's lora_magnitude_vector)"),
    (r"\.magnitude$", "DoRA (weight-decomposed LoRA magnitude)"),
    (r"\.(oft_blocks|oft_diag)$", "OFT (LyCORIS orthogonal fine-tuning)"),
    (r"\.(oft_R|oft_r|oft_s)(\.|$)", "OFT (orthogonal fine-tuning)"),
    (r"\.(boft_R|boft_s)(\.|$)", "BOFT (butterfly orthogonal fine-tuning)"),
    (r"\.vera_lambda_[bd](\.|$)", "VeRA"),
    (r"\.ia3_l(\.|$)", "IA3"),
    (r"\.lora_mid\.weight$", "LoCon mid weights (convolutions)"),
    (r"\.lokr_t[12]$", "LoKr with Tucker (convolution) factors"),
    (r"\.hada_t[12]$", "LoHa with Tucker (convolution) factors"),
    (r"\.(w_norm|b_norm)$", "ComfyUI norm-set patches"),
    (r"\.set_weight$", "ComfyUI set-weight patches"),
    (r"\.reshape_weight$", "reshaped LoRA weights"),
))
# Modules a file may patch that Z-Image's forward pass never reads: skipped (and reported), not refused.
NO_EFFECT = {"norm_final": "norm_final is not used by Z-Image's forward pass (ComfyUI's NextDiT keeps an unused "
                           "copy, which its LoRA extractor writes)"}

FUSED_QKV = "attention.qkv"
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)_(\d+)_(.+)$")
# module inside a block, flattened ('.' -> '_') in either naming tree -> diffusers sub-path
_BLOCK_MODULES = {
    "attention_to_q": "attention.to_q", "attention_to_k": "attention.to_k", "attention_to_v": "attention.to_v",
    "attention_to_out_0": "attention.to_out.0", "attention_out": "attention.to_out.0",
    "attention_to_out": "attention.to_out.0", "attention_qkv": FUSED_QKV,
    "attention_norm_q": "attention.norm_q", "attention_q_norm": "attention.norm_q",
    "attention_norm_k": "attention.norm_k", "attention_k_norm": "attention.norm_k",
    "attention_norm1": "attention_norm1", "attention_norm2": "attention_norm2",
    "ffn_norm1": "ffn_norm1", "ffn_norm2": "ffn_norm2",
    "feed_forward_w1": "feed_forward.w1", "feed_forward_w2": "feed_forward.w2", "feed_forward_w3": "feed_forward.w3",
    "adaLN_modulation_0": "adaLN_modulation.0",
}
_TOP_MODULES = {
    "all_x_embedder_2-1": "all_x_embedder.2-1", "x_embedder": "all_x_embedder.2-1",
    "all_final_layer_2-1_linear": "all_final_layer.2-1.linear", "final_layer_linear": "all_final_layer.2-1.linear",
    "all_final_layer_2-1_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "final_layer_adaLN_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder_mlp_0": "t_embedder.mlp.0", "t_embedder_mlp_2": "t_embedder.mlp.2",
    "cap_embedder_0": "cap_embedder.0", "cap_embedder_1": "cap_embedder.1",
}
_COMFY_NAMES = {"attention_qkv", "attention_out", "attention_q_norm", "attention_k_norm"}
_LORA_ROLES = {"down", "up"}
_LYCORIS = {"lokr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"),
            "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


def split_key(key: str) -> tuple[str, str, str] | None:
    """'diffusion_model.layers.0.attention.to_q.lora_A.weight' -> ('diffusion_model.', 'layers.0....to_q', 'down');
    None when the suffix is not a known adapter part."""
    prefix, rest = strip_prefixes(key)
    for suffix, role in SUFFIXES:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return prefix, rest[:-len(suffix)], role
    return None


def strip_prefixes(key: str) -> tuple[str, str]:
    """('base_model.model.transformer.', 'layers.0....') : every known prefix at the start, in turn."""
    prefix, rest = "", key
    while (p := next((p for p in PREFIXES if rest.startswith(p)), None)) is not None:
        prefix, rest = prefix + p, rest[len(p):]
    return prefix, rest


def resolve_module(module: str) -> str | None:
    """Any spelling of a Z-Image module -> its diffusers path (`FUSED_QKV` blocks end in 'attention.qkv');
    None for anything else."""
    flat = module.replace(".", "_")
    match = _BLOCK.match(flat)
    if match:
        sub = _BLOCK_MODULES.get(match.group(3))
        return None if sub is None else f"{match.group(1)}.{match.group(2)}.{sub}"
    return _TOP_MODULES.get(flat)


def unsupported_part(key: str) -> str | None:
    return next((what for pattern, what in UNSUPPORTED if pattern.search(key)), None)


def is_text_encoder_key(key: str) -> bool:
    return TEXT_ENCODER.match(key) is not None


def detect_format(keys: list[str], metadata: dict) -> str:
    """The producer, from key spellings alone (metadata only identifies this pack's own files)."""
    if str(metadata.get("zimage.format", "")).startswith("zimage-turbo-nodes"):
        return "zimage-turbo-nodes"
    keys = [k for k in keys if not is_text_encoder_key(k)]  # the producer is told by its transformer part
    if any(".lokr_" in k for k in keys):
        return "lycoris-lokr"
    if any(".hada_" in k for k in keys):
        return "lycoris-loha"
    parts = [p for p in map(split_key, keys) if p is not None]
    prefixes = {p for p, _, _ in parts}

    def has(prefix: str) -> bool:
        return any(prefix in p for p in prefixes)
    flat_modules = {m.replace(".", "_") for _, m, _ in parts}
    comfy_names = any(f.endswith(tuple("_" + n for n in _COMFY_NAMES)) or f in ("x_embedder", "final_layer_linear")
                      for f in flat_modules)
    if any(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys):
        return "dot-lora"
    if has("lora_unet__"):
        return "videox-fun"
    if has("lora_unet_"):
        return "musubi-comfy" if comfy_names else "musubi/kohya"
    if has("lycoris_"):
        return "lycoris-lora"
    if has("diffusion_model."):
        if comfy_names or any(k.endswith((".diff", ".diff_b", ".lora_down.weight")) for k in keys):
            return "comfyui"
        return "ai-toolkit"
    default = any(".default." in k for k in keys)
    if has("base_model.model."):
        return "peft"
    if has("transformer."):
        return "peft" if default else "diffusers"
    return "diffsynth" if default else "peft"


def peft_config(metadata: dict) -> dict:
    """The peft adapter config that diffusers/peft store in the file metadata (`lora_adapter_metadata`, keys
    optionally prefixed `transformer.`), or that `load_lora` read from a peft folder's adapter_config.json."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    return {k.removeprefix("transformer."): v for k, v in config.items()} if isinstance(config, dict) else {}


def peft_alphas(config: dict) -> tuple[float | None, dict[str, float]]:
    """lora_alpha and alpha_pattern of a peft adapter config; diffusers/peft apply these at load time."""
    alpha = config.get("lora_alpha")
    return (None if alpha is None else float(alpha)), dict(config.get("alpha_pattern") or {})


def _refuse_peft_method(config: dict, name: str, fmt: str) -> None:
    """A peft config that says DoRA (or another method than LoRA) is refused even where the file's keys alone would
    look like plain LoRA."""
    method = str(config.get("peft_type") or "LORA").upper()
    if method != "LORA":
        raise LoraError(f"{name}: its peft config says peft_type {method}, which this engine cannot apply exactly "
                        f"(detected format {fmt}); refusing the whole file rather than applying part of it")
    if config.get("use_dora"):
        raise LoraError(f"{name}: DoRA (weight-decomposed LoRA, peft use_dora) is not supported: its effect is not a "
                        f"weight delta this engine can add exactly (detected format {fmt}); refusing the whole file")


def normalise(tensors: dict[str, Tensor], metadata: dict, source: str | None = None) -> LoraWeights:
    """Turn a file's tensors into `LoraWeights` keyed by diffusers module paths."""
    name = source or "<state dict>"
    fmt = detect_format(list(tensors), metadata)
    config = peft_config(metadata)
    _refuse_peft_method(config, name, fmt)
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)  # raw module spelling -> role -> tensor
    group_keys: dict[str, list[str]] = defaultdict(list)
    unmatched, text_encoder, skipped = [], [], {}
    for key, value in tensors.items():
        if is_text_encoder_key(key):  # set aside before any other check: this engine never applies them
            text_encoder.append(key)
            continue
        what = unsupported_part(key)
        if what is not None:
            raise LoraError(f"{name}: {what} is not supported: its effect is not a weight delta this engine can add "
                            f"exactly (key {key!r}, detected format {fmt}); refusing the whole file rather than "
                            f"applying part of it")
        parts = split_key(key)
        if parts is not None and parts[1].replace(".", "_").lstrip("_") in NO_EFFECT:
            skipped[key] = NO_EFFECT[parts[1].replace(".", "_").lstrip("_")]
            continue
        if parts is None or resolve_module(parts[1]) is None:
            unmatched.append(key)
            continue
        _, module, role = parts
        groups[module][role] = value
        group_keys[module].append(key)

    lora_alpha, alpha_pattern = peft_alphas(config)
    paths = {raw: resolve_module(raw) for raw in groups}
    redundant = dict(skipped)
    for raw, path in paths.items():  # copies that diffusers also skips: fused qkv or `out` next to the split names
        block, _, sub = path.partition(".attention.")
        twins = ("to_q", "to_k", "to_v") if sub == "qkv" else ("to_out.0",) if _is_comfy_out(raw) else ()
        if any(paths.get(other) in {f"{block}.attention.{t}" for t in twins} for other in paths if other != raw):
            redundant.update({k: f"{raw} duplicates the separate {'/'.join(twins)} keys (diffusers skips it too)"
                              for k in group_keys[raw]})
    modules: dict[str, LoraModule] = {}
    for raw, parts in groups.items():
        path, keys = paths[raw], tuple(group_keys[raw])
        if keys[0] in redundant:
            continue
        module = _build_module(parts, keys, name, fmt)
        if module.kind == "lora" and module.alpha is None and (lora_alpha is not None or alpha_pattern):
            module.alpha = _pattern_alpha(path, alpha_pattern, lora_alpha)
        for target, piece in (_split_fused(path, module, name, fmt) if path.endswith(FUSED_QKV)
                              else {path: module}).items():
            if target in modules:
                raise LoraError(f"{name} (format {fmt}): module {target} is given twice, by keys "
                                f"{list(modules[target].keys[:2])} and {list(keys[:2])}")
            modules[target] = piece
    return LoraWeights(modules, format=fmt, metadata=dict(metadata), source=source, unmatched=unmatched,
                       redundant=redundant, text_encoder=text_encoder)


def _pattern_alpha(path: str, alpha_pattern: dict[str, float], default: float | None) -> float | None:
    """peft's rule: a pattern key applies to modules whose path is the key or ends with '.' + key."""
    for pattern, alpha in alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    return default


def _build_module(parts: dict[str, Tensor], keys: tuple[str, ...], name: str, fmt: str) -> LoraModule:
    roles = set(parts)
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    diff_b = parts.get("diff_b")
    lycoris = [kind for kind, names in _LYCORIS.items() if roles & set(names)]
    if lycoris:
        kind = lycoris[0]
        factors = {r: parts[r] for r in roles if r in _LYCORIS[kind]}
        needed = ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} if kind == "loha" else set())
        if kind == "lokr":
            for w in ("lokr_w1", "lokr_w2"):
                if w not in factors and not {w + "_a", w + "_b"} <= set(factors):
                    needed.add(w)
        if not needed <= set(factors):
            raise LoraError(f"{name} (format {fmt}): {kind} module {keys[0]!r} lacks {sorted(needed - set(factors))}")
        return LoraModule(kind=kind, alpha=alpha, factors=factors, diff_b=diff_b, keys=keys)
    if roles & _LORA_ROLES:
        if not _LORA_ROLES <= roles:
            missing = (_LORA_ROLES - roles).pop()
            raise LoraError(f"{name} (format {fmt}): key {keys[0]!r} has no matching {missing} matrix")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"{name} (format {fmt}): keys {list(keys)} do not form a LoRA: down {list(down.shape)}, "
                            f"up {list(up.shape)} (expected [r, in] and [out, r])")
        return LoraModule(down=down, up=up, alpha=alpha, diff_b=diff_b, keys=keys)
    if "diff" in roles or diff_b is not None:
        return LoraModule(kind="diff", diff=parts.get("diff"), diff_b=diff_b, keys=keys)
    raise LoraError(f"{name} (format {fmt}): key(s) {list(keys)} carry only an alpha, with no weights")


def _split_fused(path: str, module: LoraModule, name: str, fmt: str) -> dict[str, LoraModule]:
    """A fused attention.qkv module -> to_q/to_k/to_v modules: the same `down` (and alpha, so the same scale), `up`
    split into three row blocks; full deltas and LyCORIS deltas split by rows likewise. Views, never copies."""
    block = path[:-len(FUSED_QKV)]
    out = module.delta_shape()[0] if module.delta_shape() is not None else module.diff_b.shape[0]
    if out % 3:
        raise LoraError(f"{name} (format {fmt}): fused qkv module {module.keys[0]!r} has {out} output rows, "
                        f"not a multiple of 3")
    dim = out // 3
    pieces = {}
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        rows = slice(i * dim, (i + 1) * dim)

        def cut(t):
            return None if t is None else t[rows]
        pieces[f"{block}attention.{proj}"] = LoraModule(
            kind=module.kind, down=module.down, up=cut(module.up), alpha=module.alpha, diff=cut(module.diff),
            diff_b=cut(module.diff_b), factors=module.factors,
            rows=(rows.start, rows.stop) if module.kind in _LYCORIS else None, keys=module.keys)
    return pieces


def is_adapter_key(key: str) -> bool:
    """True for a key with a LoRA/LyCORIS suffix (known or refused), used to tell LoRAs from full checkpoints."""
    return split_key(key) is not None or unsupported_part(key) is not None


def _is_comfy_out(raw: str) -> bool:
    return raw.replace(".", "_").endswith("attention_out")
