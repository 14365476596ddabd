"""`lvmae info`: versions, whether CUDA and DALI are usable here, and the model presets."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
from typing import Any

DISTRIBUTIONS = (
    "torch",
    "deepspeed",
    "nvidia-dali-cuda120",
    "webdataset",
    "zarr",
    "fsspec",
    "s3fs",
    "omegaconf",
    "prometheus-client",
    "av",
    "safetensors",
    "numpy",
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_status() -> str:
    """Whether DALI imports and runs a CPU pipeline here (GPU decode also needs CUDA)."""
    try:
        import numpy as np
        from nvidia.dali import fn, pipeline_def
    except Exception as err:  # import failures vary by platform: report, don't crash
        return f"unavailable ({type(err).__name__}: {err})"
    try:

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def probe():
            return fn.external_source(source=lambda: [np.arange(4, dtype=np.uint8)], batch=True) + 1

        pipe = probe()
        pipe.build()
        (out,) = pipe.run()
        ok = int(np.asarray(out.as_array()).sum()) == 10
        return "usable (CPU pipeline ran)" if ok else "imported, but a CPU pipeline gave a wrong result"
    except Exception as err:
        return f"imported, but a CPU pipeline failed ({type(err).__name__}: {err})"


def preset_table() -> list[dict[str, object]]:
    """Sizes and parameter counts of every preset (built on the meta device: no memory used)."""
    import torch

    from lvmae.config import MODEL_PRESETS
    from lvmae.mae import MaskedVideoAutoencoder
    from lvmae.presets import preset_config

    rows = []
    for name in MODEL_PRESETS:
        cfg = preset_config(name)
        with torch.device("meta"):
            model = MaskedVideoAutoencoder(cfg)
        n_enc = sum(p.numel() for p in model.encoder.parameters())
        n_all = sum(p.numel() for p in model.parameters())
        e, d = cfg.encoder, cfg.decoder
        rows.append(
            {
                "preset": name,
                "encoder": f"{e.embed_dim}/{e.depth}/{e.num_heads}",
                "decoder": f"{d.embed_dim}/{d.depth}/{d.num_heads}",
                "encoder_params_m": round(n_enc / 1e6, 1),
                "total_params_m": round(n_all / 1e6, 1),
            }
        )
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import lvmae

    info: dict[str, object] = {
        "lvmae": lvmae.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {d: _version(d) for d in DISTRIBUTIONS},
        "cuda": {
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        },
        "dali": _dali_status(),
        "presets": preset_table(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"lvmae {info['lvmae']}  (Python {info['python']}, {info['platform']})")
    print("packages:")
    for dist, ver in info["packages"].items():  # type: ignore[union-attr]
        print(f"  {dist:<22} {ver or 'NOT INSTALLED'}")
    cuda = info["cuda"]
    devices = ", ".join(cuda["devices"]) or "none"  # type: ignore[index]
    print(f"CUDA: {'available' if cuda['available'] else 'not available'} (devices: {devices})")  # type: ignore[index]
    print(f"DALI: {info['dali']}")
    print("model presets (encoder and decoder as width/depth/heads; parameters in millions):")
    print(f"  {'preset':<7} {'encoder':<12} {'decoder':<10} {'enc M':>7} {'total M':>8}")
    for row in info["presets"]:  # type: ignore[union-attr]
        print(
            f"  {row['preset']:<7} {row['encoder']:<12} {row['decoder']:<10} "
            f"{row['encoder_params_m']:>7} {row['total_params_m']:>8}"
        )
    return 0


def add_parser(sub: Any) -> None:
    info = sub.add_parser("info", help="versions, CUDA and DALI status, model presets")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)
