"""transformers' VideoMAE and the original VideoMAE / VideoMAE V2 checkpoints into lvmae (pure).

    state, cfg, notes = hf_to_lvmae(hf_state, hf_cfg, processor)   # a transformers VideoMAE -> lvmae
    state, cfg, notes = original_to_lvmae(pth_state, num_frames=16, img_size=224)
    state = unwrap_checkpoint(torch.load(path, weights_only=True))  # the flat state of a release

Every function maps tensors and dicts only; reading files is `lvmae import`'s (lvmae_cli.weights_cmd).
The mapping rules are lvmae.hf's (and docs/weights.md): q, k and v become one qkv linear with a zero key
bias; the final norm is lvmae's; sizes come from the shapes, the clip from the config or the caller.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from lvmae.config import IMAGENET_MEAN, IMAGENET_STD, MODEL_PRESETS, MAEConfig
from lvmae.hf import BLOCKS, ENC, LN_EPS, ConversionError, Tensors, block_count, take

# Standard ViT widths -> attention heads (S, B, L, H, and VideoMAE V2's g): checkpoints do not store heads.
STANDARD_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}
# VideoMAE / VideoMAE V2 decoder widths -> heads; a decoder of another width is not imported.
DECODER_HEADS = {192: 3, 384: 6, 512: 8, 640: 8}


def _lvmae_block(
    q_w: torch.Tensor,
    k_w: torch.Tensor,
    v_w: torch.Tensor,
    q_b: torch.Tensor | None,
    k_b: torch.Tensor | None,
    v_b: torch.Tensor | None,
    rest: Tensors,
    d: str,
) -> Tensors:
    """q, k, v (each with an optional bias) and the other tensors (lvmae names) -> one lvmae block (prefix d)."""
    out = {d + "attn.qkv.weight": torch.cat([q_w, k_w, v_w], dim=0)}
    if q_b is not None or v_b is not None:
        zeros = torch.zeros(q_w.shape[0], dtype=q_w.dtype)
        parts = [b if b is not None else zeros for b in (q_b, k_b, v_b)]
        out[d + "attn.qkv.bias"] = torch.cat(parts)
    out.update({d + k: v for k, v in rest.items()})
    return out


def _block_from_hf(src: Tensors, s: str, d: str) -> Tensors:
    a = s + "attention.attention."
    rest = {
        "attn.proj.weight": take(src, s + "attention.output.dense.weight", "transformers layer"),
        "attn.proj.bias": src[s + "attention.output.dense.bias"],
        "norm1.weight": src[s + "layernorm_before.weight"],
        "norm1.bias": src[s + "layernorm_before.bias"],
        "norm2.weight": src[s + "layernorm_after.weight"],
        "norm2.bias": src[s + "layernorm_after.bias"],
        "mlp.fc1.weight": src[s + "intermediate.dense.weight"],
        "mlp.fc1.bias": src[s + "intermediate.dense.bias"],
        "mlp.fc2.weight": src[s + "output.dense.weight"],
        "mlp.fc2.bias": src[s + "output.dense.bias"],
    }
    bias = {
        n: src.get(a + f"{n}_bias", src.get(a + f"{name}.bias"))
        for n, name in (("q", "query"), ("v", "value"))
    }
    return _lvmae_block(
        take(src, a + "query.weight", "transformers layer"),
        src[a + "key.weight"],
        src[a + "value.weight"],
        bias["q"],
        src.get(a + "key.bias"),
        bias["v"],
        rest,
        d,
    )


def _block_from_original(src: Tensors, s: str, d: str) -> Tensors:
    """An original VideoMAE block (norm1, attn.qkv + q_bias/v_bias, attn.proj, norm2, mlp) -> lvmae."""
    q_w, k_w, v_w = take(src, s + "attn.qkv.weight", "VideoMAE block").chunk(3, dim=0)
    if s + "attn.qkv.bias" in src:
        q_b, k_b, v_b = src[s + "attn.qkv.bias"].chunk(3)
    else:
        q_b, k_b, v_b = src.get(s + "attn.q_bias"), None, src.get(s + "attn.v_bias")
    names = ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2")
    rest = {f"{n}.{p}": take(src, f"{s}{n}.{p}", "VideoMAE block") for n in names for p in ("weight", "bias")}
    return _lvmae_block(q_w, k_w, v_w, q_b, k_b, v_b, rest, d)


def _preset_for(dim: int, depth: int, heads: int) -> str:
    for name, (enc, _dec) in MODEL_PRESETS.items():
        if enc == (dim, depth, heads):
            return name
    return "base"  # explicit sizes below override the preset's


def _heads(dim: int, num_heads: int | None, what: str) -> int:
    if num_heads is None:
        if dim not in STANDARD_HEADS:
            raise ConversionError(
                f"{what} width {dim} is not a standard ViT width ({', '.join(map(str, STANDARD_HEADS))}): "
                "give its number of attention heads (--heads)"
            )
        num_heads = STANDARD_HEADS[dim]
    if dim % num_heads:
        raise ConversionError(f"{what} width {dim} is not divisible by {num_heads} heads")
    return num_heads


def build_config(
    *,
    dim: int,
    depth: int,
    heads: int,
    mlp_hidden: int,
    qkv_bias: bool,
    tubelet: int,
    patch: int,
    channels: int,
    num_frames: int,
    img_size: int,
    input_norm: str,
    decoder: tuple[int, int, int, int] | None = None,
) -> MAEConfig:
    """An MAEConfig for imported weights: the preset whose encoder matches (else `base`) with every size
    explicit, VideoMAE's positions and the given input normalization; decoder: (dim, depth, heads, mlp)."""
    cfg = MAEConfig(preset=_preset_for(dim, depth, heads))
    v = cfg.video
    v.num_frames, v.img_size, v.in_chans, v.tubelet_size, v.patch_size = (
        num_frames,
        img_size,
        channels,
        tubelet,
        patch,
    )
    e = cfg.encoder
    e.embed_dim, e.depth, e.num_heads, e.mlp_ratio, e.qkv_bias = dim, depth, heads, mlp_hidden / dim, qkv_bias
    if decoder is not None:
        d = cfg.decoder
        d.embed_dim, d.depth, d.num_heads, d.mlp_ratio = (
            decoder[0],
            decoder[1],
            decoder[2],
            decoder[3] / decoder[0],
        )
    cfg.pos_embed, cfg.input_norm = "videomae_1d", input_norm
    return cfg.resolved()


def _input_norm_from_processor(processor: dict[str, Any] | None) -> tuple[str, list[str]]:
    if processor is None:
        return "imagenet", ["no preprocessor config: input_norm imagenet, as VideoMAE was trained"]
    if not processor.get("do_normalize", True):
        return "none", []
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if (
        mean is not None
        and std is not None
        and not (
            all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(mean, IMAGENET_MEAN))
            and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(std, IMAGENET_STD))
        )
    ):
        raise ConversionError(
            f"the preprocessor normalizes with mean {mean} std {std}; lvmae's input_norm knows only "
            "ImageNet's statistics (imagenet) or none"
        )
    return "imagenet", []


def _strip(state: Tensors, prefix: str) -> Tensors:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def hf_to_lvmae(
    state: Tensors,
    config: dict[str, Any],
    processor: dict[str, Any] | None = None,
    num_frames: int | None = None,
    img_size: int | None = None,
) -> tuple[Tensors, MAEConfig, list[str]]:
    """A transformers VideoMAE state (VideoMAEModel, or videomae.* of a task model) and its config.json
    -> (lvmae MAE state with encoder.* keys, and decoder ones for VideoMAEForPreTraining; MAEConfig; notes).

    q, k and v are concatenated into qkv with a zero key bias; the final `layernorm` becomes lvmae's final
    norm (a unit-scale, zero-shift norm when the model mean-pools and has none: lvmae's tokens are then
    the normalized ones). The clip length and size default to the config's: positions are recomputed.
    """
    notes: list[str] = []
    if config.get("model_type", "videomae") != "videomae":
        raise ConversionError(f"config.json model_type is {config.get('model_type')!r}, not 'videomae'")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r}: lvmae's MLP uses exact GELU")
    eps = float(config.get("layer_norm_eps", 1e-12))
    if eps != LN_EPS:
        notes.append(f"layer_norm_eps {eps:g} becomes lvmae's 1e-6 (features differ at that level)")
    enc = _strip(state, "videomae.")
    dim, depth = int(config["hidden_size"]), int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    found = block_count(enc, "encoder.layer.")
    if found != depth:
        raise ConversionError(f"config.json says {depth} layers, the weights hold {found}")
    out = {
        ENC + "patch_embed.proj.weight": take(
            enc, "embeddings.patch_embeddings.projection.weight", "transformers"
        ),
        ENC + "patch_embed.proj.bias": take(
            enc, "embeddings.patch_embeddings.projection.bias", "transformers"
        ),
    }
    for i in range(depth):
        out.update(_block_from_hf(enc, f"encoder.layer.{i}.", f"{ENC}{BLOCKS}{i}."))
    if "layernorm.weight" in enc:
        out[ENC + "transformer.norm.weight"] = enc["layernorm.weight"]
        out[ENC + "transformer.norm.bias"] = enc["layernorm.bias"]
    else:
        out[ENC + "transformer.norm.weight"] = torch.ones(dim)
        out[ENC + "transformer.norm.bias"] = torch.zeros(dim)
        notes.append(
            "no final layernorm (use_mean_pooling): lvmae's final norm is set to unit scale, zero shift"
        )
    if "fc_norm.weight" in state or "classifier.weight" in state:
        notes.append("fc_norm and classifier are not imported (encoder only)")
    w = out[ENC + "patch_embed.proj.weight"]
    decoder = None
    if "decoder.decoder_layers.0.layernorm_before.weight" in state:
        dd = state["decoder.norm.weight"].shape[0]
        ddepth = block_count(state, "decoder.decoder_layers.")
        dheads = int(config.get("decoder_num_attention_heads", DECODER_HEADS.get(dd, 0)))
        dmlp = state["decoder.decoder_layers.0.intermediate.dense.weight"].shape[0]
        decoder = (dd, ddepth, dheads, dmlp)
        out["decoder_embed.weight"] = state["encoder_to_decoder.weight"]
        out["decoder_embed.bias"] = state.get("encoder_to_decoder.bias", torch.zeros(dd))
        out["mask_token"] = state["mask_token"]
        for i in range(ddepth):
            out.update(_block_from_hf(state, f"decoder.decoder_layers.{i}.", f"decoder.blocks.{i}."))
        out["decoder.norm.weight"], out["decoder.norm.bias"] = (
            state["decoder.norm.weight"],
            state["decoder.norm.bias"],
        )
        out["head.weight"], out["head.bias"] = state["decoder.head.weight"], state["decoder.head.bias"]
        notes.append("decoder imported (transformers' decoder norm has eps 1e-5, lvmae's 1e-6)")
    input_norm, more = _input_norm_from_processor(processor)
    notes += more
    size = config["image_size"]
    cfg = build_config(
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_hidden=int(config["intermediate_size"]),
        qkv_bias=bool(config.get("qv_bias", config.get("qkv_bias", True))),
        tubelet=int(w.shape[2]),
        patch=int(w.shape[3]),
        channels=int(w.shape[1]),
        num_frames=num_frames or int(config["num_frames"]),
        img_size=img_size or int(size if isinstance(size, int) else size[0]),
        input_norm=input_norm,
        decoder=decoder,
    )
    return _fit_decoder(out, cfg, notes), cfg, notes


def unwrap_checkpoint(obj: Any) -> Tensors:
    """A loaded original checkpoint -> its flat state dict (under "model", "module" or "state_dict" in many
    releases; DistributedDataParallel's "module." key prefix removed)."""
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError("not a state dict of tensors (nor one under 'model', 'module' or 'state_dict')")
    return _strip(dict(obj), "module.")


def original_to_lvmae(
    state: Tensors,
    num_frames: int = 16,
    img_size: int = 224,
    num_heads: int | None = None,
    input_norm: str = "imagenet",
) -> tuple[Tensors, MAEConfig, list[str]]:
    """An original VideoMAE / VideoMAE V2 state (pretraining layout: encoder.* / decoder.*; fine-tuned
    layout: patch_embed, blocks, fc_norm, head) -> (lvmae MAE state, MAEConfig, notes).

    Sizes come from the shapes: width and tubelet from the Conv3d kernel, depth from the blocks, heads
    from `num_heads` or the standard ViT table; the clip length and size are not stored and are given.
    The decoder is imported when it has lvmae's structure and predicts tubelet pixels.
    """
    notes: list[str] = []
    pretraining = "encoder.patch_embed.proj.weight" in state
    if pretraining:
        enc = _strip(state, "encoder.")
    elif "patch_embed.proj.weight" in state:
        enc = state
        notes.append("fine-tuned layout: encoder only (fc_norm and head are not imported)")
    else:
        raise ConversionError(
            "unknown layout: neither encoder.patch_embed.proj.weight (VideoMAE pretraining) nor "
            "patch_embed.proj.weight (VideoMAE fine-tuned) is in the checkpoint"
        )
    w = enc["patch_embed.proj.weight"]
    if w.ndim != 5 or w.shape[3] != w.shape[4]:
        raise ConversionError(
            f"patch_embed.proj.weight has shape {tuple(w.shape)}, not a square-tubelet Conv3d"
        )
    dim, depth = int(w.shape[0]), block_count(enc, "blocks.")
    heads = _heads(dim, num_heads, "encoder")
    out = {ENC + "patch_embed.proj.weight": w, ENC + "patch_embed.proj.bias": enc["patch_embed.proj.bias"]}
    for i in range(depth):
        out.update(_block_from_original(enc, f"blocks.{i}.", f"{ENC}{BLOCKS}{i}."))
    if "norm.weight" in enc:
        out[ENC + "transformer.norm.weight"], out[ENC + "transformer.norm.bias"] = (
            enc["norm.weight"],
            enc["norm.bias"],
        )
    else:
        out[ENC + "transformer.norm.weight"], out[ENC + "transformer.norm.bias"] = (
            torch.ones(dim),
            torch.zeros(dim),
        )
        notes.append(
            "no final norm (mean-pooling layout): lvmae's final norm is set to unit scale, zero shift"
        )
    decoder = None
    has_decoder = pretraining and "decoder.blocks.0.attn.qkv.weight" in state
    dd = int(state["decoder.blocks.0.norm1.weight"].shape[0]) if has_decoder else 0
    if has_decoder and dd not in DECODER_HEADS:
        notes.append(f"decoder width {dd} has no standard head count: encoder only")
    elif has_decoder:
        mlp = int(state["decoder.blocks.0.mlp.fc1.weight"].shape[0])
        decoder = (dd, block_count(state, "decoder.blocks."), DECODER_HEADS[dd], mlp)
        out["decoder_embed.weight"] = state["encoder_to_decoder.weight"]
        out["decoder_embed.bias"] = state.get("encoder_to_decoder.bias", torch.zeros(dd))
        out["mask_token"] = state["mask_token"]
        for i in range(decoder[1]):
            out.update(_block_from_original(state, f"decoder.blocks.{i}.", f"decoder.blocks.{i}."))
        out["decoder.norm.weight"], out["decoder.norm.bias"] = (
            state["decoder.norm.weight"],
            state["decoder.norm.bias"],
        )
        out["head.weight"], out["head.bias"] = state["decoder.head.weight"], state["decoder.head.bias"]
    qkv_bias = "blocks.0.attn.q_bias" in enc or "blocks.0.attn.qkv.bias" in enc
    cfg = build_config(
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_hidden=int(enc["blocks.0.mlp.fc1.weight"].shape[0]),
        qkv_bias=qkv_bias,
        tubelet=int(w.shape[2]),
        patch=int(w.shape[3]),
        channels=int(w.shape[1]),
        num_frames=num_frames,
        img_size=img_size,
        input_norm=input_norm,
        decoder=decoder,
    )
    return _fit_decoder(out, cfg, notes), cfg, notes


def _fit_decoder(state: Tensors, cfg: MAEConfig, notes: list[str]) -> Tensors:
    """Keep the decoder tensors only if they are exactly what lvmae's decoder for `cfg` holds."""
    from lvmae.mae import MaskedVideoAutoencoder

    dec = {k: v for k, v in state.items() if not k.startswith(ENC)}
    if not dec:
        notes.append("no decoder in the checkpoint: encoder only (lvmae's decoder starts from its init)")
        return state
    probe = copy.deepcopy(cfg)
    with torch.device("meta"):
        want = {
            k: tuple(v.shape)
            for k, v in MaskedVideoAutoencoder(probe).state_dict().items()
            if not k.startswith(ENC)
        }
    if {k: tuple(v.shape) for k, v in dec.items()} == want:
        return state
    notes.append("the decoder does not have lvmae's structure (or predicts other targets): encoder only")
    return {k: v for k, v in state.items() if k.startswith(ENC)}
