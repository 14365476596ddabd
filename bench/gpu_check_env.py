"""bench/gpu_check.py's `env` section: torch, CUDA, the device, bf16, a matmul's rate, package versions."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fig1_memory import machine_info
from gpu_check_common import Clock, Context, sync

PACKAGES = (
    "torch",
    "numpy",
    "deepspeed",
    "pydantic",
    "omegaconf",
    "webdataset",
    "zarr",
    "numcodecs",
    "fsspec",
    "av",
    "safetensors",
    "prometheus-client",
    "botocore",
    "nvidia-dali-cuda120",
)


def package_versions() -> dict[str, dict[str, str | None]]:
    """Each package's version and where Python imports it from (a carried wheel lands in /tmp/site)."""
    out = {}
    modules = {"prometheus-client": "prometheus_client", "nvidia-dali-cuda120": "nvidia.dali"}
    for dist in PACKAGES:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        try:
            spec = importlib.util.find_spec(modules.get(dist, dist))
        except ModuleNotFoundError:
            spec = None
        origin = spec.origin if spec is not None else None
        out[dist] = {"version": version, "from": str(Path(origin).parent) if origin else None}
    return out


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, reps: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (mean of `reps` after 3 warm-ups)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, dtype=dtype, generator=gen)
    b = torch.randn((n, n), device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def section_env(rec: dict[str, Any], clock: Clock, ctx: Context) -> None:
    dev = ctx.device
    rec.update(
        python=sys.version.split()[0],
        executable=sys.executable,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cuda_available=torch.cuda.is_available(),
        device=dev.type,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
    )
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        rec.update(
            device_name=props.name,
            device_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    else:
        rec.update(device_name=machine_info(dev)["device_name"], bf16_supported=None)
    # bf16 usable: a real bf16 matmul runs and agrees with float32 to bf16's precision
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn((256, 256), generator=gen), torch.randn((256, 256), generator=gen)
    ref = a @ b
    got = (a.to(dev, torch.bfloat16) @ b.to(dev, torch.bfloat16)).float().cpu()
    rel = float((got - ref).norm() / ref.norm())
    rec.update(
        bf16_matmul_rel_error=round(rel, 5), bf16_matmul_ok=bool(torch.isfinite(got).all()) and rel < 0.02
    )
    dtype = torch.bfloat16 if ctx.settings.bf16 else torch.float32
    n = ctx.settings.matmul_n
    rate = matmul_rate(dev, n, dtype, reps=10 if dev.type == "cuda" else 3)
    rec["matmul"] = {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "tflops_per_s": round(rate / 1e12, 2),
    }
    rec["packages"] = package_versions()
    dali = rec["packages"]["nvidia-dali-cuda120"]["version"]
    rec["decoder_used"] = "pyav"
    rec["dali"] = (
        "absent (its wheel is too large to carry to this machine): clips are decoded with PyAV "
        "(data.decoder=pyav), on the CPU"
        if dali is None
        else f"{dali} installed, not used: the check decodes with PyAV (data.decoder=pyav), as on a "
        "machine that cannot take DALI's wheel"
    )
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    rec["deepspeed_accelerator"] = get_accelerator()._name
    rec["deepspeed"] = deepspeed.__version__
