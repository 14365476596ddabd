"""Kinetics-400/600/700: the DeepMind / CVDF CSVs `label,youtube_id,time_start,time_end,split` (`is_cc`
after them in some releases; no `label` in the unlabelled test CSVs).

Videos, found by file stem anywhere under ROOT (a folder named after the row's split or label is
preferred when one stem is found twice):
- trimmed clips as the common downloaders name them: `{youtube_id}_{time_start:06d}_{time_end:06d}`
  (ActivityNet's Crawler/Kinetics/download.py and mmaction2's copy of it, in per-label folders; the CVDF
  tarballs, in per-split folders), `{youtube_id}_{time_start}_{time_end}` unpadded, and
  `{youtube_id}_{time_start}_{time_end - time_start}` (piaxar/kinetics-downloader --trim): no segment;
- else the untrimmed video `{youtube_id}.*`, cut by the row's segment: start=time_start, end=time_end.
"""

from __future__ import annotations

from pathlib import Path

from ingest.benchmarks.common import (
    Converted,
    Options,
    Row,
    VideoIndex,
    assign,
    need,
    number,
    read_csv,
    split_name,
)

FILES = "Kinetics CSVs (train.csv, validate.csv, kinetics_400_val.csv, ...)"
HELP = "label,youtube_id,time_start,time_end,split CSVs; {id}_{start:06d}_{end:06d}.* clips or {id}.* videos"
COLUMNS = ("path", "label", "split", "start", "end", "id", "youtube_id", "time_start", "time_end")
LAYOUT = "a Kinetics CSV (label,youtube_id,time_start,time_end,split)"
REQUIRED = ("youtube_id", "time_start", "time_end", "split")


def _stamp(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def convert(files: list[tuple[Path, bool]], videos: VideoIndex, opts: Options) -> Converted:
    conv = Converted(COLUMNS)
    for path in need(assign(files, [("csv", lambda n: n.endswith(".csv"))], FILES)["csv"], FILES):
        for n, rec in read_csv(path, REQUIRED, LAYOUT):
            where = f"{path}:{n}"
            yid = rec["youtube_id"]
            t0, t1 = number(rec["time_start"], where), number(rec["time_end"], where)
            split, label = split_name(rec["split"], where), rec.get("label", "")
            padded = f"{yid}_{int(t0):06d}_{int(t1):06d}"
            trimmed = (padded, f"{yid}_{_stamp(t0)}_{_stamp(t1)}", f"{yid}_{_stamp(t0)}_{_stamp(t1 - t0)}")
            prefer = (split, label, label.replace(" ", "_"))
            meta = {"youtube_id": yid, "time_start": rec["time_start"], "time_end": rec["time_end"]}
            video = next(filter(None, (videos.find(stem, prefer) for stem in trimmed)), None)
            if video is not None:
                conv.rows.append(Row(padded, split, label, video, meta=meta))
            elif (video := videos.find(yid, prefer)) is not None:
                conv.rows.append(Row(padded, split, label, video, start=t0, end=t1, meta=meta))
            else:
                conv.miss(padded, split, f"{padded}.* (trimmed) or {yid}.* (untrimmed)")
    return conv
