"""Resuming on another number of ranks (train.elastic, train.lanes, ClipLoader.reshard): the global batch is
kept, and the rest of the epoch is cut so that no sample is repeated or skipped and each step's global
batch holds the samples it would have held. Loader-level here; tests/test_train_elastic.py trains."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_loader import all_keys, dataset  # noqa: F401 (module fixtures: 30 real clips in 8 shards)

from lvmae.errors import UserError
from train.elastic import batch_plan
from train.lanes import Lane, interleave, lane_samples, split
from train.loader import ClipLoader
from train.stream import LoaderError

# ---- lanes: arithmetic on plain lists -----------------------------------------------------------------


def picked(lane: Lane, n: int = 40) -> list[int]:
    return list(lane_samples(range(n), lane, lambda item: True))


def test_a_lane_split_in_two_gives_each_index_once_and_keeps_each_step_together():
    whole = Lane(stream=0, start=0, period=4, lo=0, hi=4, end=20)
    a, b = (share[0] for share in split([whole], 2))
    assert (a.lo, a.hi, b.lo, b.hi) == (0, 2, 2, 4)
    got_a, got_b = picked(a), picked(b)
    assert sorted(got_a + got_b) == list(range(20))
    assert got_a[:4] == [0, 1, 4, 5] and got_b[:4] == [2, 3, 6, 7]  # step j: 4j..4j+3, shared out
    assert [a.index(t) for t in range(len(got_a))] == got_a and a.picks() == len(got_a) == 10


def test_lanes_advanced_and_cut_again_cover_the_rest_exactly_once():
    """Old rank 0 took 3 of its lane, old rank 1 took 5; merged onto one rank, then spread over three."""
    a, b = (share[0] for share in split([Lane(0, 2, 6, 0, 6, end=30)], 2))
    rest_a, rest_b = a.advance(3), b.advance(5)
    assert picked(rest_a) == picked(a)[3:] and picked(rest_b) == picked(b)[5:]
    (one,) = split([rest_a, rest_b], 1)
    three = split(one, 3)
    got = [j for share in three for lane in share for j in picked(lane)]
    assert Counter(got) == Counter(picked(rest_a) + picked(rest_b))  # nothing lost, nothing twice
    assert [sum(lane.width for lane in share) for share in three] == [2, 2, 2]
    with pytest.raises(ValueError, match="global batch of 6 cannot be split over 4 ranks"):
        split(one, 4)


def test_interleave_counts_what_each_source_gave():
    taken = [0, 0]
    out = list(interleave([iter("abc"), iter("wxyz")], [1, 2], taken))
    assert out == ["a", "w", "x", "b", "y", "z", "c"] and taken == [3, 4]


def test_the_batch_plan_keeps_the_global_batch_without_growing_the_micro_batch():
    assert batch_plan(4, 1, 2) == (2, 2)  # 2 ranks x 2 -> 1 rank: accumulate
    assert batch_plan(2, 2, 2) == (1, 1)  # 1 rank x 2 -> 2 ranks: a smaller micro batch
    assert batch_plan(12, 2, 4) == (3, 2)  # the largest micro batch <= 4 that divides 6
    with pytest.raises(UserError, match=r"global batch of 4 clips cannot be split over 3 ranks.*\(1, 2, 4\)"):
        batch_plan(4, 3, 2)


# ---- the loader across a change of world size (real clips) --------------------------------------------


def loaders(ds, world: int, batch: int, accum: int) -> list[ClipLoader]:
    out = []
    for rank in range(world):
        loader = ClipLoader(
            str(ds), batch, decoder="pyav", rank=rank, world_size=world, seed=3, shuffle_buffer=8
        )
        loader.step_batches = accum
        out.append(loader)
    return out


def run_steps(ranks: list[ClipLoader], steps: int, accum: int, its=None) -> tuple[list, list, list]:
    """`steps` optimizer steps: each rank draws `accum` batches a step. -> (global batch per step, as
    (epoch, sorted keys); every rank's state after the last step; the iterators, to go on)."""
    its = its or [iter(loader) for loader in ranks]
    got, states = [], [None] * len(ranks)
    for _ in range(steps):
        keys, epoch = [], set()
        for r, it in enumerate(its):
            for _ in range(accum):
                batch = next(it)
                keys += batch["keys"]
                epoch.add(batch["epoch"])
                states[r] = json.loads(json.dumps(batch["state"]))
        assert len(epoch) == 1
        got.append((epoch.pop(), sorted(keys)))
    return got, states, its


def resharded(ds, states: list, world: int, batch: int, accum: int) -> list[ClipLoader]:
    ranks = loaders(ds, world, batch, accum)
    for loader in ranks:
        loader.reshard(states)
    return ranks


@pytest.mark.parametrize(
    ("before", "after"),
    [((2, 2, 1), (1, 2, 2)), ((1, 2, 1), (2, 1, 1)), ((2, 1, 2), (4, 1, 1))],
    ids=["2->1 by accumulation", "1->2 smaller micro batch", "2->4"],
)
def test_a_change_of_world_size_mid_epoch_repeats_and_skips_nothing(dataset, all_keys, before, after):  # noqa: F811
    world, batch, accum = before
    whole_run, _, _ = run_steps(loaders(dataset, world, batch, accum), 18, accum)  # into epoch 1
    head, states, _ = run_steps(loaders(dataset, world, batch, accum), 3, accum)
    assert head == whole_run[:3]
    new_world, new_batch, new_accum = after
    ranks = resharded(dataset, states, new_world, new_batch, new_accum)
    tail, _, _ = run_steps(ranks, 15, new_accum)
    # each step's global batch holds what it would have held, in the epoch in flight and after it
    epoch0 = [keys for e, keys in whole_run if e == 0]
    assert [keys for e, keys in head + tail if e == 0] == epoch0
    seen = Counter(k for keys in epoch0 for k in keys)
    assert max(seen.values()) == 1 and len(seen) >= len(all_keys) - world * batch * accum  # the even tail
    later = [keys for e, keys in tail if e == 1]  # epoch 1: sharded over the new ranks
    assert later and max(Counter(k for keys in later for k in keys).values()) == 1


def test_two_changes_in_one_epoch(dataset):  # noqa: F811
    """2 ranks -> 1 (accumulating) -> 2 again, each after two steps: the lanes of the first change are cut
    again, and the epoch still gives each of its samples once."""
    whole_run, _, _ = run_steps(loaders(dataset, 2, 2, 1), 7, 1)
    a, states, _ = run_steps(loaders(dataset, 2, 2, 1), 2, 1)
    b, states, _ = run_steps(resharded(dataset, states, 1, 2, 2), 2, 2)
    assert all("lanes" in st for st in states)
    c, _, _ = run_steps(resharded(dataset, states, 2, 2, 1), 3, 1)
    assert a + b + c == whole_run[: len(a + b + c)] and [e for e, _ in a + b + c] == [0] * 7


def test_states_of_another_data_order_or_a_partial_run_are_refused(dataset):  # noqa: F811
    _, states, _ = run_steps(loaders(dataset, 2, 2, 1), 1, 1)
    other = ClipLoader(str(dataset), 2, decoder="pyav", seed=4, shuffle_buffer=8)
    with pytest.raises(LoaderError, match="seed=3"):
        other.reshard(states)
    with pytest.raises(LoaderError, match="not those of every rank"):
        loaders(dataset, 1, 2, 2)[0].reshard(states[:1])
    with pytest.raises(LoaderError, match="cannot be split over 3 ranks"):
        loaders(dataset, 3, 1, 1)[0].reshard(states)
