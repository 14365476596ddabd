"""Batches of procedural clips (ingest.scenes) as model input, with their changing tokens."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ingest.scenes import SceneSpec, moving_objects_clip, token_change
from lvmae.config import VideoSpec

# The scene the priority benchmark and test use: tinted objects (see docs/tokenizer.md).
SCENE = SceneSpec(object_tint=0.5)


def clip_batch(
    seeds: Iterable[int], video: VideoSpec, scene: SceneSpec = SCENE
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> clips (N, 3, T, H, W) float in [0, 1], changing tokens (N, T', H', W') bool."""
    clips, regions = [], []
    for seed in seeds:
        c = moving_objects_clip(seed, video.num_frames, video.img_size, scene)
        clips.append(torch.from_numpy(c.video).permute(3, 0, 1, 2).float() / 255)
        regions.append(torch.from_numpy(token_change(c.changed, video.tubelet_size, video.patch_size)))
    return torch.stack(clips), torch.stack(regions)
