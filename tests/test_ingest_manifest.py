"""`lvmae ingest manifest`: each benchmark's annotation files, in their published layouts, -> manifest rows
(paths, labels, splits, segments), the missing-videos list, options, byte-identical reruns, bad files; and
one run end to end through ingest.sources.read_manifest on a real video."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from videos import write_ramp_video

from ingest.clip_plan import Segment
from ingest.sources import read_manifest
from lvmae_cli.main import main


def touch(root: Path, *rels: str) -> None:
    """Empty files standing for videos: the converter finds files, it never decodes them."""
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run(capsys, *argv: str) -> str:
    assert main(["ingest", "manifest", *argv]) == 0
    return capsys.readouterr().out


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path: Path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


# ------------------------------------------------------------------------------------------- kinetics


def kinetics(tmp_path: Path) -> tuple[list[Path], Path]:
    """A K400-style train.csv (with is_cc), a K600-style val CSV, the unlabelled K600 test CSV, and
    videos as the CVDF tarballs (per split), ActivityNet's downloader (per label, padded times),
    piaxar's --trim (start_duration) and untrimmed downloads name them."""
    train = write(
        tmp_path / "ann" / "train.csv",
        "label,youtube_id,time_start,time_end,split,is_cc\n"
        "abseiling,0wR5jVB-WPk,417,427,train,0\n"
        "air drumming,--nQbRBEz2s,104,114,train,0\n"
        "air drumming,--nQbRBEz2s,200,210,train,0\n"
        "air drumming,2cPLjY5AWXU,1,11,train,0\n",
    )
    val = write(
        tmp_path / "ann" / "kinetics_600_val.csv",
        "label,youtube_id,time_start,time_end,split\n"
        "acting in play,08MqsEmN19s,19,29,val\n"
        "abseiling,3caPS4FHFF8,36,46,val\n",
    )
    test = write(
        tmp_path / "ann" / "kinetics_600_test.csv",
        "youtube_id,time_start,time_end,split\n--65_UAU7ao,0,10,test\n",
    )
    videos = tmp_path / "videos"
    touch(
        videos,
        "train/0wR5jVB-WPk_000417_000427.mp4",
        "val/0wR5jVB-WPk_000417_000427.mp4",  # the same stem elsewhere: the row's split folder wins
        "full/--nQbRBEz2s.mkv",
        "val/acting in play/08MqsEmN19s_000019_000029.mp4",
        "test/--65_UAU7ao_0_10.mp4",
        "notes.txt",
    )
    return [train, val, test], videos


def test_kinetics_trimmed_and_untrimmed_videos(tmp_path, capsys):
    files, videos = kinetics(tmp_path)
    out = tmp_path / "manifest.csv"
    line = run(capsys, "kinetics", *map(str, files), "--videos", str(videos), "--out", str(out))
    assert header(out) == [
        "path",
        "label",
        "split",
        "start",
        "end",
        "id",
        "youtube_id",
        "time_start",
        "time_end",
    ]
    got = [(r["path"], r["label"], r["split"], r["start"], r["end"], r["id"]) for r in rows(out)]
    assert got == [
        ("videos/full/--nQbRBEz2s.mkv", "air drumming", "train", "104", "114", "--nQbRBEz2s_000104_000114"),
        ("videos/full/--nQbRBEz2s.mkv", "air drumming", "train", "200", "210", "--nQbRBEz2s_000200_000210"),
        ("videos/test/--65_UAU7ao_0_10.mp4", "", "test", "", "", "--65_UAU7ao_000000_000010"),
        (
            "videos/train/0wR5jVB-WPk_000417_000427.mp4",
            "abseiling",
            "train",
            "",
            "",
            "0wR5jVB-WPk_000417_000427",
        ),
        (
            "videos/val/acting in play/08MqsEmN19s_000019_000029.mp4",
            "acting in play",
            "val",
            "",
            "",
            "08MqsEmN19s_000019_000029",
        ),
    ]
    missing = rows(tmp_path / "manifest.missing.csv")
    assert [(m["id"], m["split"], m["reason"]) for m in missing] == [
        ("2cPLjY5AWXU_000001_000011", "train", "not-found"),
        ("3caPS4FHFF8_000036_000046", "val", "not-found"),
    ]
    assert "2cPLjY5AWXU_000001_000011.*" in missing[0]["expected"]
    assert "5 rows, 4 videos (rows per split: train 3, val 1, test 1)" in line
    assert "2 rows whose video is missing (2 videos)" in line and "manifest.missing.csv" in line


def test_paths_outside_the_manifest_folder_are_absolute_and_a_rerun_is_byte_identical(tmp_path, capsys):
    _, videos = kinetics(tmp_path)
    out = tmp_path / "elsewhere" / "k.csv"
    argv = ("kinetics", str(tmp_path / "ann"), "--videos", str(videos), "--out", str(out))  # a folder of CSVs
    run(capsys, *argv)
    first, first_missing = out.read_bytes(), (tmp_path / "elsewhere" / "k.missing.csv").read_bytes()
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).exists() for r in rows(out))
    run(capsys, *argv)
    assert out.read_bytes() == first
    assert (tmp_path / "elsewhere" / "k.missing.csv").read_bytes() == first_missing
    assert sorted(p.name for p in out.parent.iterdir()) == ["k.csv", "k.missing.csv"]  # no temporaries left
    # A manifest written into the annotation folder is not read back as an annotation file on a rerun.
    inside = tmp_path / "ann" / "k.csv"
    for _ in range(2):
        run(capsys, "kinetics", str(tmp_path / "ann"), "--videos", str(videos), "--out", str(inside))
    assert len(rows(inside)) == 5


# ----------------------------------------------------------------------------------------------- ssv2


def test_ssv2_labels_splits_and_test_ids(tmp_path, capsys):
    ann = tmp_path / "labels"
    labels = {
        "Approaching something with your camera": "0",
        "Holding something next to something": "1",
        "Spinning something that quickly stops spinning": "2",
    }
    write(ann / "something-something-v2-labels.json", json.dumps(labels, indent=1))
    train = [
        {
            "id": "78687",
            "label": "holding potato next to vicks vaporub bottle",
            "template": "Holding [something] next to [something]",
            "placeholders": ["potato", "vicks vaporub bottle"],
        },
        {
            "id": "42326",
            "label": "approaching a mug with your camera",
            "template": "Approaching [something] with your camera",
            "placeholders": ["a mug"],
        },
    ]
    val = [
        {
            "id": "74225",
            "label": "spinning cube that quickly stops spinning",
            "template": "Spinning [something] that quickly stops spinning",
            "placeholders": ["cube"],
        }
    ]
    write(ann / "something-something-v2-train.json", json.dumps(train))
    write(ann / "something-something-v2-validation.json", json.dumps(val))
    write(ann / "something-something-v2-test.json", json.dumps([{"id": "1420"}]))
    videos = tmp_path / "20bn-something-something-v2"
    touch(videos, "78687.webm", "74225.webm", "1420.webm")
    out = tmp_path / "ssv2.csv"
    run(capsys, "ssv2", str(ann), "--videos", str(videos), "--out", str(out))
    assert header(out) == ["path", "label", "split", "id", "class_id", "caption", "placeholders"]
    got = {r["id"]: r for r in rows(out)}
    assert sorted(got) == ["1420", "74225", "78687"]
    assert got["78687"]["path"] == "20bn-something-something-v2/78687.webm"
    assert (got["78687"]["label"], got["78687"]["split"], got["78687"]["class_id"]) == (
        "Holding something next to something",
        "train",
        "1",
    )
    assert json.loads(got["78687"]["placeholders"]) == ["potato", "vicks vaporub bottle"]
    assert got["78687"]["caption"] == "holding potato next to vicks vaporub bottle"
    assert (got["74225"]["label"], got["74225"]["split"], got["74225"]["class_id"]) == (
        "Spinning something that quickly stops spinning",
        "val",
        "2",
    )
    assert (got["1420"]["label"], got["1420"]["split"], got["1420"]["class_id"]) == ("", "test", "")
    assert [(m["id"], m["split"], m["expected"]) for m in rows(tmp_path / "ssv2.missing.csv")] == [
        ("42326", "train", "42326.webm")
    ]


# ------------------------------------------------------------------------------------------- diving48


def diving48(tmp_path: Path) -> tuple[Path, Path]:
    ann = tmp_path / "annotations"
    train = [
        {"vid_name": "-mmq0PT-u8k_00155", "label": 0, "start_frame": 0, "end_frame": 48},
        {"vid_name": "-mmq0PT-u8k_00156", "label": 1, "start_frame": 0, "end_frame": 70},
    ]
    test = [{"vid_name": "_8Vy3dlHg2w_00000", "label": 1, "start_frame": 0, "end_frame": 61}]
    write(ann / "Diving48_V2_train.json", json.dumps(train, indent=2))
    write(ann / "Diving48_V2_test.json", json.dumps(test, indent=2))
    vocab = [["Back", "15som", "05Twis", "FREE"], ["Back", "15som", "15Twis", "FREE"]]
    write(ann / "Diving48_vocab.json", json.dumps(vocab, indent=2))
    videos = tmp_path / "rgb"
    touch(videos, "-mmq0PT-u8k_00155.mp4", "_8Vy3dlHg2w_00000.mp4")
    return ann, videos


def test_diving48_frames_are_half_open_and_labels_come_from_the_vocab(tmp_path, capsys):
    ann, videos = diving48(tmp_path)
    out = tmp_path / "d48.csv"
    run(capsys, "diving48", str(ann), "--videos", str(videos), "--out", str(out))
    assert header(out) == ["path", "label", "split", "start_frame", "end_frame", "id", "class_id"]
    got = [
        (r["path"], r["label"], r["split"], r["start_frame"], r["end_frame"], r["class_id"])
        for r in rows(out)
    ]
    assert got == [
        ("rgb/-mmq0PT-u8k_00155.mp4", "Back_15som_05Twis_FREE", "train", "0", "49", "0"),
        ("rgb/_8Vy3dlHg2w_00000.mp4", "Back_15som_15Twis_FREE", "test", "0", "62", "1"),
    ]
    assert [m["id"] for m in rows(tmp_path / "d48.missing.csv")] == ["-mmq0PT-u8k_00156"]
    # Without the vocab the label is the class index.
    run(
        capsys,
        "diving48",
        str(ann / "Diving48_V2_train.json"),
        str(ann / "Diving48_V2_test.json"),
        "--videos",
        str(videos),
        "--out",
        str(out),
    )
    assert [r["label"] for r in rows(out)] == ["0", "1"]


# ------------------------------------------------------------------------------------- epic-kitchens


EPIC_HEADER = (
    "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
    "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n"
)


def epic(tmp_path: Path) -> tuple[list[Path], Path]:
    ann = tmp_path / "epic-kitchens-100-annotations"
    train = write(
        ann / "EPIC_100_train.csv",
        EPIC_HEADER
        + "P01_01_0,P01,P01_01,00:00:01.089,00:00:00.14,00:00:03.37,8,202,open door,open,3,door,3,"
        "['door'],[3]\n"
        "P01_01_1,P01,P01_01,00:00:02.629,00:00:04.37,00:00:06.17,262,370,turn on light,turn-on,6,light,114,"
        "['light'],[114]\n"
        "P01_102_0,P01,P01_102,00:00:01.100,00:00:00.54,00:00:02.23,27,111,take knife and plate,take,0,knife,4,"
        "\"['knife', 'plate']\",\"[4, 2]\"\n"
        "P02_03_7,P02,P02_03,00:01:10.000,00:01:09.50,00:01:12.00,4170,4320,wash pan,wash,2,pan,5,['pan'],[5]\n"
        "P02_03_8,P02,P02_03,00:01:13.000,00:01:12.50,00:01:14.00,4350,4440,put pan,put,1,pan,5,['pan'],[5]\n",
    )
    val = write(
        ann / "EPIC_100_validation.csv",
        EPIC_HEADER
        + "P01_11_0,P01,P01_11,00:00:00.560,00:00:00.00,00:00:01.89,1,113,take plate,take,0,plate,2,"
        "['plate'],[2]\n",
    )
    test = write(
        ann / "EPIC_100_test_timestamps.csv",
        "uid,narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,"
        "start_frame,stop_frame\n1924,P01_101_0,P01,P01_101,00:00:02.851,00:00:02.86,00:00:03.87,143,193\n",
    )
    videos = tmp_path / "EPIC-KITCHENS"
    touch(videos, "P01/videos/P01_01.MP4", "P01/videos/P01_11.MP4", "P01/videos/P01_101.MP4", "P01_102.MP4")
    return [train, val, test], videos


def test_epic_segments_labels_and_missing_videos(tmp_path, capsys):
    files, videos = epic(tmp_path)
    out = tmp_path / "epic.csv"
    line = run(capsys, "epic-kitchens-100", *map(str, files), "--videos", str(videos), "--out", str(out))
    assert header(out) == [
        "path", "label", "split", "start", "end", "id", "participant_id", "video_id", "narration",
        "verb", "verb_class", "noun", "noun_class",
    ]  # fmt: skip
    got = [(r["path"], r["label"], r["split"], r["start"], r["end"], r["id"]) for r in rows(out)]
    assert got == [
        ("EPIC-KITCHENS/P01/videos/P01_01.MP4", "3_3", "train", "0.14", "3.37", "P01_01_0"),
        ("EPIC-KITCHENS/P01/videos/P01_01.MP4", "6_114", "train", "4.37", "6.17", "P01_01_1"),
        ("EPIC-KITCHENS/P01/videos/P01_101.MP4", "", "test", "2.86", "3.87", "P01_101_0"),
        ("EPIC-KITCHENS/P01/videos/P01_11.MP4", "0_2", "val", "0", "1.89", "P01_11_0"),
        ("EPIC-KITCHENS/P01_102.MP4", "0_4", "train", "0.54", "2.23", "P01_102_0"),
    ]
    first = rows(out)[0]
    assert (first["narration"], first["verb"], first["verb_class"], first["noun"], first["noun_class"]) == (
        "open door",
        "open",
        "3",
        "door",
        "3",
    )
    missing = rows(tmp_path / "epic.missing.csv")
    assert [(m["id"], m["expected"]) for m in missing] == [
        ("P02_03_7", "P02/videos/P02_03.MP4"),
        ("P02_03_8", "P02/videos/P02_03.MP4"),
    ]
    assert "5 rows, 4 videos" in line and "2 rows whose video is missing (1 videos)" in line
    for which, labels in (("verb", ["3", "6", "", "0", "0"]), ("noun", ["3", "114", "", "2", "4"])):
        run(
            capsys,
            "epic-kitchens-100",
            *map(str, files),
            "--videos",
            str(videos),
            "--out",
            str(out),
            "--label",
            which,
        )
        assert [r["label"] for r in rows(out)] == labels


def test_epic_hours_and_a_bad_timestamp(tmp_path, capsys):
    videos = tmp_path / "v"
    touch(videos, "P03_04.MP4")
    ok = write(
        tmp_path / "EPIC_100_train.csv",
        EPIC_HEADER + "P03_04_9,P03,P03_04,01:02:03.500,01:02:03.45,01:02:05.01,0,0,cut,cut,7,onion,9,"
        "['onion'],[9]\n",
    )
    run(capsys, "epic-kitchens-100", str(ok), "--videos", str(videos), "--out", str(tmp_path / "m.csv"))
    assert (rows(tmp_path / "m.csv")[0]["start"], rows(tmp_path / "m.csv")[0]["end"]) == (
        "3723.45",
        "3725.01",
    )
    write(ok, ok.read_text().replace("01:02:03.45", "3723.45"))
    assert (
        main(["ingest", "manifest", "epic-kitchens-100", str(ok), "--videos", str(videos), "--out", "x.csv"])
        == 2
    )
    err = capsys.readouterr().err
    assert "EPIC_100_train.csv:2" in err and "'3723.45' is not HH:MM:SS.ff" in err


# --------------------------------------------------------------------------------------------- ucf101


def ucf101(tmp_path: Path) -> tuple[Path, Path]:
    ann = tmp_path / "ucfTrainTestlist"
    write(ann / "classInd.txt", "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 HandstandPushups\r\n")
    write(
        ann / "trainlist01.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nHandstandPushups/v_HandStandPushups_g08_c01.avi 3\r\n",
    )
    write(
        ann / "testlist01.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nApplyLipstick/v_ApplyLipstick_g01_c01.avi\r\n",
    )
    write(ann / "trainlist02.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\n")
    write(
        ann / "testlist02.txt",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\r\nHandstandPushups/v_HandStandPushups_g08_c01.avi\r\n",
    )
    videos = tmp_path / "UCF-101"
    touch(
        videos,
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi",
    )
    return ann, videos


def test_ucf101_folds(tmp_path, capsys):
    ann, videos = ucf101(tmp_path)
    out = tmp_path / "ucf.csv"
    run(capsys, "ucf101", str(ann), "--videos", str(videos), "--out", str(out))
    assert header(out) == ["path", "label", "split", "id", "class_id"]
    got = [(r["path"], r["label"], r["split"], r["id"], r["class_id"]) for r in rows(out)]
    assert got == [
        (
            "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
            "ApplyEyeMakeup",
            "test",
            "v_ApplyEyeMakeup_g01_c01",
            "1",
        ),
        (
            "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
            "ApplyEyeMakeup",
            "train",
            "v_ApplyEyeMakeup_g08_c01",
            "1",
        ),
        (
            "UCF-101/HandstandPushups/v_HandStandPushups_g08_c01.avi",
            "HandstandPushups",
            "train",
            "v_HandStandPushups_g08_c01",
            "3",
        ),
    ]
    assert [(m["id"], m["split"], m["expected"]) for m in rows(tmp_path / "ucf.missing.csv")] == [
        ("v_ApplyLipstick_g01_c01", "test", "ApplyLipstick/v_ApplyLipstick_g01_c01.avi")
    ]
    run(capsys, "ucf101", str(ann), "--videos", str(videos), "--out", str(out), "--fold", "2")
    assert [(r["id"], r["split"]) for r in rows(out)] == [
        ("v_ApplyEyeMakeup_g01_c01", "train"),
        ("v_ApplyEyeMakeup_g08_c01", "test"),
        ("v_HandStandPushups_g08_c01", "test"),
    ]
    assert rows(tmp_path / "ucf.missing.csv") == []
    assert (
        main(
            [
                "ingest",
                "manifest",
                "ucf101",
                str(ann),
                "--videos",
                str(videos),
                "--out",
                str(out),
                "--fold",
                "3",
            ]
        )
        == 2
    )
    assert "trainlist03.txt / testlist03.txt" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- hmdb51


def test_hmdb51_folds_and_unused_rows(tmp_path, capsys):
    ann = tmp_path / "testTrainMulti_7030_splits"
    write(
        ann / "brush_hair_test_split1.txt",
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \n"
        "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \n"
        "April_09_brush_hair_u_nm_np1_ba_goo_2.avi 0 \n",
    )
    write(
        ann / "brush_hair_test_split2.txt",
        "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 2 \n"
        "April_09_brush_hair_u_nm_np1_ba_goo_1.avi 0 \n"
        "April_09_brush_hair_u_nm_np1_ba_goo_2.avi 1 \n",
    )
    write(
        ann / "clap_test_split1.txt",
        "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 1 \n#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi 2 \n",
    )
    write(
        ann / "clap_test_split2.txt",
        "#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi 0 \n#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi 0 \n",
    )
    videos = tmp_path / "hmdb51_org"
    touch(
        videos,
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi",
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_2.avi",
        "clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi",
    )
    out = tmp_path / "hmdb.csv"
    line = run(capsys, "hmdb51", str(ann), "--videos", str(videos), "--out", str(out))
    assert header(out) == ["path", "label", "split", "id"]
    got = [(r["path"], r["label"], r["split"]) for r in rows(out)]
    assert got == [
        ("hmdb51_org/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair", "train"),
        ("hmdb51_org/brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi", "brush_hair", "test"),
        ("hmdb51_org/clap/#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", "clap", "train"),
    ]
    assert [m["id"] for m in rows(tmp_path / "hmdb.missing.csv")] == ["#20_Rhythm_clap_u_nm_np1_fr_goo_1"]
    assert "1 rows marked 0 (not in split 1) left out" in line
    line = run(capsys, "hmdb51", str(ann), "--videos", str(videos), "--out", str(out), "--fold", "2")
    assert [(r["id"], r["split"]) for r in rows(out)] == [
        ("April_09_brush_hair_u_nm_np1_ba_goo_0", "test"),
        ("April_09_brush_hair_u_nm_np1_ba_goo_2", "train"),
    ]
    assert "3 rows marked 0 (not in split 2) left out" in line


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "argv, message",
    [
        (["youtube8m", "{ann}/train.csv"], "unknown format 'youtube8m'"),
        (["kinetics", "{ann}/bad.csv"], "bad.csv: not a Kinetics CSV"),
        (["kinetics", "{ann}/nope.csv"], "nope.csv: no such annotation file"),
        (["ssv2", "{ann}/something-something-v2-train.json"], "not JSON"),
        (["diving48", "{ann}/Diving48_V2_train.json"], "not a Diving48 split JSON"),
        (["kinetics", "{ann}/train.csv", "--fold", "2"], "--fold is for ucf101 and hmdb51, not kinetics"),
        (["kinetics", "{ann}/classInd.txt"], "classInd.txt: not one of this format's annotation files"),
    ],
)
def test_bad_annotations_are_one_line_and_status_2(tmp_path, capsys, argv, message):
    ann = tmp_path / "ann"
    write(
        ann / "train.csv", "label,youtube_id,time_start,time_end,split\nabseiling,0wR5jVB-WPk,417,427,train\n"
    )
    write(ann / "bad.csv", "label,youtube_id,start,end\nabseiling,0wR5jVB-WPk,417,427\n")
    write(ann / "something-something-v2-train.json", '[{"id": "1", ')
    write(ann / "Diving48_V2_train.json", json.dumps([{"vid_name": "x", "label": 0}]))
    write(ann / "classInd.txt", "1 ApplyEyeMakeup\n")
    (tmp_path / "videos").mkdir()
    argv = [a.format(ann=ann) for a in argv]
    assert (
        main(
            [
                "ingest",
                "manifest",
                *argv,
                "--videos",
                str(tmp_path / "videos"),
                "--out",
                str(tmp_path / "m.csv"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lvmae ingest: error: ") and message in err
    if "bad.csv" in message:
        assert "expected the columns youtube_id,time_start,time_end,split" in err
    assert not (tmp_path / "m.csv").exists()


def test_no_video_found_at_all_writes_no_manifest(tmp_path, capsys):
    files, _ = kinetics(tmp_path)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "m.csv"
    assert (
        main(
            [
                "ingest",
                "manifest",
                "kinetics",
                str(files[0]),
                "--videos",
                str(tmp_path / "empty"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "none of the 4 videos" in capsys.readouterr().err
    assert not out.exists() and len(rows(tmp_path / "m.missing.csv")) == 4


# ----------------------------------------------------------------------------------------- end to end


def test_untrimmed_kinetics_video_through_read_manifest(tmp_path, capsys):
    """A real 6 s video with two annotated segments -> the manifest -> the sources `ingest clips` reads."""
    (tmp_path / "videos").mkdir()
    video = write_ramp_video(tmp_path / "videos" / "abcdefghijk.mp4", frames=150, fps=25)
    ann = write(
        tmp_path / "train.csv",
        "label,youtube_id,time_start,time_end,split\nwaving,abcdefghijk,0,2,train\nclapping,abcdefghijk,3,6,val\n",
    )
    out = tmp_path / "manifest.csv"
    run(capsys, "kinetics", str(ann), "--videos", str(tmp_path / "videos"), "--out", str(out))
    written = rows(out)
    sources = read_manifest(str(out))
    assert len(sources) == len(written) == 2
    for source, row in zip(sources, written):
        assert Path(source.uri) == video and Path(source.uri).stat().st_size > 0
        assert source.label == row["label"]
        assert source.meta["split"] == row["split"]
        assert source.segment == Segment(float(row["start"]), float(row["end"]), "s")
    assert [(s.label, s.segment.start, s.segment.end) for s in sources] == [
        ("waving", 0.0, 2.0),
        ("clapping", 3.0, 6.0),
    ]
