"""Named model sizes: configs built from the one table of them (lvmae.config.MODEL_PRESETS).

    cfg = preset_config("base", num_frames=128)   # ViT-B, 128 x 224 x 224, sizes filled in

Encoder sizes are VideoMAE's (ViT-S/B/L/H); decoders are 4 blocks, narrower than the encoder, as in
VideoMAE. `tiny` trains on a laptop CPU in seconds and is what tests and the demo use.
"""

from __future__ import annotations

from dataclasses import fields

from lvmae.config import MODEL_PRESETS, MAEConfig

__all__ = ["MODEL_PRESETS", "preset_config"]


def preset_config(name: str, **video: int) -> MAEConfig:
    """A resolved MAEConfig for a preset; keyword arguments set VideoSpec fields (num_frames=128, ...).

    Not validated here (masking may still be adjusted for small grids): the model validates on build.
    """
    cfg = MAEConfig(preset=name)
    valid = {f.name for f in fields(cfg.video)}
    for key, value in video.items():
        if key not in valid:
            raise TypeError(f"unknown VideoSpec field {key!r}")
        setattr(cfg.video, key, value)
    return cfg.resolved()
