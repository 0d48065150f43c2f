"""Helpers shared by the benchmark scripts: peak-RSS of a child process, medians, table printing, and diffusers' model
as a velocity function."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: Path, *args: str) -> dict:
    """Run `script --worker args...` in a fresh interpreter; it prints one JSON line. Adds its peak RSS (MiB)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # A fixed glibc mmap threshold: freed buffers go back to the OS at once, so RSS follows live memory and both
    # sides of a comparison are measured alike (glibc's adaptive threshold otherwise keeps some in its heap).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    code = ("import resource, runpy, sys, json; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(script), "--worker", *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RssPeak:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread (MiB)."""

    def __enter__(self):
        import gc
        import threading

        import psutil

        gc.collect()
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self.delta_mib = (self.peak - self.start) / 2**20


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values) -> float:
    return statistics.median(values)


class DiffusersVelocity:
    """diffusers' ZImageTransformer2DModel as a zimage_core velocity model: (latents [B, C, H, W], sigmas [B] or a
    scalar, captions) -> v = -output at t = 1 - sigma, on the latents' device, computed in `dtype`."""

    def __init__(self, ref, dtype=None):
        import torch

        self.ref, self.dtype = ref, dtype or torch.bfloat16

    def __call__(self, latents, sigmas, captions):
        import torch

        x = latents.to(self.dtype)
        t = 1.0 - torch.as_tensor(sigmas, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        caps = [c.to(x.device, self.dtype) for c in captions]
        out = self.ref([xi[:, None] for xi in x], t, caps, return_dict=False)[0]
        return -torch.stack([o[:, 0] for o in out]).to(latents.dtype)
