"""Exported weights on disk: safetensors plus the config that builds the model, written atomically.

    save_mae(model.state_dict(), model.cfg, "runs/x/export")   # model.safetensors, then config.yaml
    model = load_mae("runs/x/export")                          # MaskedVideoAutoencoder, weights loaded
    encoder = model.encoder                                    # VideoViT, for probes and fine-tuning

No pickle anywhere: tensors through safetensors, the config as YAML merged onto the typed schema.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lvmae.config import POOLINGS, MAEConfig, load_saved_model_config, saved_classifier_dict, to_yaml

MAE_WEIGHTS = "model.safetensors"
MAE_CONFIG = "config.yaml"


def replace_atomically(directory: Path, name: str, write: Callable[[str], None]) -> None:
    """write(tmp_path) then rename over `name`: readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, directory / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Create or replace a text file atomically: written and fsynced beside it, then renamed over it."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    replace_atomically(path.parent, path.name, write)


def save_mae(state: dict[str, torch.Tensor], cfg: MAEConfig, directory: str | os.PathLike[str]) -> Path:
    """Write model.safetensors then config.yaml (its presence means the export is complete); -> directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    replace_atomically(d, MAE_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "lvmae-mae"}))
    write_text_atomically(d / MAE_CONFIG, to_yaml(cfg.resolved()))
    return d


def load_mae(directory: str | os.PathLike[str], device: str | torch.device = "cpu"):
    """-> MaskedVideoAutoencoder built from config.yaml with the weights of model.safetensors (strict).

    Raises ValueError if the files are missing or the weights do not fit the config.
    """
    from lvmae.mae import MaskedVideoAutoencoder

    d = Path(directory)
    if not (d / MAE_CONFIG).is_file() or not (d / MAE_WEIGHTS).is_file():
        raise ValueError(f"{d} is not an exported model: needs {MAE_CONFIG} and {MAE_WEIGHTS}")
    model = MaskedVideoAutoencoder(load_saved_model_config(d / MAE_CONFIG))
    try:
        model.load_state_dict(load_file(d / MAE_WEIGHTS, device="cpu"), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{d / MAE_WEIGHTS} does not fit the model in {d / MAE_CONFIG}: {err}") from None
    return model.to(device)


CLASSES = "classes.json"
CLASSIFIER = "classifier.json"  # the classifier's own options (pooling); exports before it have none


def save_classifier(
    state: dict[str, torch.Tensor],
    cfg: MAEConfig,
    classes: list[str],
    directory: str | os.PathLike[str],
    *,
    pooling: str,
) -> Path:
    """A fine-tuned VideoClassifier: model.safetensors, classes.json, classifier.json (its pooling), then
    config.yaml (the encoder's config at the fine-tuning clip; its presence means the export is complete);
    -> directory."""
    import json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    replace_atomically(
        d, MAE_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "lvmae-classifier"})
    )
    write_text_atomically(d / CLASSES, json.dumps(list(classes), indent=1) + "\n")
    write_text_atomically(d / CLASSIFIER, json.dumps({"pooling": pooling}, indent=1) + "\n")
    write_text_atomically(d / MAE_CONFIG, to_yaml(cfg.resolved()))
    return d


def load_classifier_options(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """An export's classifier.json as it was trained: options it lacks (all of them when the file is
    absent, as in exports written before it) take their old values (lvmae.config.saved_classifier_dict).
    Raises ValueError for an unreadable file or an unknown pooling."""
    import json

    path = Path(directory) / CLASSIFIER
    raw: Any = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a mapping of classifier options")
    options = saved_classifier_dict(raw)
    if options["pooling"] not in POOLINGS:
        raise ValueError(f"{path}: pooling must be one of {', '.join(POOLINGS)}; got {options['pooling']!r}")
    return options


def load_classifier(directory: str | os.PathLike[str], device: str | torch.device = "cpu"):
    """-> (VideoClassifier with the weights of model.safetensors and the pooling of classifier.json,
    class names)."""
    import json

    from lvmae.heads import VideoClassifier, encoder_for

    d = Path(directory)
    if not all((d / f).is_file() for f in (MAE_CONFIG, MAE_WEIGHTS, CLASSES)):
        raise ValueError(f"{d} is not a fine-tuned classifier: needs {MAE_CONFIG}, {MAE_WEIGHTS}, {CLASSES}")
    classes = json.loads((d / CLASSES).read_text())
    pooling = load_classifier_options(d)["pooling"]
    encoder = encoder_for(load_saved_model_config(d / MAE_CONFIG), None)
    model = VideoClassifier(encoder, len(classes), pooling=pooling)
    try:
        model.load_state_dict(load_file(d / MAE_WEIGHTS, device="cpu"), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{d / MAE_WEIGHTS} does not fit the classifier in {d}: {err}") from None
    return model.to(device), classes
