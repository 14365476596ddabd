"""`lvmae eval tokenizer`: figures a person can check by hand on the real sample clips, a PNG, and clear
errors for a wrong folder or a data set of another clip size."""

from __future__ import annotations

import json

import pytest
import torch

from evals.tokenizer_eval import evaluate_tokenizer, run_eval_tokenizer
from lvmae import diagnostics as dg
from lvmae.tokenizer import load_tokenizer
from lvmae_cli.main import main as lvmae_main
from train.loader import ClipLoader


def test_eval_tokenizer_command(train_data, tmp_path, capsys) -> None:
    url, tid = train_data
    tokenizer = url.parent / "tokenizer"
    out = tmp_path / "eval"
    # PyAV, as by hand below: DALI's pixels differ from PyAV's by a rounding, enough to flip a few codes.
    rc = lvmae_main(
        [
            "eval",
            "tokenizer",
            str(tokenizer),
            str(url),
            "--clips",
            "10",
            "--out",
            str(out),
            "--decoder",
            "pyav",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"lvmae eval tokenizer: {tid} on 10 clips" in text and "PSNR" in text and "perplexity" in text
    figures = json.loads((out / "tokenizer_eval.json").read_text())
    assert figures["tokenizer_id"] == tid and figures["clips"] == 10
    assert (out / "tokenizer_eval.png").stat().st_size > 10_000
    pr = figures["priority"]
    assert len(pr["top_share_per_time"]) == 4 and sum(pr["top_share_per_time"]) == pytest.approx(1, abs=1e-3)
    assert 0 <= pr["saturation_share"] <= 1 and 0 < pr["entropy"] <= 1
    assert 0 < figures["used_share"] <= 1 and 1 <= figures["perplexity"] <= figures["codebook_size"]

    # The same figures computed by hand from the same clips.
    model = load_tokenizer(tokenizer).eval()
    clips = [b["video"] for b in ClipLoader(str(url), 5, shuffle_buffer=0, epochs=1, decoder="pyav")][:2]
    video = torch.cat(clips)[:10]
    codes, prio = model.encode(video)
    recon = model.decode_codes(codes, prio)
    assert figures["psnr_db"] == pytest.approx(float(dg.psnr(recon, video).mean()), abs=0.05)
    usage = dg.codebook_usage(codes, model.cfg.codebook_size)
    assert figures["used_share"] == pytest.approx(usage["used_share"], abs=1e-4)
    fd = dg.frame_difference(video, 2, 8)
    assert pr["frame_diff_spearman"] == pytest.approx(dg.spearman(prio, fd), abs=0.02)


def test_eval_tokenizer_accepts_the_run_folder_and_says_what_is_wrong(train_data, tmp_path, capsys) -> None:
    url, _ = train_data
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        (run / "tokenizer" / f).write_bytes((url.parent / "tokenizer" / f).read_bytes())
    figures = run_eval_tokenizer(str(run), str(url), clips=4, decoder="pyav")
    assert figures["json"] == str(run / "eval" / "tokenizer_eval.json")

    assert lvmae_main(["eval", "tokenizer", str(tmp_path / "nothing"), str(url)]) == 2
    assert "is not a trained tokenizer" in capsys.readouterr().err
    assert lvmae_main(["eval", "tokenizer", str(run), str(tmp_path / "no-data")]) == 2
    assert "not a complete data set" in capsys.readouterr().err


def test_diagnostics_by_hand() -> None:
    # A priority that ranks exactly the region first has the ceiling lift; its reverse has none.
    region = torch.zeros(2, 4, 2, 2, dtype=torch.bool)
    region[:, 1, 0, 0] = region[:, 2, 1, 1] = True  # 2 of 16 tokens per clip
    prio = region.float() + 0.01 * torch.arange(16.0).view(1, 4, 2, 2)
    assert dg.lift(prio, region, top=0.125) == pytest.approx(8.0)  # 1 / (2/16)
    assert dg.lift(-prio, region, top=0.125) == 0.0
    d = dg.priority_diagnostics(prio, region.float())
    assert d["top_share_per_time"] == [0.0, 0.5, 0.5, 0.0]
    assert d["frame_diff_spearman"] > 0.5 and d["saturation_share"] == 0.0
    assert dg.codebook_usage(torch.tensor([0, 0, 1, 1]), 4) == {
        "used_share": 0.5,
        "perplexity": pytest.approx(2.0),
        "perplexity_share": pytest.approx(0.5),
    }
    x = torch.rand(1, 3, 4, 16, 16)
    assert dg.ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert dg.psnr(x + 0.1, x).item() < 100 and dg.ssim(x.flip(-1), x).item() < 0.5


def test_evaluate_stops_at_max_clips(train_data) -> None:
    url, _ = train_data
    model = load_tokenizer(url.parent / "tokenizer")
    loader = ClipLoader(str(url), 4, shuffle_buffer=0, epochs=1, decoder="pyav")
    figures, first = evaluate_tokenizer(model, loader, 6)
    assert figures["clips"] == 6 and first["video"].shape == (1, 3, 8, 32, 32)
