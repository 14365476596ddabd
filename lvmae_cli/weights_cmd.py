"""`lvmae export hf` and `lvmae import`: the files around lvmae.hf's and lvmae.hf_import's pure conversions.

    lvmae export hf RUN/export --out hf-model [--num-classes 4]   # config.json, model.safetensors,
                                                                  # preprocessor_config.json
    lvmae export hf RUN/checkpoints/step-N --out hf-model        # any source train.pretrained reads
    lvmae export hf FINETUNE_RUN --out hf-classifier             # VideoMAEForVideoClassification
    lvmae import hf-model --out imported                         # a transformers VideoMAE directory
    lvmae import videomae_vitb.pth --out imported --frames 16    # an original VideoMAE checkpoint

An import is an lvmae export folder (model.safetensors + config.yaml) that `lvmae train mae
model.init_from=DIR`, `lvmae eval probe DIR` and `lvmae finetune` read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lvmae import hf, hf_import
from lvmae.config import ConfigError
from lvmae.errors import UserError
from lvmae.mae import MaskedVideoAutoencoder
from lvmae.weights import (
    CLASSES,
    MAE_CONFIG,
    MAE_WEIGHTS,
    load_classifier_options,
    replace_atomically,
    save_mae,
    write_text_atomically,
)
from train.pretrained import EXPORT, load_pretrained, locate

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_PROCESSOR = "preprocessor_config.json"


def export_hf(source: str, out: str, num_classes: int | None = None) -> list[str]:
    """Write a transformers VideoMAE folder for pretrained weights (an export, a run folder, a checkpoint,
    local or on object storage: train.pretrained) or a fine-tuned classifier's export; -> what was done,
    one line each."""
    kind, src, _ = locate(source)  # a URL is fetched once, here
    cfg, state, _ = load_pretrained(str(src))
    said = []
    try:
        if kind == EXPORT and (src / CLASSES).is_file():
            classes = json.loads((src / CLASSES).read_text())
            pooling = load_classifier_options(src)["pooling"]
            hf_state, hf_cfg = hf.classifier_to_hf(state, cfg, classes, pooling)
            said.append(
                f"VideoMAEForVideoClassification of the fine-tuned {len(classes)}-class classifier "
                "(pooling videomae: mean of the last block's tokens, fc_norm, classifier)"
            )
        elif num_classes is not None:
            hf_state, hf_cfg = hf.new_classifier_to_hf(state, cfg, num_classes)
            said.append(
                f"VideoMAEForVideoClassification with a freshly initialised {num_classes}-class head "
                "(fc_norm + classifier); the encoder's final norm is dropped, as VideoMAE fine-tuning does"
            )
        else:
            hf_state, hf_cfg = hf.encoder_to_hf(state, cfg)
            said.append("VideoMAEModel (use_mean_pooling false: last_hidden_state = lvmae's encoder output)")
        processor = hf.preprocessor_config(cfg)
    except (hf.ConversionError, ConfigError) as err:
        raise UserError(f"{src}: {err}") from None
    except ValueError as err:  # an unreadable classifier.json
        raise UserError(str(err)) from None
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in hf_state.items()}
    replace_atomically(d, HF_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_text_atomically(d / HF_PROCESSOR, json.dumps(processor, indent=2) + "\n")
    write_text_atomically(d / HF_CONFIG, json.dumps(hf_cfg, indent=2) + "\n")
    said.append(f"wrote {d / HF_CONFIG}, {d / HF_WEIGHTS}, {d / HF_PROCESSOR} (input_norm {cfg.input_norm})")
    return said


def check_export(source: str, hf_dir: str, clip: torch.Tensor) -> float:
    """Max abs difference between an lvmae export's encoder output and transformers' VideoMAEModel loaded
    from its `lvmae export hf` folder, on one uint8 clip (3, T, H, W), each through its own input path
    (lvmae: x / 255; transformers: the exported preprocessor). Needs the transformers package."""
    import transformers

    cfg, state, _ = load_pretrained(source)
    model = MaskedVideoAutoencoder(cfg)
    model.load_state_dict(state, strict=True)
    model.eval()
    theirs = transformers.VideoMAEModel.from_pretrained(hf_dir).eval()
    processor = transformers.VideoMAEImageProcessor.from_pretrained(hf_dir)
    frames = list(clip.permute(1, 2, 3, 0).numpy())  # T x (H, W, C) uint8
    pixels = processor(frames, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ours = model.encoder(clip[None].float() / 255)
        out = theirs(pixels).last_hidden_state
    return float((out - ours).abs().max())


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path, device="cpu")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors vary: one line, no traceback
        raise UserError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({type(err).__name__})"
        ) from None
    return hf_import.unwrap_checkpoint(obj)


def read_source(
    source: str, num_frames: int | None, img_size: int | None, num_heads: int | None
) -> tuple[dict[str, torch.Tensor], Any, list[str]]:
    """A transformers VideoMAE folder or an original checkpoint file -> (lvmae state, MAEConfig, notes)."""
    path = Path(source)
    if path.is_dir():
        if not (path / HF_CONFIG).is_file():
            raise UserError(f"{path} has no {HF_CONFIG}: not a transformers VideoMAE folder")
        weights = [path / n for n in (HF_WEIGHTS, "pytorch_model.bin") if (path / n).is_file()]
        if not weights:
            raise UserError(f"{path} has neither {HF_WEIGHTS} nor pytorch_model.bin")
        processor = json.loads((path / HF_PROCESSOR).read_text()) if (path / HF_PROCESSOR).is_file() else None
        state = _load_tensors(weights[0])
        config = json.loads((path / HF_CONFIG).read_text())
        return hf_import.hf_to_lvmae(state, config, processor, num_frames, img_size)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        raise UserError(
            f"{path}: expected a .pth, .pt, .bin or .safetensors checkpoint, or a transformers folder"
        )
    return hf_import.original_to_lvmae(_load_tensors(path), num_frames or 16, img_size or 224, num_heads)


def import_weights(
    source: str,
    out: str,
    num_frames: int | None = None,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> list[str]:
    """Convert and write an lvmae export folder; -> notes, one line each."""
    try:
        state, cfg, notes = read_source(source, num_frames, img_size, num_heads)
        cfg.validate()
    except (hf.ConversionError, ConfigError) as err:
        raise UserError(f"{source}: {err}") from None
    torch.manual_seed(0)
    model = MaskedVideoAutoencoder(cfg)
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (needs {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    unknown = sorted(set(state) - set(own))
    if wrong or unknown:
        raise UserError(f"{source}: weights do not fit the inferred model: {(wrong + unknown)[0]}")
    own.update(state)
    save_mae(own, cfg, out)
    v, e = cfg.video, cfg.encoder
    notes.append(
        f"wrote {Path(out) / MAE_WEIGHTS} and {MAE_CONFIG}: encoder {e.embed_dim}/{e.depth}/{e.num_heads}, "
        f"{v.num_frames} frames of {v.img_size} px, tubelet {v.tubelet_size}x{v.patch_size}, "
        f"input_norm {cfg.input_norm}"
    )
    return notes


def cmd_export_hf(args: argparse.Namespace) -> int:
    for line in export_hf(args.source, args.out, args.num_classes):
        print(line)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    for line in import_weights(args.source, args.out, args.frames, args.size, args.heads):
        print(line)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`lvmae export hf` and `lvmae import`."""
    export = sub.add_parser("export", help="write lvmae weights in another library's layout")
    fmt = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    p = fmt.add_parser("hf", help="a transformers VideoMAE folder (docs/weights.md)")
    p.add_argument(
        "source", help="an lvmae export (RUN/export), its run folder, or a checkpoint (local or a URL)"
    )
    p.add_argument("--out", required=True, help="the transformers folder to write")
    p.add_argument("--num-classes", type=int, help="VideoMAEForVideoClassification with a fresh head")
    p.set_defaults(func=cmd_export_hf)
    imp = sub.add_parser(
        "import", help="VideoMAE weights (transformers folder or original checkpoint) -> lvmae"
    )
    imp.add_argument("source", help="a transformers VideoMAE folder, or an original .pth / .safetensors")
    imp.add_argument("--out", required=True, help="the lvmae export folder to write")
    imp.add_argument("--frames", type=int, help="clip length (default: the config's, or 16)")
    imp.add_argument("--size", type=int, help="clip side in pixels (default: the config's, or 224)")
    imp.add_argument("--heads", type=int, help="attention heads, for a non-standard width")
    imp.set_defaults(func=cmd_import)
