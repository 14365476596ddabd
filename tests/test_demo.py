import json
import subprocess
import sys


def test_demo_runs_end_to_end_with_few_steps(tmp_path):
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        "-m",
        "train.demo",
        "--out",
        str(out),
        "--tokenizer-steps",
        "3",
        "--mae-steps",
        "3",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clips"] == 37  # 16-frame clips of the four sample videos: 8 + 15 + 7 + 7
    assert (out / "data" / "index.json").is_file()
    assert (out / "data" / "tokens" / summary["tokenizer_id"] / "zarr.json").is_file()
    assert (out / "mae.safetensors").is_file() and (out / "tokenizer" / "config.json").is_file()
    assert "LVMAE (adaptive decoder mask" in run.stdout
