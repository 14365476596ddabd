import json
import subprocess
import sys

from lvmae_cli.main import main


def test_info_json_reports_versions_dali_and_presets(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] and info["packages"]["nvidia-dali-cuda120"]
    assert info["dali"].startswith("usable")
    presets = {row["preset"]: row for row in info["presets"]}
    assert set(presets) == {"tiny", "small", "base", "large", "huge"}
    # VideoMAE's ViT-B encoder has about 86 M parameters.
    assert 85 < presets["base"]["encoder_params_m"] < 88
    assert presets["base"]["encoder"] == "768/12/12"


def test_console_script_runs_and_unknown_commands_fail():
    ok = subprocess.run(
        [sys.executable, "-m", "lvmae_cli", "info"], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0 and "model presets" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lvmae_cli", "frobnicate"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
