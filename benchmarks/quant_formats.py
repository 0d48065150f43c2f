"""The quantized files users download, modelled for the benchmarks: which Linears each file quantizes, in which
type, and the stored tensors (shape, dtype) of each type. Facts from /work/shared/docs/quantized-formats.md (§1.1
city96's GGUF rules and mixes, §1.2 block bytes, §2.2 comfy_quant layouts, §3 nunchaku, §5 file sizes).

* GGUF (city96's convert.py + patched llama-quantize, jayn7's files): the 30 main layers' attention q/k/v (fused
  `qkv` in the file, split by rows here: the same bytes), out, SwiGLU w1/w2/w3 and adaLN_modulation.0 are
  quantized; refiners, embedders and the final layer stay bf16. Q4_K_M: Q4_K, with attention.qkv in Q5_K and
  feed_forward.w2 in Q6_K (city96's `img_tensor_get_type`). Q3_K_S: Q3_K everywhere. Q8_0: Q8_0 everywhere.
* comfy_quant nvfp4 / int8 (ConvRot): every block Linear (attention, SwiGLU and adaLN of all 34 blocks); nvfp4 with
  its fp8 block scales per 16 (swizzled, padded to 128 x 4) and a scalar, int8 with a float32 scale per row.
* nunchaku svdq-int4 r32: the attention and SwiGLU Linears of all 34 blocks (skip_refiners false), int4 codes,
  a bf16 scale per 64 inputs, a bf16 smooth factor per input and the rank-32 low-rank pair in bf16; adaLN bf16.

The byte model is checked against the files' published sizes (`FILE_GB`, within 1 %) by tests/test_bench_memory.py.
"""

from __future__ import annotations

import re

import torch

from zimage_core import ZImageConfig

# type -> (weights per block, bytes per block) along the input dimension (quantized-formats.md §1.2)
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}

ATTN_FFN = re.compile(r"\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])$")
ADALN = re.compile(r"\.adaLN_modulation\.0$")
MAIN = re.compile(r"^layers\.\d+\.")
QKV, W2 = re.compile(r"\.attention\.to_[qkv]$"), re.compile(r"\.feed_forward\.w2$")


def _gguf_mix(default: str, qkv: str | None = None, w2: str | None = None):
    def pick(path: str) -> str | None:
        if not MAIN.match(path) or not (ATTN_FFN.search(path) or ADALN.search(path)):
            return None  # city96: refiners, embedders, final layer stay bf16
        if qkv and QKV.search(path):
            return qkv
        if w2 and W2.search(path):
            return w2
        return default
    return pick


def _every_block(fmt: str, adaln: bool):
    def pick(path: str) -> str | None:
        if not re.match(r"^(layers|noise_refiner|context_refiner)\.\d+\.", path):
            return None
        return fmt if ATTN_FFN.search(path) or (adaln and ADALN.search(path)) else None
    return pick


# file -> (which type each Linear path gets, or None = compute dtype)
FILES = {
    "Q8_0": _gguf_mix("Q8_0"),
    "Q4_K_M": _gguf_mix("Q4_K", qkv="Q5_K", w2="Q6_K"),
    "Q3_K_S": _gguf_mix("Q3_K"),
    "nvfp4": _every_block("nvfp4", adaln=True),
    "int8": _every_block("int8", adaln=True),
    "svdq-int4 r32": _every_block("svdq_r32", adaln=False),
}
# the files' sizes, GB (10^9 B): published (jayn7's GGUFs, Comfy-Org's int8 ConvRot) or computed for the full
# layout where none is published (nvfp4 on every block Linear, svdq-int4 r32), quantized-formats.md §2.4 / §5
FILE_GB = {"Q8_0": 7.22, "Q4_K_M": 4.98, "Q3_K_S": 3.79, "nvfp4": 3.48, "int8": 6.20, "svdq-int4 r32": 3.62}
FILE_SOURCE = {"Q8_0": "jayn7 z_image_turbo-Q8_0.gguf", "Q4_K_M": "jayn7 z_image_turbo-Q4_K_M.gguf",
               "Q3_K_S": "jayn7 z_image_turbo-Q3_K_S.gguf", "nvfp4": "comfy_quant nvfp4, every block Linear",
               "int8": "Comfy-Org z_image_turbo_int8_convrot", "svdq-int4 r32": "nunchaku svdq-int4_r32-z-image-turbo"}


# stored type -> the pack's format key (zimage_core.quant.FORMATS), whose dequantizer the memory rows run
FORMAT_KEYS = {**{k: f"gguf:{k}" for k in GGUF_BLOCKS}, "nvfp4": "comfy:nvfp4",
               "int8": "comfy:int8_tensorwise_convrot256", "svdq_r32": "svdq:int4"}


def stored_shapes(kind: str, out: int, inp: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored tensors of one [out, in] weight in type `kind`: name -> (shape, dtype)."""
    if kind in GGUF_BLOCKS:
        elems, nbytes = GGUF_BLOCKS[kind]
        return {"weight": ((out, inp // elems * nbytes), torch.uint8)}
    if kind == "nvfp4":
        rows, cols = -(-out // 128) * 128, -(-(inp // 16) // 4) * 4
        return {"weight": ((out, inp // 2), torch.uint8), "weight_scale": ((rows, cols), torch.float8_e4m3fn),
                "weight_scale_2": ((), torch.float32)}
    if kind == "int8":
        return {"weight": ((out, inp), torch.int8), "weight_scale": ((out, 1), torch.float32)}
    if kind.startswith("svdq_r"):
        rank = int(kind.removeprefix("svdq_r"))
        return {"qweight": ((out, inp // 2), torch.int8), "wscales": ((inp // 64, out), torch.bfloat16),
                "smooth_factor": ((inp,), torch.bfloat16), "proj_down": ((inp, rank), torch.bfloat16),
                "proj_up": ((out, rank), torch.bfloat16)}
    raise KeyError(f"unknown stored type {kind!r}")


def stored_bytes(kind: str, out: int, inp: int) -> int:
    return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in stored_shapes(kind, out, inp).values())


def linear_types(model: torch.nn.Module, file: str, prefix: str = "") -> dict[str, str]:
    """Linear path -> stored type for `file` on `model` (a ZImageTransformer; or a standalone block whose paths
    the model would prefix with `prefix`, e.g. "layers.0.")."""
    pick = FILES[file]
    return {path: kind for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (kind := pick(prefix + path)) is not None}


def file_bytes(file: str, config: ZImageConfig | None = None) -> int:
    """The modelled file's bytes: the quantized Linears as stored, every other tensor in bf16 (what the loader
    keeps resident)."""
    from zimage_core import ZImageTransformer

    with torch.device("meta"):
        model = ZImageTransformer(config or ZImageConfig())
    types = linear_types(model, file)
    total = 0
    for name, p in model.named_parameters():
        path, _, leaf = name.rpartition(".")
        if path in types and leaf == "weight":
            total += stored_bytes(types[path], *p.shape)
        else:
            total += p.numel() * 2
    return total
