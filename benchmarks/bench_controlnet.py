"""A ControlNet forward (transformer + Fun ControlNet) of zimage_core vs diffusers' ZImageControlNetModel +
ZImageTransformer2DModel, on the same weights and inputs.

CPU, fp32, the mid-size config of bench_transformer.py (dim 768, 8 layers, 64x64 latent = 1024 image tokens,
77-token caption) with a Union 2.1-layout ControlNet of 4 control layers (the released 15 of 30, scaled) and its 2
refiner blocks, or `--release 1.0` (2 control layers and the plain refiner). Time: both in one process, calls
alternated, median of N; also each side's plain forward, so the overhead of the control is visible. Memory: each side
in a fresh process, peak RSS above the RSS after building (activation and workspace memory of one forward).
diffusers' loop is run as shipped (its ControlNet re-runs the noise and context refiners itself, and it keeps every
hint until the transformer runs); zimage_core computes each hint inside the transformer's forward just before use.
Usage: .venv/bin/python benchmarks/bench_controlnet.py [--repeats 10] [--threads 2] [--release 2.1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_transformer import CONFIG, inputs  # noqa: E402
from common import RssPeak, median, peak_rss_mib, run_worker, timed  # noqa: E402

from zimage_core import ZImageTransformer  # noqa: E402
from zimage_core.controlnet import control_residuals  # noqa: E402
from zimage_core.testing import init_random_, tiny_controlnet  # noqa: E402
import zimage_core as zc  # noqa: E402


def build(which: str, release: str):
    model = init_random_(ZImageTransformer(CONFIG), seed=0).eval()
    net = tiny_controlnet(release, seed=1, base=CONFIG, n_control_layers=4 if release != "1.0" else 2)
    if which == "ours":
        return model, net
    from reference import diffusers_controlnet_twin, diffusers_twin

    ref = diffusers_twin(model)
    cn = diffusers_controlnet_twin(net, ref)
    del model, net
    return ref, cn


def control_latent():
    return torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(1))


def call(which, models, latents, sigmas, captions, control, with_control=True):
    model, net = models
    with torch.no_grad():
        if which == "ours":
            if not with_control:
                return model(latents, sigmas, captions)
            ctl = zc.ControlInput(net, control, strength=0.9)
            return model(latents, sigmas, captions, residuals=control_residuals(model, [ctl]))
        x, t = [latents[0, :, None]], 1.0 - sigmas
        hints = None
        if with_control:
            context = _context(net, control)
            hints = net(x, t, captions, [context[0][:, None]], conditioning_scale=0.9)
        return -model(x, t, captions, controlnet_block_samples=hints, return_dict=False)[0][0][:, 0][None]


def _context(cn, control):
    """diffusers' pipeline input: the control latent, zero-padded to control_in_dim."""
    extra = cn.config.control_in_dim - control.shape[1]
    return torch.cat([control, torch.zeros(control.shape[0], extra, *control.shape[2:])], dim=1) if extra else control


def worker(which: str, release: str, threads: int):
    torch.set_num_threads(threads)
    models = build(which, release)
    data = (*inputs(), control_latent())
    with RssPeak() as first:
        call(which, models, *data)
    print(json.dumps({"which": which, "forward_peak_mib": first.delta_mib, "total_peak_mib": peak_rss_mib()}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--release", default="2.1", choices=["1.0", "2.1"])
    parser.add_argument("--worker", nargs="?")
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest[0], int(rest[1]))
    torch.set_num_threads(args.threads)
    ours, ref = build("ours", args.release), build("diffusers", args.release)
    data = (*inputs(), control_latent())
    diff = (call("ours", ours, *data) - call("diffusers", ref, *data)).abs().max().item()
    times = {key: [] for key in ("ours", "diffusers", "ours plain", "diffusers plain")}
    for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
        times["ours"] += timed(lambda: call("ours", ours, *data), 1)
        times["diffusers"] += timed(lambda: call("diffusers", ref, *data), 1)
        times["ours plain"] += timed(lambda: call("ours", ours, *data, with_control=False), 1)
        times["diffusers plain"] += timed(lambda: call("diffusers", ref, *data, with_control=False), 1)
    del ours, ref
    mem = {w: run_worker(Path(__file__), w, args.release, str(args.threads)) for w in ("ours", "diffusers")}
    t = {k: median(v) * 1e3 for k, v in times.items()}
    print(f"config: dim {CONFIG.dim}, {CONFIG.n_layers} layers, 64x64 latent, Union {args.release} layout, fp32 CPU, "
          f"{args.threads} threads; max|ours - diffusers| = {diff:.2e} (2.1: diffusers as shipped drops the refiner "
          f"hints from the transformer, see zimage_core/controlnet.py)")
    print(f"control forward time   ours {t['ours']:8.1f} ms   diffusers {t['diffusers']:8.1f} ms   "
          f"ratio {t['ours'] / t['diffusers']:.3f}")
    print(f"  overhead of the control: ours +{t['ours'] - t['ours plain']:.1f} ms over {t['ours plain']:.1f} ms, "
          f"diffusers +{t['diffusers'] - t['diffusers plain']:.1f} ms over {t['diffusers plain']:.1f} ms")
    m_ours, m_ref = mem["ours"]["forward_peak_mib"], mem["diffusers"]["forward_peak_mib"]
    print(f"control forward memory ours {m_ours:8.1f} MiB  diffusers {m_ref:8.1f} MiB  "
          f"ratio {m_ours / max(m_ref, 1e-9):.3f}   (process peak {mem['ours']['total_peak_mib']:.0f} vs "
          f"{mem['diffusers']['total_peak_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
