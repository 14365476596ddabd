"""ingest.samples.tar_samples, the one tar reader of ingest and training (webdataset's tar iteration and key
grouping): samples by basename KEY, streamed, and a damaged tar raised or reported."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from collections.abc import Iterator

import pytest

from ingest.samples import Sample, tar_samples


def tar_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
    """A tar of (name, data) members; data None: a directory entry."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Stream(io.RawIOBase):
    """A read-only stream that cannot seek or tell (as the loader's fsspec stream may be), failing with
    OSError after `fail_at` bytes if given."""

    def __init__(self, data: bytes, fail_at: int | None = None):
        self.data, self.pos, self.fail_at = data, 0, fail_at

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError("connection reset")
        n = min(len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def old_reader(fileobj) -> Iterator[Sample]:
    """The hand-written reader the loader used before (the reference for the shared one)."""
    key, parts = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def test_members_group_by_basename_key_in_tar_order():
    members = [
        ("a.webm", b"1"),
        ("a.json", b"{}"),
        ("d/", None),  # a directory entry: passed over
        ("d/e/b.webm", b"2"),
        ("x/b.JSON", b"[]"),  # another directory, the same KEY: the same sample; extension case kept
        ("c.seg.json", b"3"),  # KEY up to the first dot
        ("noext", b"4"),
        ("a.json", b"5"),  # KEY a again, not next to the first: a sample of its own
    ]
    got = list(tar_samples(Stream(tar_bytes(members))))
    assert got == [
        ("a", {"webm": b"1", "json": b"{}"}),
        ("b", {"webm": b"2", "JSON": b"[]"}),
        ("c", {"seg.json": b"3"}),
        ("noext", {"": b"4"}),
        ("a", {"json": b"5"}),
    ]
    assert list(tar_samples(io.BytesIO(tar_bytes([])))) == []


def test_the_same_samples_as_the_old_reader_on_random_tars():
    rng = random.Random(0)
    for _ in range(50):
        members: list[tuple[str, bytes | None]] = []
        key = ""
        for i in range(rng.randrange(12)):  # KEYs recur, but not next to themselves (no repeated member)
            key = rng.choice([k for k in ("k1", "k2", f"{i:026d}") if k != key])
            prefix = rng.choice(["", "dir/", "a/b/"])
            if rng.random() < 0.1:
                members.append((f"{prefix}sub{i}/", None))
            exts = rng.sample(["webm", "json", "cls", "x.y"], rng.randrange(1, 4))
            members += [(f"{prefix}{key}.{ext}", rng.randbytes(rng.randrange(1200))) for ext in exts]
        data = tar_bytes(members)
        assert list(tar_samples(Stream(data))) == list(old_reader(io.BytesIO(data))), members


def old_ingest_reader(fileobj) -> Iterator[Sample]:
    """The hand-written reader ingest tokens used before: a damaged tar gave the parts read whole of the
    sample it was in, then ("", {"_error": ...})."""
    key, parts = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                parts[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        if parts:
            yield key, parts
        yield "", {"_error": f"{type(err).__name__}: {err}"}
        return
    if key is not None:
        yield key, parts


def drain(samples: Iterator[Sample]) -> tuple[list[Sample], str | None]:
    """(the samples given, the error that ended them or None)."""
    got: list[Sample] = []
    try:
        got.extend(samples)
    except (tarfile.TarError, EOFError, OSError) as err:
        return got, f"{type(err).__name__}: {err}"
    return got, None


def test_cut_tars_give_what_the_old_readers_gave():
    rng = random.Random(1)
    members = [
        (f"d/{i:026d}.{e}", rng.randbytes(rng.randrange(2000))) for i in range(6) for e in ("webm", "json")
    ]
    data = tar_bytes(members)
    for cut in [*sorted(rng.sample(range(len(data)), 150)), 0, 1, 512, len(data) - 1024]:
        head = data[:cut]
        assert drain(tar_samples(Stream(head))) == drain(old_reader(io.BytesIO(head))), cut
        reported = list(tar_samples(Stream(head), report_damage=True))
        assert reported == list(old_ingest_reader(io.BytesIO(head))), cut


def test_a_failing_stream_is_raised_after_whole_samples_only():
    # A dropped connection is raised in either mode, after whole samples only. (Not always after the same
    # samples as the old readers: webdataset opens the tar "r|*", which reads 512 bytes to detect a
    # compression before tarfile's 10 KiB blocks, so a failing read lands elsewhere in the tar.)
    rng = random.Random(2)
    members = [
        (f"{i:026d}.{e}", rng.randbytes(rng.randrange(3000))) for i in range(30) for e in ("webm", "json")
    ]
    data = tar_bytes(members)
    whole = list(tar_samples(io.BytesIO(data)))
    assert len(whole) == 30 and whole == list(old_reader(io.BytesIO(data)))
    for fail_at in range(0, len(data), 997):
        for report in (False, True):
            given, error = drain(tar_samples(Stream(data, fail_at=fail_at), report_damage=report))
            where = (fail_at, report)
            assert given == whole[: len(given)], where
            assert error == "OSError: connection reset" or (error is None and given == whole), where


def damaged() -> tuple[bytes, list[Sample]]:
    """A tar cut inside the second member of its third sample, and its samples."""
    samples = [(f"k{i}", {"webm": bytes([i]) * 1500, "json": b"{}"}) for i in range(4)]
    data = tar_bytes([(f"{k}.{e}", v) for k, parts in samples for e, v in parts.items()])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember("k2.json").offset_data + 1
    return data[:cut], samples


def test_a_damaged_tar_raises_after_the_complete_samples():
    data, samples = damaged()
    got: list[Sample] = []
    with pytest.raises(tarfile.ReadError, match=r"^unexpected end of data$"):  # as tarfile says it
        got.extend(tar_samples(Stream(data)))
    assert got == samples[:2]  # k2, half read, is not given: a reader that retries gets it whole later
    with pytest.raises(tarfile.ReadError):
        list(tar_samples(io.BytesIO(b"not a tar" * 100)))


def test_a_damaged_tar_can_be_reported_as_a_last_entry():
    data, samples = damaged()
    got = list(tar_samples(Stream(data), report_damage=True))
    assert got[:2] == samples[:2]
    assert got[2] == ("k2", {"webm": samples[2][1]["webm"]})  # the part read whole
    assert got[3:] == [("", {"_error": "ReadError: unexpected end of data"})]
    garbage = list(tar_samples(io.BytesIO(b"not a tar" * 100), report_damage=True))
    assert len(garbage) == 1 and garbage[0][0] == "" and garbage[0][1]["_error"].startswith("ReadError: ")


def test_where_webdataset_differs_from_the_old_readers():
    # Tars ingest never writes. webdataset's grouping refuses an extension repeated within a sample
    # (ValueError): the repeat is dropped, the first kept (the old readers kept the last).
    data = tar_bytes([("a.json", b"1"), ("d/a.json", b"2"), ("a.webm", b"3")])
    assert list(tar_samples(io.BytesIO(data))) == [("a", {"json": b"1", "webm": b"3"})]
    # A top-level member named __NAME__ is webdataset metadata: passed over (the old readers made it a sample).
    data = tar_bytes([("__meta__", b"m"), ("b.json", b"4")])
    assert list(tar_samples(io.BytesIO(data))) == [("b", {"json": b"4"})]
    # Opened "r|*": a compressed tar is read (the old readers, "r|", raised tarfile.ReadError).
    assert list(tar_samples(io.BytesIO(gzip.compress(data)))) == [("b", {"json": b"4"})]
