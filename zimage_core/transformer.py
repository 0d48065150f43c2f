"""The Z-Image single-stream DiT (S3-DiT), numerically equal to diffusers' `ZImageTransformer2DModel`.

Module and parameter names are diffusers' (= DiffSynth's = the official checkpoint's), so a checkpoint in that
layout loads with no renaming and LoRA keys address modules by their usual paths.

Sequence layout per sample (full attention, positions live in RoPE):
    [ image tokens (N, padded to 32) | caption tokens (L, padded to 32) | batch padding (masked) ]

fp16 (GPUs without bf16): Z-Image's activations exceed fp16's 65504. Newer ComfyUI replaces inf by +-65504
(`clamp_fp16` on the SwiGLU product and on the attention / feed-forward outputs of comfy/ldm/lumina/model.py), which
keeps the output finite but changes it wherever it acts. Here every branch output goes through a sandwich RMSNorm,
which does not care about scale, so in fp16 the branch is computed 2^-8 smaller (an exact power of two: the input of
its last Linear is scaled) and the norm undoes that in fp32; the norm's output and the residual stream stay fp32.
The result is the fp32-range computation at fp16 precision, not a clamped one. bf16 and fp32 take the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention
from .config import FREQ_EMBED_DIM, SEQ_MULTIPLE, T_EMBED_MID, ZImageConfig
from .host_checkpoint import checkpoint_block
from .offload import wants_checkpoint


FP16_BRANCH_SCALE = 2.0 ** -8  # fp16 branch outputs are computed this much smaller: 256x more headroom


def _branch_scale(dtype: torch.dtype) -> float | None:
    return FP16_BRANCH_SCALE if dtype == torch.float16 else None


class RMSNorm(nn.Module):
    """RMSNorm with fp32 statistics; the normalised value is cast to the weight dtype before the scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x.float() * torch.rsqrt(variance + self.eps)
        return x.to(self.weight.dtype) * self.weight

    def unscaled_fp32(self, x: Tensor, scale: float) -> Tensor:
        """The norm of x / scale (a power of two: exact), computed and returned in fp32 (the fp16 branch path)."""
        x = x.float() / scale
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t * t_scale ([cos, sin], 256 wide) followed by a 256 -> 1024 -> adaln_dim MLP."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, T_EMBED_MID), nn.SiLU(), nn.Linear(T_EMBED_MID, out_dim))

    @staticmethod
    def sinusoid(t: Tensor, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


def rope_cos_sin(positions: Tensor, axes_dims: Sequence[int], theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of the rotary angles for integer positions [..., n_axes] -> two [..., head_dim / 2] fp32 tensors.

    Angles are formed in float64 and rounded to fp32 before cos/sin, as diffusers' precomputed table does; computing
    them on the fly removes the table's 1536/512-position ceiling."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim))
        angles.append(positions[..., axis, None].double() * freqs)
    angle = torch.cat(angles, dim=-1).float()
    return angle.cos(), angle.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, S, H, D] by the angles of cos/sin [B, S, D/2], in fp32.

    Real arithmetic (the pairs read as complex numbers, as diffusers does, but written out): inductor generates no
    code for complex ops, so a complex product would fall back to aten inside a compiled block. Each part is a
    product then an in-place subtract / add (no fused multiply-add, whose single rounding would differ), so eager
    gives the complex product's bits exactly (tests/test_transformer.py) with one half-size temporary at a time."""
    even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, S, H, D/2] each
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, S, 1, D/2]
    real = even * cos
    real -= odd * sin
    imag = even * sin
    imag += odd * cos
    return torch.stack((real, imag), dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.attention_backend = "sdpa"  # zimage_core.attention.set_attention_backend
        head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, qk_norm_eps)
        self.norm_k = RMSNorm(head_dim, qk_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None,
                out_scale: float | None = None) -> Tensor:
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.n_heads, -1)))  # [B, S, H, D]
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.n_heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.n_heads, -1))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, mask, self.attention_backend).flatten(2)
        return self.to_out[0](out if out_scale is None else out * out_scale)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor, out_scale: float | None = None) -> Tensor:
        gate = self.w3(x)
        if out_scale is not None:
            gate = gate * out_scale
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * gate)
        # Sampling: in place, so the widest tensors alive are two [B, S, ffn_dim], not three (85 MB each at 1024²)
        return self.w2(F.silu(self.w1(x), inplace=True).mul_(gate))


class TransformerBlock(nn.Module):
    """Sandwich-norm block. Modulated blocks scale each branch input by (1 + scale) and gate its output by
    tanh(gate), from a bias-only-free adaLN Linear on the timestep embedding (no SiLU in front, no shift)."""

    def __init__(self, cfg: ZImageConfig, modulation: bool):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.qk_norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, adaln: Tensor | None = None):
        s = _branch_scale(self.attention_norm1.weight.dtype)  # fp16: see the module docstring
        if not self.modulation:
            x = x + _post_norm(self.attention_norm2, self.attention(self.attention_norm1(x), rope, mask, s), s)
            return x + _post_norm(self.ffn_norm2, self.feed_forward(self.ffn_norm1(x), s), s)
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.adaLN_modulation(adaln)[:, None].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1.0 + scale_attn), rope, mask, s)
        x = x + gate_attn.tanh() * _post_norm(self.attention_norm2, attn, s)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_ffn), s)
        return x + gate_ffn.tanh() * _post_norm(self.ffn_norm2, ffn, s)


def _post_norm(norm: RMSNorm, branch: Tensor, scale: float | None) -> Tensor:
    return norm(branch) if scale is None else norm.unscaled_fp32(branch, scale)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by 1 + Linear(SiLU(t_emb)), then a projection back to patch values."""

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: Tensor, adaln: Tensor) -> Tensor:
        h = self.norm_final(x) * (1.0 + self.adaLN_modulation(adaln)[:, None])
        return self.linear(h.to(self.linear.weight.dtype))  # an fp32 residual stream (fp16 models) back to fp16


def _pad_len(n: int) -> int:
    return (-n) % SEQ_MULTIPLE


def patchify(latents: Tensor, p: int) -> Tensor:
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]: rows ordered (h', w'), values (ph, pw, c) with c fastest."""
    batch, channels, height, width = latents.shape
    x = latents.reshape(batch, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), p * p * channels)


@dataclass(frozen=True)
class StreamStage:
    """The token stream at the start of a stage of blocks, as a `BlockResiduals` hook sees it.

    name: "noise_refiner" (image tokens only) or "layers" (image tokens, then caption tokens). hidden: the stream
    before the stage's first block [B, S, dim]; rope, mask, adaln: what the stage's blocks are called with;
    img_len: the image tokens (padded to 32 with x_pad_token) at the start of the sequence."""

    name: str
    hidden: Tensor
    rope: tuple[Tensor, Tensor]
    mask: Tensor | None
    adaln: Tensor
    img_len: int


class BlockResiduals(Protocol):
    """A hook that adds residuals to the stream (how a ControlNet's hints enter the transformer): called once at the
    start of each stage, it returns None or a function `residual(i)` giving the tensor to add after block i of that
    stage (or None). The context refiner has no hook: no Z-Image ControlNet writes there."""

    def __call__(self, stage: StreamStage) -> Callable[[int], Tensor | None] | None: ...


class ZImageTransformer(nn.Module):
    """Z-Image DiT in the sigma convention: `model(latents, sigmas, captions)` returns the flow velocity
    `noise - x0` (minus the raw DiT output evaluated at t = 1 - sigma), as the diffusers pipeline uses it.

    latents [B, C, H, W] (H, W multiples of the patch size); sigmas [B] or a scalar in [0, 1], 1 = pure noise;
    captions: a list of B tensors [L_i, cap_feat_dim] (lengths may differ) or one tensor [B, L, cap_feat_dim].
    """

    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = cfg = config
        self.gradient_checkpointing = False
        self.checkpoint_inputs_on_host = False  # checkpointed blocks keep their input in host RAM (host_checkpoint)
        key = f"{cfg.patch_size}-1"  # ModuleDict key of diffusers ("patch-framepatch")
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(cfg.patch_dim, cfg.dim)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(cfg)})
        self.noise_refiner = nn.ModuleList(TransformerBlock(cfg, modulation=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            TransformerBlock(cfg, modulation=False) for _ in range(cfg.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList(TransformerBlock(cfg, modulation=True) for _ in range(cfg.n_layers))

    @property
    def x_embedder(self) -> nn.Linear:
        return self.all_x_embedder[f"{self.config.patch_size}-1"]

    @property
    def final_layer(self) -> FinalLayer:
        return self.all_final_layer[f"{self.config.patch_size}-1"]

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_pad_token.device

    def blocks(self) -> list[TransformerBlock]:
        """Every transformer block, in execution order."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]

    # ------------------------------------------------------------------ input checks
    def _check_inputs(self, latents: Tensor, captions) -> list[Tensor]:
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, H, W], got {list(latents.shape)}")
        h, w = latents.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent height and width must be multiples of {cfg.patch_size} "
                             f"(image sides multiples of {8 * cfg.patch_size} px), got {h}x{w}")
        if isinstance(captions, Tensor):
            if captions.ndim == 2:
                captions = captions[None]
            if captions.ndim != 3:
                raise ValueError(f"captions must be [B, L, {cfg.cap_feat_dim}] or a list of [L, {cfg.cap_feat_dim}], "
                                 f"got a tensor of shape {list(captions.shape)}")
            captions = list(captions.unbind(0))
        captions = list(captions)
        if len(captions) != latents.shape[0]:
            raise ValueError(f"{len(captions)} captions for a batch of {latents.shape[0]} latents")
        for i, cap in enumerate(captions):
            if cap.ndim != 2 or cap.shape[-1] != cfg.cap_feat_dim or cap.shape[0] == 0:
                raise ValueError(f"caption {i} must be [L>0, {cfg.cap_feat_dim}] (the text encoder's feature width), "
                                 f"got {list(cap.shape)}")
        return captions

    # ------------------------------------------------------------------ forward
    def forward(self, latents: Tensor, sigmas: Tensor | float, captions,
                residuals: BlockResiduals | None = None) -> Tensor:
        cfg = self.config
        captions = self._check_inputs(latents, captions)
        batch, _, height, width = latents.shape
        device, dtype, p = self.device, self.dtype, cfg.patch_size
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=device).reshape(-1).expand(batch)

        adaln = self.t_embedder((1.0 - sigmas) * cfg.t_scale).to(dtype)  # [B, adaln_dim]

        gh, gw = height // p, width // p
        n_img = gh * gw
        img_len = n_img + _pad_len(n_img)
        x = self.x_embedder(patchify(latents.to(device, dtype), p))
        x = torch.cat([x, self.x_pad_token.expand(batch, img_len - n_img, -1).to(dtype)], dim=1)

        # Caption tokens: each padded to a multiple of 32 with cap_pad_token, then to the batch maximum.
        cap_lens = [c.shape[0] + _pad_len(c.shape[0]) for c in captions]
        cap_max = max(cap_lens)
        cap = torch.cat([c.to(device, dtype) for c in captions], dim=0)
        cap = self.cap_embedder(cap).split([c.shape[0] for c in captions])
        cap = torch.stack([
            torch.cat([c, self.cap_pad_token.to(dtype).expand(cap_max - c.shape[0], -1)]) for c in cap])

        # Positions (axis 0 = sequence, axes 1/2 = patch row/col): captions 1..L_pad, image (L_pad + 1, h', w'),
        # image padding (0, 0, 0). Batch padding beyond a caption's own length is masked out.
        cap_pos = torch.zeros(cap_max, 3, dtype=torch.long, device=device)
        cap_pos[:, 0] = torch.arange(1, cap_max + 1, device=device)
        rows = torch.arange(gh, device=device).repeat_interleave(gw)
        cols = torch.arange(gw, device=device).repeat(gh)
        img_pos = torch.zeros(batch, img_len, 3, dtype=torch.long, device=device)
        img_pos[:, :n_img, 0] = torch.tensor(cap_lens, device=device)[:, None] + 1
        img_pos[:, :n_img, 1], img_pos[:, :n_img, 2] = rows, cols

        img_rope = rope_cos_sin(img_pos, cfg.axes_dims, cfg.rope_theta)
        cap_rope = rope_cos_sin(cap_pos[None].expand(batch, -1, -1), cfg.axes_dims, cfg.rope_theta)
        equal = all(n == cap_max for n in cap_lens)
        cap_mask = None if equal else self._key_mask([n for n in cap_lens], cap_max)
        seq_mask = None if equal else self._key_mask([img_len + n for n in cap_lens], img_len + cap_max)

        x = self._stage("noise_refiner", x, img_rope, None, adaln, img_len, residuals)
        for block in self.context_refiner:
            cap = self._run(block, cap, cap_rope, cap_mask)

        h = torch.cat([x, cap], dim=1)
        del x, cap  # held here they would stay alive through all 30 layers (30 MB at 1024²)
        rope = tuple(torch.cat([a, b], dim=1) for a, b in zip(img_rope, cap_rope))
        h = self._stage("layers", h, rope, seq_mask, adaln, img_len, residuals)
        out = self.final_layer(h[:, :n_img], adaln)  # [B, N, p*p*C]

        out = out.reshape(batch, gh, gw, p, p, cfg.in_channels).permute(0, 5, 1, 3, 2, 4)
        return -out.reshape(batch, cfg.in_channels, height, width).to(latents.dtype)

    @staticmethod
    def _key_mask(lengths: list[int], total: int) -> Tensor:
        keep = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
        return keep[:, None, None, :]  # [B, 1, 1, S] for SDPA; True = attend

    def _stage(self, name: str, h: Tensor, rope, mask, adaln, img_len: int, residuals: BlockResiduals | None):
        """Run the modulated blocks of one stage, adding the hook's residual after each block that has one."""
        add = residuals(StreamStage(name, h, rope, mask, adaln, img_len)) if residuals is not None else None
        for i, block in enumerate(getattr(self, name)):
            h = self._run(block, h, rope, mask, adaln)
            if add is not None and (residual := add(i)) is not None:
                h = h + residual
        return h

    def _run(self, block, x, rope, mask, adaln=None):
        if mask is not None:
            mask = mask.to(x.device)
        if torch.is_grad_enabled() and (self.gradient_checkpointing or wants_checkpoint(self)):
            return checkpoint_block(block, x, rope, mask, adaln, host_inputs=self.checkpoint_inputs_on_host)
        return block(x, rope, mask, adaln)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
