"""ingest.scenes: procedural clips whose changing part is known, including under a camera pan and a
flickering light (bench/priority_families.py)."""

import numpy as np

from ingest.scenes import SceneSpec, moving_objects_clip


def pixel_change(video: np.ndarray) -> np.ndarray:
    out = np.zeros(video.shape[:3], dtype=bool)
    out[1:] = (video[1:] != video[:-1]).any(-1)
    return out


def test_a_still_scene_changes_where_its_pixels_change():
    clip = moving_objects_clip(3, 16, 64, SceneSpec(object_tint=0.5))
    assert np.array_equal(clip.changed, pixel_change(clip.video))
    assert 0.02 < clip.changed.mean() < 0.5  # objects move over a still background


def test_a_pan_or_a_flickering_light_moves_every_pixel_but_not_the_scene():
    still = moving_objects_clip(3, 16, 64, SceneSpec(object_tint=0.5))
    for spec in (SceneSpec(object_tint=0.5, camera_pan=0.5), SceneSpec(object_tint=0.5, light_flicker=0.25)):
        clip = moving_objects_clip(3, 16, 64, spec)
        assert pixel_change(clip.video)[1:].mean() > 0.9  # nearly every pixel differs from the frame before
        assert np.array_equal(clip.changed, still.changed)  # what changes in the scene is the same
        assert not np.array_equal(clip.video, still.video)


def test_the_pan_slides_the_background():
    clip = moving_objects_clip(3, 16, 64, SceneSpec(num_objects=(0, 0), num_flickers=(0, 0), camera_pan=0.5))
    v = clip.video.astype(int)
    # With nothing moving in the scene, frame 15 is frame 0 shifted left by the 32 px panned.
    assert np.abs(v[15, :, :32] - v[0, :, 32:]).max() <= 1
    assert not clip.changed.any()
