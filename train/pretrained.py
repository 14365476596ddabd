"""Pretrained MAE weights, from wherever they are: the one loader behind `model.init_from`, `lvmae eval
probe`, `lvmae finetune` and `lvmae export hf`.

    cfg, state, what = load_pretrained("runs/mae")           # a run folder: its export/
    cfg, state, what = load_pretrained("runs/mae/export")    # an export: config.yaml + model.safetensors
    cfg, state, what = load_pretrained("runs/mae/checkpoints/step-00000100")  # a ZeRO checkpoint
    cfg, state, what = load_pretrained("s3://bucket/runs/mae")  # any of them on object storage
    kind, folder, where = locate("s3://bucket/runs/mae")     # ("export" | "checkpoint", local folder, URL)

cfg is the resolved MAEConfig the weights were trained with (options a save predates read as it was
trained: lvmae.config.saved_model_dict); state the full-precision state dict (a checkpoint's is rebuilt
from its rank shards by DeepSpeed's zero_to_fp32, train.engine.consolidated_state); what says what was
loaded, for messages ("export PATH", "checkpoint URL"). A folder on object storage is fetched into its
stage folder first (train.rundir). Anything else is one clear UserError.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lvmae.config import ConfigError, MAEConfig, load_saved_model_config
from lvmae.errors import UserError
from lvmae.weights import MAE_CONFIG, MAE_WEIGHTS
from train.rundir import default_stage_dir, fetch_folder, is_url, run_name

EXPORT, CHECKPOINT = "export", "checkpoint"
META = "meta.json"  # what marks a complete checkpoint (train.checkpoint)


def _not_weights(source: str) -> UserError:
    return UserError(
        f"{source} is neither an exported model (config.yaml + model.safetensors), a run folder with "
        "export/, nor a checkpoint folder (step-N with meta.json)"
    )


def locate(source: str) -> tuple[str, Path, str]:
    """-> (EXPORT or CHECKPOINT, the local folder that holds it, its address for messages). A run folder
    means its export/; a URL is fetched first (a checkpoint with every rank's shards, into a folder named
    like its run, as zero_to_fp32 reads PARENT/step-N)."""
    if is_url(source):
        return _locate_url(source.rstrip("/"))
    path = Path(source)
    if (path / "export" / MAE_CONFIG).is_file():
        path = path / "export"
    if (path / MAE_CONFIG).is_file() and (path / MAE_WEIGHTS).is_file():
        return EXPORT, path, str(path)
    if (path / META).is_file() and (path / "config.yaml").is_file():
        return CHECKPOINT, path, str(path)
    raise _not_weights(source)


def _locate_url(url: str) -> tuple[str, Path, str]:
    from ingest.storage import Store

    store = Store(url)
    if store.exists(f"export/{MAE_CONFIG}"):
        url = f"{url}/export"
        store = Store(url)
    if store.exists(META):
        kind, local = CHECKPOINT, fetch_folder(url, default_stage_dir(url) / run_name(url))
    elif store.exists(MAE_CONFIG):
        kind, local = EXPORT, fetch_folder(url)
    else:
        raise _not_weights(url)
    return kind, locate(str(local))[1], url


def load_pretrained(source: str) -> tuple[MAEConfig, dict[str, torch.Tensor], str]:
    """An export, a run folder or a checkpoint folder (local or a URL) -> (resolved model config, MAE state
    dict, what was loaded)."""
    kind, folder, where = locate(source)
    if kind == EXPORT:
        return (*_export(folder), f"{EXPORT} {where}")
    return (*_checkpoint(folder), f"{CHECKPOINT} {where}")


def _export(path: Path) -> tuple[MAEConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    try:
        cfg = load_saved_model_config(path / MAE_CONFIG)
    except ConfigError as err:
        raise UserError(f"{path / MAE_CONFIG} is not an LVMAE model config: {err}") from None
    return cfg.resolved(), load_file(path / MAE_WEIGHTS, device="cpu")


def _checkpoint(path: Path) -> tuple[MAEConfig, dict[str, torch.Tensor]]:
    """A ZeRO checkpoint of `lvmae train mae` (this project's own files), its weights rebuilt whole."""
    from train.config import load_saved_train_config
    from train.engine import consolidated_state

    try:
        cfg = load_saved_train_config(path / "config.yaml").model_config()
    except ConfigError as err:
        raise UserError(f"{path} is not a checkpoint of `lvmae train mae`: {err}") from None
    return cfg, {k: v.float() for k, v in consolidated_state(path).items()}
