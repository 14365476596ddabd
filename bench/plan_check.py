"""`lvmae plan` against measurement on this machine: activations and model state, ViT-B.

1. Activations: for 16 to 128 frames and decoder `all`, 0.5 and 0.15 (ViT-B, 224 px, batch 1, pixel
   targets, fp32; the grid of bench/fig1_memory.py), the plan's saved-for-backward bytes
   (train.activations.activation_bytes, counted on the meta device) against the bytes autograd really saves in one
   CPU step (fig1_memory.saved_tensor_bytes), each point in a fresh process. Also with activation
   checkpointing, at 128 frames.
2. Model state: a real one-rank DeepSpeed engine (the recipe's config from train.engine) on the CPU for
   ZeRO stages 0-3 in fp32 and bf16, preset `small`: the bytes of every tensor alive after two training
   steps (found through the garbage collector, each storage once, less what was alive before the engine)
   against the plan's state at rest (weights + optimizer, and at stage 3 its float32 gradient partitions).

On a GPU, bench/gpu_check.sh compares the whole step's plan with torch.cuda.max_memory_allocated.
Writes bench/results/plan_check_cpu.json and prints two markdown tables.

    .venv/bin/python bench/plan_check.py                      # both parts, about 5 minutes on 2 cores
    .venv/bin/python bench/plan_check.py --skip-state --frames 16 32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

import torch  # noqa: E402
from fig1_memory import build, decoder_setting, result_row, save_runs, saved_tensor_bytes, train_step  # noqa: E402

GIB = 2**30


def activation_case(frames: int, decoder: str, checkpointing: bool) -> dict:
    """One grid point in this (fresh) process: predicted and measured saved bytes of a ViT-B step."""
    from train.activations import activation_bytes

    cfg, model, video, plan = build("base", frames, decoder, torch.device("cpu"))
    predicted = activation_bytes(cfg, 1, torch.float32).saved(checkpointing)
    if checkpointing:
        for transformer in (model.encoder.transformer, model.decoder):
            transformer.grad_checkpointing = True
    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    measured = saved_tensor_bytes(lambda: train_step(cfg, model, video, plan, False), state)
    return {
        "frames": frames,
        "decoder": decoder,
        "checkpointing": checkpointing,
        "visible": plan.num_visible,
        "decoded": plan.num_selected,
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "ratio": predicted / measured,
    }


def live_tensor_bytes() -> dict[int, int]:
    """Every tensor storage reachable through the garbage collector (with ZeRO-3's partition tensors and
    parameters' .grad): data pointer -> bytes."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj):
                continue
            for t in (obj, getattr(obj, "ds_tensor", None), getattr(obj, "grad", None)):
                if t is not None and t.device.type == "cpu" and t.untyped_storage().nbytes():
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, ReferenceError):  # placeholders and freed storages
            continue
    return seen


def state_case(stage: int, precision: str) -> dict:
    """A one-rank engine of preset `small`, two steps on random clips; -> live state bytes and the plan's."""
    from train.config import load_train_config
    from train.engine import build_engine, init_distributed, model_init_context
    from train.memory import state_bytes
    from train.tasks import MAETask

    overrides = ["data.url=unused", "data.tokens=unused", "model.preset=small", "model.target.kind=pixels"]
    overrides += ["model.masking.decoder=random", f"run.zero_stage={stage}", f"run.precision={precision}"]
    cfg = load_train_config([REPO / "configs/demo_cpu.yaml"], overrides)
    init_distributed()
    before = live_tensor_bytes()
    task = MAETask(cfg)
    with model_init_context(cfg):
        model = task.build_model()
    n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    engine, _, _ = build_engine(model, cfg, world_size=1)
    v = task.model_cfg.video
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    video = torch.rand(2, 3, v.num_frames, v.img_size, v.img_size).to(dtype)
    for i in range(2):
        loss = task.loss(engine, {}, video, torch.Generator().manual_seed(i), i)
        engine.backward(loss)
        engine.step()
    del loss
    gc.collect()
    live = live_tensor_bytes()
    measured = sum(n for ptr, n in live.items() if ptr not in before) - video.untyped_storage().nbytes()
    plan = state_bytes(n_params, precision, stage, 1)
    # At rest (after the step) the gradients are gone, except ZeRO-3's float32 partitions.
    at_rest = plan["weights"] + plan["optimizer"] + (4 * n_params if stage == 3 else 0)
    return {
        "zero_stage": stage,
        "precision": precision,
        "params": n_params,
        "measured_bytes": measured,
        "measured_bytes_per_param": measured / n_params,
        "predicted_at_rest_bytes": at_rest,
        "predicted_at_rest_per_param": at_rest / n_params,
        "predicted_peak_state_bytes": sum(plan.values()),
        "ratio": at_rest / measured,
    }


def child(args: argparse.Namespace) -> None:
    kind, *rest = args.child
    if kind == "act":
        row = activation_case(int(rest[0]), rest[1], rest[2] == "ckpt")
    else:
        row = state_case(int(rest[0]), rest[1])
    print("RESULT " + json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--decoder", nargs="+", type=decoder_setting, default=["all", "0.5", "0.15"])
    p.add_argument("--skip-state", action="store_true", help="activations only")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    me = [sys.executable, __file__, "--child"]
    acts = []
    cases = [(f, d, False) for f in args.frames for d in args.decoder] + [(max(args.frames), "0.15", True)]
    for frames, decoder, ckpt in cases:
        print(
            f"activations: {frames} frames, decoder {decoder}{', checkpointing' if ckpt else ''}", flush=True
        )
        acts.append(
            result_row([*me, "act", str(frames), decoder, "ckpt" if ckpt else "-"], "activation case")
        )
    states = []
    if not args.skip_state:
        port = 29700
        for stage in (0, 1, 2, 3):
            for precision in ("fp32", "bf16"):
                print(f"state: ZeRO-{stage} {precision}", flush=True)
                env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}
                env |= {"WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
                port += 1
                states.append(result_row([*me, "state", str(stage), precision], "state case", env=env))
    path = save_runs(args.out, "plan_check", acts, state=states)
    print("\n| frames | decoder | checkpointing | predicted (GiB) | measured (GiB) | predicted / measured |")
    print("|---:|---|---|---:|---:|---:|")
    for r in acts:
        print(
            f"| {r['frames']} | {r['decoder']} | {'yes' if r['checkpointing'] else 'no'} "
            f"| {r['predicted_bytes'] / GIB:.4f} | {r['measured_bytes'] / GIB:.4f} | {r['ratio']:.4f} |"
        )
    if states:
        print(
            "\n| ZeRO | precision | measured (B/param) | plan at rest (B/param) | plan / measured "
            "| plan's peak state (B/param) |"
        )
        print("|---:|---|---:|---:|---:|---:|")
        for r in states:
            print(
                f"| {r['zero_stage']} | {r['precision']} | {r['measured_bytes_per_param']:.2f} "
                f"| {r['predicted_at_rest_per_param']:.2f} | {r['ratio']:.3f} "
                f"| {r['predicted_peak_state_bytes'] / r['params']:.2f} |"
            )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
