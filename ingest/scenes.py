"""Procedural clips where only part of the scene changes, with the ground truth of what changed.

A textured background stays still; a few textured objects slide across it and a few small patches
flicker. Everything else is static, so the pixels that change between frames are known exactly. A scene
may add a camera pan or a flicker of the whole frame's light (SceneSpec): the pixels then change
everywhere, while the ground truth stays what changes in the scene itself. Used to measure whether a token priority finds what changes (bench/tokenizer_priority.py,
tests/test_tokenizer_priority.py). Deterministic from a seed.

    clip = moving_objects_clip(seed=3, num_frames=16, size=64)
    clip.video    # (T, H, W, 3) uint8
    clip.changed  # (T, H, W) bool: pixel differs from the frame before (frame 0: False)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SceneSpec:
    """How busy a scene is. Sizes are fractions of the frame side; speeds in frame sides per clip."""

    num_objects: tuple[int, int] = (1, 2)  # inclusive range
    object_size: tuple[float, float] = (0.14, 0.22)
    speed: tuple[float, float] = (0.3, 0.7)  # distance travelled over the whole clip
    num_flickers: tuple[int, int] = (0, 1)
    flicker_size: tuple[float, float] = (0.08, 0.14)
    # How far an object's colours are pulled towards a saturated colour of its own (0: the same texture
    # statistics as the background; moving things in real scenes tend to differ from what is behind them).
    object_tint: float = 0.0
    # The camera pans this many frame sides to the right over the clip: the background slides under the
    # objects, which keep their own motion in the frame.
    camera_pan: float = 0.0
    # The whole frame's brightness flickers by up to this share (lighting), a few frames a period.
    light_flicker: float = 0.0


@dataclass
class SynthClip:
    video: np.ndarray  # (T, H, W, 3) uint8
    # (T, H, W) bool: what changes in the scene (objects, flickering patches) from the frame before, as a
    # still camera under steady light would see it: a pan or a lighting flicker is not a change of scene.
    changed: np.ndarray


def texture(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """(h, w, 3) float in [0, 1]: colour noise smoothed at a few scales, plus a grating. Every patch of
    it has detail (it cannot be rebuilt from a flat colour), and it does not repeat."""
    out = np.zeros((h, w, 3))
    for cells, weight in ((4, 0.5), (8, 0.3), (16, 0.2)):
        n = max(2, round(cells * scale))
        coarse = rng.random((n + 1, n + 1, 3))
        ys, xs = np.linspace(0, n, h), np.linspace(0, n, w)
        y0, x0 = np.minimum(ys.astype(int), n - 1), np.minimum(xs.astype(int), n - 1)
        fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
        c = coarse
        top = c[y0][:, x0] * (1 - fx) + c[y0][:, x0 + 1] * fx
        bot = c[y0 + 1][:, x0] * (1 - fx) + c[y0 + 1][:, x0 + 1] * fx
        out += weight * (top * (1 - fy) + bot * fy)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 8) / max(h, w) * 2 * np.pi
    yy, xx = np.mgrid[0:h, 0:w]
    grating = 0.5 + 0.5 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    return np.clip(0.75 * out + 0.25 * grating[..., None] * rng.random(3), 0, 1)


_texture = texture  # the old private name


def bounce_path(start: np.ndarray, step: np.ndarray, num_frames: int, span: int) -> np.ndarray:
    """(T, 2) int top-left corners (y, x) of a square moving `step` pixels a frame from `start` and
    bouncing off the edges: the position folds back into [0, span] (span = frame side - square side)."""
    pos = start[None, :] + step[None, :] * np.arange(num_frames)[:, None]
    pos = np.abs((pos + span) % (2 * span) - span) if span > 0 else np.zeros((num_frames, 2))
    return np.round(pos).astype(int)


def moving_objects_clip(
    seed: int, num_frames: int = 16, size: int = 64, scene: SceneSpec | None = None
) -> SynthClip:
    """One clip: a still textured background, moving textured squares, flickering patches."""
    scene = scene or SceneSpec()
    rng = np.random.default_rng(seed)
    pan = round(scene.camera_pan * size)
    background = texture(rng, size, size + pan, 1.0)
    # Rendered twice: as the camera sees it (`frames`), and still and steadily lit (`scene_frames`, whose
    # changes are the ground truth). Without a pan or a lighting flicker the two are the same.
    offsets = np.round(np.linspace(0, pan, num_frames)).astype(int)
    frames = np.stack([background[:, o : o + size] for o in offsets])  # (T, H, W, 3)
    scene_frames = np.repeat(background[None, :, :size], num_frames, axis=0)

    for _ in range(rng.integers(scene.num_flickers[0], scene.num_flickers[1] + 1)):
        side = max(2, round(rng.uniform(*scene.flicker_size) * size))
        y, x = rng.integers(0, size - side + 1, size=2)
        period = rng.uniform(3, 8)  # frames
        gain = 1 + 0.6 * np.sin(2 * np.pi * np.arange(num_frames) / period + rng.uniform(0, 2 * np.pi))
        for f in (frames, scene_frames):
            f[:, y : y + side, x : x + side] *= gain[:, None, None, None]

    for _ in range(rng.integers(scene.num_objects[0], scene.num_objects[1] + 1)):
        side = max(2, round(rng.uniform(*scene.object_size) * size))
        tex = texture(rng, side, side, side / size)
        tint = rng.integers(0, 2, size=3).astype(float)  # a corner of the RGB cube
        tex = (1 - scene.object_tint) * tex + scene.object_tint * tint
        angle = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(*scene.speed) * size
        start = rng.uniform(0, size - side, size=2)
        step = np.array([np.sin(angle), np.cos(angle)]) * dist / max(1, num_frames - 1)
        for f, (y, x) in enumerate(bounce_path(start, step, num_frames, size - side)):
            frames[f, y : y + side, x : x + side] = tex
            scene_frames[f, y : y + side, x : x + side] = tex

    if scene.light_flicker:
        period, phase = rng.uniform(3, 8), rng.uniform(0, 2 * np.pi)
        light = 1 + scene.light_flicker * np.sin(2 * np.pi * np.arange(num_frames) / period + phase)
        frames = frames * light[:, None, None, None]
    video = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    still = (np.clip(scene_frames, 0, 1) * 255).round().astype(np.uint8)
    changed = np.zeros(video.shape[:3], dtype=bool)
    changed[1:] = (still[1:] != still[:-1]).any(-1)
    return SynthClip(video, changed)


def token_change(changed: np.ndarray, tubelet: int, patch: int, min_share: float = 0.05) -> np.ndarray:
    """(T, H, W) changed pixels -> (T', H', W') bool: tokens where at least `min_share` of the tubelet's
    pixels differ from the frame before (for its first frame: the last frame of the previous tubelet)."""
    t, h, w = changed.shape
    share = changed.reshape(t // tubelet, tubelet, h // patch, patch, w // patch, patch).mean((1, 3, 5))
    return share >= min_share
