import itertools
from dataclasses import replace

import pytest

from ingest.clip_plan import (
    VideoInfo,
    clip_span,
    clip_starts,
    frame_indices,
    group_into_shards,
    plan_clips,
    plan_digest,
    sample_key,
    sampled_frames,
    sampling_step,
    shards_of_node,
)


def test_clip_starts_fit_inside_the_video():
    assert clip_starts(132, 32, 1.0, 32) == [0, 32, 64, 96]  # 96 + 31 = 127 < 132; 128 + 31 too far
    assert clip_starts(128, 32, 1.0, 32) == [0, 32, 64, 96]
    assert clip_starts(127, 32, 1.0, 32) == [0, 32, 64]
    assert clip_starts(31, 32, 1.0, 32) == []
    assert clip_starts(64, 32, 1.0, 16) == [0, 16, 32]  # overlapping clips


def test_a_video_shorter_than_a_clip_span_has_no_clip():
    assert (clip_span(32, 1.0), clip_span(16, 2.0), clip_span(16, 2.5)) == (32, 31, 39)
    assert [sampled_frames(n, 16, 2.0) for n in (20, 30, 31, 99)] == [10, 15, 16, 16]
    for total, frames, step in itertools.product(range(0, 80, 3), (4, 16), (1.0, 1.5, 2.0, 2.5)):
        short = total < clip_span(frames, step)
        assert short == (not clip_starts(total, frames, step, frames)), (total, frames, step)
        assert short == (sampled_frames(total, frames, step) < frames), (total, frames, step)


def test_frame_stride_and_target_fps():
    assert frame_indices(10, 4, 2.0) == [10, 12, 14, 16]
    assert sampling_step(30.0, 15.0, 1) == 2.0
    assert sampling_step(25.0, 50.0, 1) == 1.0  # never duplicate frames
    assert sampling_step(25.0, None, 3) == 3.0
    # 29.97 -> 12 fps: the sampled frames are strictly increasing and evenly spread.
    idx = frame_indices(0, 12, sampling_step(30000 / 1001, 12.0, 1))
    assert all(b > a for a, b in itertools.pairwise(idx))
    assert idx[-1] == round(11 * 30000 / 1001 / 12)
    # with step 2, 32 frames span 63 source frames; clips start every 32 output = 64 source frames
    assert clip_starts(200, 32, 2.0, 32) == [0, 64, 128]


def test_keys_are_stable_unique_and_dot_free():
    a, b = sample_key("s3://b/v.mp4", 0), sample_key("s3://b/v.mp4", 32)
    assert a != b and a == sample_key("s3://b/v.mp4", 0)
    assert "." not in a and sample_key("/x/v.mp4", 0) != a


def test_plan_is_deterministic_and_shards_cover_every_clip_once():
    videos = [VideoInfo(f"/v/{i}.mp4", 100 + 37 * i, 25.0, 640, 360) for i in range(7)]
    clips = plan_clips(videos, 16, None, 1, 16)
    assert clips == plan_clips(list(videos), 16, None, 1, 16)
    shards = group_into_shards(clips, 5)
    assert [c for s in shards for c in s] == clips and all(len(s) == 5 for s in shards[:-1])
    nodes = [shards_of_node(len(shards), 3, r) for r in range(3)]
    assert sorted(k for n in nodes for k in n) == list(range(len(shards)))
    spec = {"frames": 16}
    assert plan_digest(shards, spec) == plan_digest(group_into_shards(clips, 5), spec)
    assert plan_digest(shards, spec) != plan_digest(group_into_shards(clips, 4), spec)
    with pytest.raises(ValueError):
        shards_of_node(4, 2, 2)


def test_a_rate_varies_only_past_a_tick_and_two_percent():
    from ingest.probe import _is_variable

    assert not _is_variable([0, 33, 67, 100, 133, 167])  # 30 fps on a 1/1000 time base: 33/34 ms jitter
    assert not _is_variable([i * 3003 for i in range(10)])  # 29.97 on 1/90000
    assert _is_variable([0, 100, 200, 220, 240, 260, 360])  # 10 fps, then 50, then 10
    assert _is_variable([0, 40, 80, 160, 200])  # one dropped frame: the frame before is shown twice as long


def test_windows_and_time_sampling():
    from ingest.clip_plan import Segment, clips_of, frame_window, time_samples

    v = VideoInfo("/v/a.mp4", 100, 25.0, 64, 48)
    assert frame_window(v) == (0, 100)
    assert frame_window(replace(v, segment=Segment(0.5, 1.9))) == (
        13,
        48,
    )  # frames whose time is in [0.5, 1.9)
    assert frame_window(replace(v, segment=Segment(10, None, "frame"))) == (10, 100)
    seg = clips_of(replace(v, segment=Segment(0.5, 1.9)), 8, None, 1, 8)
    whole = clips_of(v, 8, None, 1, 8)
    assert [c.start for c in seg] == [13, 21, 29, 37] and {c.key for c in seg}.isdisjoint(
        {c.key for c in whole}
    )
    # variable rate: 10 fps for 1 s, then 50 fps: the frame shown at each output time
    times = tuple([i / 10 for i in range(10)] + [1 + i / 50 for i in range(50)])
    vfr = VideoInfo("/v/b.mp4", len(times), (len(times) - 1) / times[-1], 64, 48, frame_times=times)
    (t0, idx), *_ = time_samples(vfr, 4, 20.0, 4)
    assert t0 == 0 and idx == [0, 0, 1, 1]  # 0, 0.05, 0.1, 0.15 s: each 10 fps frame shown twice
    clips = clips_of(vfr, 4, 20.0, 1, 4)
    assert clips[5].indices == (10, 12, 15, 17) and clips[5].start_seconds == 1.0 and clips[5].out_fps == 20.0
