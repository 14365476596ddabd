import json

import pytest

from ingest.sources import SourceError, expand_sources


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directories_globs_files_and_manifests(tmp_path):
    a = touch(tmp_path / "d" / "a.mp4")
    b = touch(tmp_path / "d" / "sub" / "b.MKV")
    touch(tmp_path / "d" / "notes.txt")
    c = touch(tmp_path / "g" / "c.webm")
    odd = touch(tmp_path / "odd.bin")
    csv = tmp_path / "m" / "list.csv"
    csv.parent.mkdir()
    csv.write_text("path,label,camera\n../d/a.mp4,cat,front\n/abs/e.mp4,,back\n")
    sources = expand_sources([str(tmp_path / "d"), str(tmp_path / "g" / "*.webm"), str(odd), str(csv)])
    by_uri = {s.uri: s for s in sources}
    assert [s.uri for s in sources] == sorted(by_uri)  # the corpus order is sorted by URI
    assert set(by_uri) == {str(a), str(b), str(c), str(odd), "/abs/e.mp4"}  # notes.txt is not a video
    assert by_uri[str(a)].label == "cat" and by_uri[str(a)].meta == {"camera": "front"}  # manifest wins
    assert by_uri["/abs/e.mp4"].label is None


def test_jsonl_manifest_and_clear_errors(tmp_path):
    m = tmp_path / "list.jsonl"
    m.write_text(json.dumps({"uri": "s3://bucket/x.mp4", "label": 3}) + "\n\n")
    (src,) = expand_sources([str(m)])
    assert (src.uri, src.label) == ("s3://bucket/x.mp4", "3")
    with pytest.raises(SourceError, match="no such file"):
        expand_sources([str(tmp_path / "missing")])
    with pytest.raises(SourceError, match="matches no video"):
        expand_sources([str(tmp_path / "*.mov")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "a.mp4"}\nnot json\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2"):
        expand_sources([str(bad)])
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("file\na.mp4\n")
    with pytest.raises(SourceError, match="no path / uri / url column"):
        expand_sources([str(nocol)])
