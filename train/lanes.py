"""Re-sharding an epoch in flight: which samples each rank reads after the world size changes mid-epoch.

An epoch's samples come in streams: stream r of a layout of N ranks is rank r's shards
(train.stream.split_by_rank of the epoch's shard order), shuffled by (seed, epoch, r). Each step takes
`period` = micro batch x gradient accumulation kept samples (train.loader: the split's, with token rows)
from every stream, in rank order: step j's global batch is stream 0's block j, stream 1's block j, ...

A lane is the part of one stream a rank reads: the kept samples j (counted from raw sample `start` of the
stream) with lo <= j % period < hi, j >= first and j < end. A rank of the old layout is one lane (lo 0,
hi period) of its stream, from where its loader stood. When M ranks take over from N, the lanes of every
old rank, in rank order, are cut at the M equal parts of the global batch (`split`): a new rank gets
whole lanes (fewer ranks) or narrower ones (more ranks), so that each step's global batch holds the
same samples as before the change, and every sample left in the epoch goes to exactly one rank. Lanes
cut again at a second change work the same way (`advance` first moves each past what its rank took).

Everything here is arithmetic on lanes; train.loader reads them (`lane_samples`, `interleave`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Lane:
    stream: int  # rank of the epoch's layout whose shards the lane reads
    start: int  # raw samples of that stream passed over first (drawn before the layout changed)
    period: int  # kept samples the stream gives each step
    lo: int  # the lane takes kept samples j (counted from `start`) with lo <= j % period < hi ...
    hi: int
    first: int = 0  # ... j >= first
    end: int | None = None  # ... and j < end (None: to the stream's end)

    @property
    def width(self) -> int:
        """Samples the lane gives each step."""
        return self.hi - self.lo

    def below(self, j: int) -> int:
        """How many indices < j the lane's residues hold (from 0, `first` aside)."""
        p, w = self.period, self.width
        return (j // p) * w + min(max(j % p - self.lo, 0), w)

    def index(self, t: int) -> int:
        """The index j of the lane's t-th pick (0-based, from `first`)."""
        u = self.below(self.first) + t
        return (u // self.width) * self.period + self.lo + u % self.width

    def picks(self) -> int | None:
        """How many samples the lane holds (None: to the stream's end, not known without reading it)."""
        if self.end is None:
            return None
        return max(0, self.below(self.end) - self.below(self.first))

    def takes(self, j: int) -> bool:
        return self.lo <= j % self.period < self.hi and j >= self.first and (self.end is None or j < self.end)

    def advance(self, taken: int) -> Lane:
        """The lane without its first `taken` picks (what its rank already drew)."""
        return dataclasses.replace(self, first=self.index(taken)) if taken else self


def split(lanes: list[Lane], parts: int) -> list[list[Lane]]:
    """Lanes in step order (their widths add up to the global batch) -> `parts` equal shares of every
    step, in order: share k is positions [k G / parts, (k + 1) G / parts) of each step's G samples.
    ValueError when G does not divide by `parts`."""
    total = sum(lane.width for lane in lanes)
    if total % parts:
        raise ValueError(f"a global batch of {total} cannot be split over {parts} ranks")
    size, shares, at = total // parts, [[] for _ in range(parts)], 0
    for lane in lanes:
        for k in range(at // size, (at + lane.width - 1) // size + 1):
            lo, hi = max(at, k * size) - at, min(at + lane.width, (k + 1) * size) - at
            shares[k].append(dataclasses.replace(lane, lo=lane.lo + lo, hi=lane.lo + hi))
        at += lane.width
    return shares


def lane_samples(stream: Iterable[Any], lane: Lane, kept: Callable[[Any], bool]) -> Iterator[Any]:
    """A lane's samples from its stream (every raw sample from the epoch's start): raw `start` passed over,
    then the kept samples the lane takes. `kept` decides what counts as a sample of the epoch."""
    j = 0
    for raw, item in enumerate(stream):
        if raw < lane.start or not kept(item):
            continue
        if lane.end is not None and j >= lane.end:
            return
        if lane.takes(j):
            yield item
        j += 1


def interleave(sources: list[Iterator[Any]], widths: list[int], taken: list[int]) -> Iterator[Any]:
    """Round robin: `widths[i]` items from source i, then from the next, ...; a source that ends is left
    out. taken[i] counts what was drawn from source i (how far each lane got, for a checkpoint)."""
    live = list(range(len(sources)))
    while live:
        for i in list(live):
            for _ in range(widths[i]):
                item = next(sources[i], StopIteration)
                if item is StopIteration:
                    live.remove(i)
                    break
                taken[i] += 1
                yield item


def to_dict(lane: Lane) -> dict[str, Any]:
    return dataclasses.asdict(lane)


def from_dict(d: dict[str, Any]) -> Lane:
    return Lane(**{f.name: d[f.name] for f in dataclasses.fields(Lane) if f.name in d})
