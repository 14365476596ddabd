"""lvmae weights to transformers' VideoMAE (pure), and what both directions share; lvmae.hf_import is the
way back (transformers and the original VideoMAE / VideoMAE V2 checkpoints into lvmae).

    hf_state, hf_cfg = encoder_to_hf(mae_state, mae_cfg)          # -> VideoMAEModel (config.json dict)
    hf_state, hf_cfg = new_classifier_to_hf(mae_state, mae_cfg, 4)  # -> VideoMAEForVideoClassification
    hf_state, hf_cfg = classifier_to_hf(clf_state, clf_cfg, classes, "videomae")  # a fine-tuned one, too
    processor = preprocessor_config(mae_cfg)                       # -> preprocessor_config.json dict

Every function maps tensors and dicts only; reading and writing files is `lvmae export hf`'s
(lvmae_cli.weights_cmd). What maps and what does not (docs/weights.md):

- Attention: lvmae packs q, k and v in one `qkv` linear with a bias on each; transformers and the original
  VideoMAE hold biases for q and v only. Dropping the key bias is exact: it adds q . b_k to every score of
  one query, a constant along the softmax's row, which the softmax ignores. Imported models get a zero key
  bias.
- Positions: transformers adds VideoMAE's 1-D sinusoid table over the flattened token index; only an
  encoder with `model.pos_embed: videomae_1d` computes the same, so `sincos_3d` encoders are refused.
- LayerNorm eps: lvmae's are 1e-6 (VideoMAE's training value); exports say so in `layer_norm_eps`.
- Final norm: VideoMAEModel applies its `layernorm` only with use_mean_pooling=False, which is how encoders
  are exported (features = lvmae's encoder output). A classification export needs use_mean_pooling=True,
  where transformers has no per-token final norm: a fresh head on a pretrained encoder drops the final
  norm, as VideoMAE's own fine-tuning does; a fine-tuned classifier maps exactly when it was trained with
  `finetune.pooling: videomae` (no final norm, fc_norm eps 1e-5 as in transformers), and one trained with
  `norm_mean` (final norm on every token, then the mean) is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from lvmae.config import IMAGENET_MEAN, IMAGENET_STD, MAEConfig

LN_EPS = 1e-6
ENC = "encoder."
BLOCKS = "transformer.blocks."

Tensors = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """The weights cannot be converted exactly (or are not a layout this module knows); says why."""


def encoder_state(state: Tensors) -> Tensors:
    """The encoder's tensors of a MaskedVideoAutoencoder state (encoder.* keys) or of a VideoViT state."""
    if any(k.startswith(ENC + "patch_embed.") for k in state):
        return {k[len(ENC) :]: v for k, v in state.items() if k.startswith(ENC)}
    return dict(state)


def take(src: Tensors, key: str, where: str) -> torch.Tensor:
    if key not in src:
        raise ConversionError(f"{where}: missing tensor {key!r}")
    return src[key]


def block_count(keys: Any, prefix: str) -> int:
    """Number of blocks `prefix{i}.` present (0..n-1)."""
    ids = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise ConversionError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(ids)[:8]}")
    return len(ids)


def _block_to_hf(src: Tensors, s: str, d: str) -> Tensors:
    """One lvmae block (prefix s) -> transformers VideoMAELayer tensors (prefix d); the key bias is dropped."""
    qkv_w = take(src, s + "attn.qkv.weight", "lvmae block")
    q_w, k_w, v_w = qkv_w.chunk(3, dim=0)
    out = {
        d + "attention.attention.query.weight": q_w,
        d + "attention.attention.key.weight": k_w,
        d + "attention.attention.value.weight": v_w,
        d + "attention.output.dense.weight": src[s + "attn.proj.weight"],
        d + "attention.output.dense.bias": src[s + "attn.proj.bias"],
        d + "layernorm_before.weight": src[s + "norm1.weight"],
        d + "layernorm_before.bias": src[s + "norm1.bias"],
        d + "layernorm_after.weight": src[s + "norm2.weight"],
        d + "layernorm_after.bias": src[s + "norm2.bias"],
        d + "intermediate.dense.weight": src[s + "mlp.fc1.weight"],
        d + "intermediate.dense.bias": src[s + "mlp.fc1.bias"],
        d + "output.dense.weight": src[s + "mlp.fc2.weight"],
        d + "output.dense.bias": src[s + "mlp.fc2.bias"],
    }
    if s + "attn.qkv.bias" in src:
        q_b, _k_b, v_b = src[s + "attn.qkv.bias"].chunk(3)
        out[d + "attention.attention.q_bias"] = q_b
        out[d + "attention.attention.v_bias"] = v_b
    return out


def hf_config(cfg: MAEConfig, use_mean_pooling: bool, classes: list[str] | None = None) -> dict[str, Any]:
    """The VideoMAEConfig (config.json) of an lvmae encoder; with classes, a classification config."""
    cfg = cfg.resolved()
    v, e = cfg.video, cfg.encoder
    out: dict[str, Any] = {
        "model_type": "videomae",
        "architectures": ["VideoMAEForVideoClassification" if classes is not None else "VideoMAEModel"],
        "image_size": v.img_size,
        "patch_size": v.patch_size,
        "num_channels": v.in_chans,
        "num_frames": v.num_frames,
        "tubelet_size": v.tubelet_size,
        "hidden_size": e.embed_dim,
        "num_hidden_layers": e.depth,
        "num_attention_heads": e.num_heads,
        "intermediate_size": int(e.embed_dim * e.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": LN_EPS,
        "qkv_bias": bool(e.qkv_bias),
        "use_mean_pooling": use_mean_pooling,
    }
    if classes is not None:
        out["id2label"] = {str(i): c for i, c in enumerate(classes)}
        out["label2id"] = {c: i for i, c in enumerate(classes)}
    return out


def check_exportable(cfg: MAEConfig) -> None:
    """Raise ConversionError unless transformers computes what this lvmae encoder computes."""
    pos = cfg.pos_embed
    if pos != "videomae_1d":
        raise ConversionError(
            f"model.pos_embed is {pos!r}: transformers' VideoMAE adds the 1-D sinusoid table over the token "
            "index (model.pos_embed=videomae_1d), so this encoder's features cannot be reproduced there"
        )
    e = cfg.resolved().encoder
    if float(e.embed_dim * e.mlp_ratio) != int(e.embed_dim * e.mlp_ratio):
        raise ConversionError(f"model.encoder.mlp_ratio {e.mlp_ratio} gives a fractional MLP width")


def _blocks_to_hf(state: Tensors, cfg: MAEConfig, prefix: str) -> Tensors:
    """The embedding and blocks of an lvmae encoder (MAE, VideoViT or VideoClassifier state) -> transformers
    names under `prefix`; the final norm is the caller's."""
    check_exportable(cfg)
    src = encoder_state(state)
    depth = cfg.resolved().encoder.depth
    out = {
        prefix + "embeddings.patch_embeddings.projection.weight": take(
            src, "patch_embed.proj.weight", "lvmae"
        ),
        prefix + "embeddings.patch_embeddings.projection.bias": take(src, "patch_embed.proj.bias", "lvmae"),
    }
    if block_count(src, BLOCKS) != depth:
        raise ConversionError(f"the state has {block_count(src, BLOCKS)} blocks, the config {depth}")
    for i in range(depth):
        out.update(_block_to_hf(src, f"{BLOCKS}{i}.", f"{prefix}encoder.layer.{i}."))
    return out


def encoder_to_hf(state: Tensors, cfg: MAEConfig, prefix: str = "") -> tuple[Tensors, dict[str, Any]]:
    """An lvmae encoder (MAE state or VideoViT state) -> (VideoMAEModel state, config.json dict).

    use_mean_pooling=False, so VideoMAEModel's last_hidden_state is lvmae's encoder output (the final
    `layernorm` is lvmae's final norm). `prefix` ("videomae.") nests the state for a task model.
    """
    out = _blocks_to_hf(state, cfg, prefix)
    src = encoder_state(state)
    out[prefix + "layernorm.weight"] = take(src, "transformer.norm.weight", "lvmae")
    out[prefix + "layernorm.bias"] = take(src, "transformer.norm.bias", "lvmae")
    return out, hf_config(cfg, use_mean_pooling=False)


def _class_names(classes: list[str] | None, num_classes: int) -> list[str]:
    names = list(classes) if classes is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ConversionError(f"{len(names)} class names for {num_classes} classes")
    return names


def new_classifier_to_hf(
    state: Tensors, cfg: MAEConfig, num_classes: int, seed: int = 0, classes: list[str] | None = None
) -> tuple[Tensors, dict[str, Any]]:
    """A pretrained encoder + a freshly initialised head -> VideoMAEForVideoClassification (state, config).

    use_mean_pooling=True: transformers then has no per-token final norm, so the encoder's final norm is
    dropped (as VideoMAE drops its pretrained `encoder.norm` when fine-tuning); fc_norm starts at unit
    scale and zero shift, the classifier at trunc-normal(0.02) weights and zero biases (lvmae's init).
    """
    names = _class_names(classes, num_classes)
    hf = _blocks_to_hf(state, cfg, prefix="videomae.")
    dim = cfg.resolved().encoder.embed_dim
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(num_classes, dim)
    torch.nn.init.trunc_normal_(weight, std=0.02, generator=gen)
    hf.update(
        {
            "fc_norm.weight": torch.ones(dim),
            "fc_norm.bias": torch.zeros(dim),
            "classifier.weight": weight,
            "classifier.bias": torch.zeros(num_classes),
        }
    )
    return hf, hf_config(cfg, use_mean_pooling=True, classes=names)


def classifier_to_hf(
    state: Tensors, cfg: MAEConfig, classes: list[str], pooling: str
) -> tuple[Tensors, dict[str, Any]]:
    """A fine-tuned lvmae VideoClassifier -> VideoMAEForVideoClassification (state, config.json dict).

    Pooling `videomae` (lvmae.heads.VideoClassifier) is that model with use_mean_pooling=True: the mean of
    the last block's tokens (the classifier has no final norm), fc_norm (eps 1e-5 on both sides), then the
    linear head, which becomes `classifier`. Pooling `norm_mean` is refused: it normalizes every token
    (the encoder's final norm) before the mean, which transformers' mean-pooling model has no place for,
    and with use_mean_pooling=False it classifies the first token instead of the mean.
    """
    if pooling != "videomae":
        raise ConversionError(
            f"this classifier was fine-tuned with pooling {pooling!r}: it normalizes every token (the "
            "encoder's final norm) before mean pooling, and VideoMAEForVideoClassification has no such norm "
            "when it mean-pools, so its logits would differ. Fine-tune with finetune.pooling=videomae "
            "(the default), or export the pretrained encoder with --num-classes and fine-tune in transformers"
        )
    if "encoder.transformer.norm.weight" in state:
        raise ConversionError(
            "the classifier says pooling 'videomae' but its weights hold the encoder's final norm "
            "(encoder.transformer.norm), which only 'norm_mean' classifiers have"
        )
    head = take(state, "head.weight", "lvmae classifier")
    names = _class_names(classes, head.shape[0])
    hf = _blocks_to_hf(state, cfg, prefix="videomae.")
    hf.update(
        {
            "fc_norm.weight": take(state, "fc_norm.weight", "lvmae classifier"),
            "fc_norm.bias": take(state, "fc_norm.bias", "lvmae classifier"),
            "classifier.weight": head,
            "classifier.bias": take(state, "head.bias", "lvmae classifier"),
        }
    )
    return hf, hf_config(cfg, use_mean_pooling=True, classes=names)


def preprocessor_config(cfg: MAEConfig) -> dict[str, Any]:
    """VideoMAEImageProcessor settings that turn uint8 frames into what the exported encoder expects.

    Frames are rescaled by 1/255; with `model.input_norm: imagenet` they are then normalized with
    ImageNet's mean and std (what lvmae's encoder does inside its forward), with `none` they are not.
    Resizing the shorter side to the clip size and center-cropping it leave clips of that size unchanged
    and bring other sizes to it.
    """
    cfg = cfg.resolved()
    size = cfg.video.img_size
    norm = cfg.input_norm
    if norm not in ("none", "imagenet"):
        raise ConversionError(f"model.input_norm {norm!r} has no VideoMAEImageProcessor equivalent")
    return {
        "image_processor_type": "VideoMAEImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 2,  # bilinear
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": norm == "imagenet",
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
