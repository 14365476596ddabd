"""Training config, learning-rate schedule, DeepSpeed config, and a real ZeRO-3 engine on CPU.

The engine test runs in a subprocess (this file, as a script) so that its process group does not leak
into other tests. DeepSpeed JIT-compiles a comm op on first use (about 30 s); it is cached under the
repository's .cache/torch_extensions, so later runs skip it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from lvmae.config import ConfigError
from lvmae.tokenizer_config import check_tokenizer_matches
from train.config import (
    OptimConfig,
    TrainConfig,
    load_tokenizer_train_config,
    load_train_config,
    saved_yaml,
)
from train.engine import (
    build_optimizer,
    deepspeed_config,
    default_extensions_dir,
    effective_lr,
    follow_schedule,
    lr_at,
    scaled_optim,
)

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_RECIPES = sorted((REPO / "configs").glob("tokenizer_*.yaml"))
RECIPES = sorted(set((REPO / "configs").glob("*.yaml")) - set(TOKENIZER_RECIPES))
# Recipes leave the data set and token set to the user (???): fill them in to validate the rest.
REQUIRED = ["data.url=/tmp/data", "data.tokens=fsq-0123456789abcdef"]


# --- config ---------------------------------------------------------------------------------------


def test_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"demo_cpu.yaml", "vitb_128f.yaml", "vitl_128f.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe: Path) -> None:
    cfg = load_train_config([recipe], REQUIRED)
    assert isinstance(cfg, TrainConfig)
    cfg.validate()
    assert cfg.run.steps <= cfg.optim.total_steps
    assert cfg.model.target.kind == "tokens"
    assert cfg.model.masking.decoder == "adaptive"


@pytest.mark.parametrize("recipe", TOKENIZER_RECIPES, ids=lambda p: p.stem)
def test_the_papers_tokenizer_overlay_applies_to_every_tokenizer_recipe(recipe: Path) -> None:
    overlay = REPO / "configs" / "overlays" / "tokenizer_paper.yaml"
    cfg = load_tokenizer_train_config([recipe, overlay], ["data.url=/tmp/data"]).tokenizer
    assert (cfg.dropped_tokens, cfg.decoder_context, cfg.keep_ratio) == ("zeros", "none", 0.15)
    assert (
        cfg.fsq_levels == load_tokenizer_train_config([recipe], ["data.url=/tmp/data"]).tokenizer.fsq_levels
    )


@pytest.mark.parametrize("recipe", TOKENIZER_RECIPES, ids=lambda p: p.stem)
def test_every_tokenizer_recipe_loads_and_matches_its_mae_recipe(recipe: Path) -> None:
    cfg = load_tokenizer_train_config([recipe], ["data.url=/tmp/data"])
    mae = {
        "tokenizer_demo_cpu": "demo_cpu",
        "tokenizer_demo_128f_cpu": "demo_128f_cpu",
        "tokenizer_128f": "vitb_128f",
    }[recipe.stem]
    model = load_train_config([REPO / f"configs/{mae}.yaml"], REQUIRED).model_config()
    check_tokenizer_matches(model, cfg.tokenizer)  # same tubelet grid, same FSQ levels
    assert cfg.tokenizer.video.num_frames == model.video.num_frames
    assert cfg.tokenizer.video.img_size == model.video.img_size


def test_tokenizer_config_refuses_a_token_set() -> None:
    with pytest.raises(ConfigError, match=r"^data\.tokens\b"):
        load_tokenizer_train_config([REPO / "configs/tokenizer_demo_cpu.yaml"], ["data.tokens=fsq-x"])


def test_saved_config_redacts_credentials() -> None:
    cfg = load_train_config(
        [REPO / "configs/demo_cpu.yaml"],
        ["data.tokens=fsq-x", "data.storage_options.key=AKIA123", "data.storage_options.secret=s3cr3t"],
    )
    text = saved_yaml(cfg)
    assert "AKIA123" not in text and "s3cr3t" not in text and "<redacted>" in text
    assert cfg.data.storage_options["secret"] == "s3cr3t"  # the run itself still has them


def test_demo_recipe() -> None:
    cfg = load_train_config([REPO / "configs/demo_cpu.yaml"], ["data.tokens=fsq-x"])
    assert cfg.model.preset == "tiny"
    assert (cfg.model.video.num_frames, cfg.model.video.img_size) == (16, 64)
    assert cfg.model.masking.decoder_budget == 0.15
    assert list(cfg.model.target.fsq_levels) == [8, 5, 5, 5]
    assert cfg.data.batch_size == 4


def test_large_recipes_use_bf16() -> None:
    """Their ZeRO stage and checkpointing are what `lvmae plan` recommends (tests/test_plan.py)."""
    for name, embed in (("vitb_128f", 768), ("vitl_128f", 1024)):
        cfg = load_train_config([REPO / f"configs/{name}.yaml"], REQUIRED)
        assert (cfg.model.video.num_frames, cfg.model.video.img_size) == (128, 224)
        assert list(cfg.model.target.fsq_levels) == [8, 8, 8, 5, 5, 5]
        assert cfg.run.precision == "bf16"
        assert cfg.model_config().encoder.embed_dim == embed


def test_activation_checkpointing_reaches_both_transformers() -> None:
    cfg = load_train_config(
        [REPO / "configs/vitb_128f.yaml"], [*REQUIRED, "run.activation_checkpointing=true"]
    )
    model = cfg.model_config()
    assert model.encoder.grad_checkpointing and model.decoder.grad_checkpointing


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.nope=1", "run.nope"),
        ("optim.lr=fast", "optim.lr"),
        ("run.precision=fp16", "run.precision"),
        ("run.zero_stage=4", "run.zero_stage"),
        ("data.decoder=ffmpeg", "data.decoder"),
        ("data.batch_size=0", "data.batch_size"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("optim.lr_reference_batch=-1", "optim.lr_reference_batch"),
        ("optim.lr_reference_batch=many", "optim.lr_reference_batch"),
        ("optim.warmup_steps=1000000", "optim.warmup_steps"),
        ("run.steps=1000000", "run.steps"),
        ("model.masking.decoder=nope", "model.masking.decoder"),
        ("data.tokens=null", "data.tokens"),
    ],
)
def test_bad_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}\b"):
        load_train_config([REPO / "configs/demo_cpu.yaml"], ["data.tokens=fsq-x", override])


def test_missing_data_url_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^data\.url\b") as err:
        load_train_config([REPO / "configs/vitb_128f.yaml"], ["data.tokens=fsq-x"])
    assert "\n" not in str(err.value)  # one line


# --- learning-rate schedule -----------------------------------------------------------------------


def test_lr_schedule_shape() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, total_steps=100)
    lrs = [lr_at(s, cfg) for s in range(0, 121)]
    assert lrs[0] == 0.0
    for s in range(10):  # linear warmup
        assert lrs[s] == pytest.approx(1e-3 * s / 10)
    assert lrs[10] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    after = lrs[10:]
    assert all(a >= b for a, b in itertools.pairwise(after))  # monotone non-increasing after warmup
    assert lrs[55] == pytest.approx((1e-3 + 1e-5) / 2)  # cosine half-way point
    assert lrs[100] == pytest.approx(1e-5) and lrs[120] == pytest.approx(1e-5)


def test_lr_schedule_without_warmup() -> None:
    cfg = OptimConfig(lr=2e-4, min_lr=0.0, warmup_steps=0, total_steps=50)
    assert lr_at(0, cfg) == pytest.approx(2e-4)
    assert lr_at(50, cfg) == pytest.approx(0.0, abs=1e-12)


# --- learning rate scaled with the global batch -------------------------------------------------


def test_effective_lr_scales_with_the_global_batch() -> None:
    base = OptimConfig(lr=1.5e-4, lr_reference_batch=256)
    assert effective_lr(base, 256) == pytest.approx(1.5e-4)
    assert effective_lr(base, 512) == pytest.approx(3e-4)
    assert effective_lr(base, 4) == pytest.approx(1.5e-4 * 4 / 256)
    fixed = OptimConfig(lr=1e-3)  # lr_reference_batch 0, the default: the rate as given
    assert all(effective_lr(fixed, b) == 1e-3 for b in (1, 4, 512))


def test_scaled_optim_keeps_min_lr_absolute_and_the_schedule_follows_the_scaled_peak() -> None:
    cfg = OptimConfig(lr=1.5e-4, lr_reference_batch=256, min_lr=1e-6, warmup_steps=10, total_steps=100)
    scaled = scaled_optim(cfg, 512)
    assert (scaled.lr, scaled.lr_reference_batch, scaled.min_lr) == (pytest.approx(3e-4), 0, 1e-6)
    assert (scaled.warmup_steps, scaled.total_steps) == (10, 100)
    assert cfg.lr == 1.5e-4  # the config itself is left as written
    assert lr_at(5, scaled) == pytest.approx(1.5e-4)  # half way up the warmup to 3e-4
    assert lr_at(10, scaled) == pytest.approx(3e-4) and lr_at(100, scaled) == pytest.approx(1e-6)
    unscaled = OptimConfig(lr=1e-3, min_lr=1e-5)
    assert scaled_optim(unscaled, 64) == unscaled  # lr_reference_batch 0: today's schedule, unchanged


def test_a_scaled_lr_below_min_lr_is_one_config_error() -> None:
    # With a reference batch, lr is a base rate: a min_lr above it is fine until the world size is known.
    cfg = load_train_config(
        [REPO / "configs/demo_cpu.yaml"],
        ["data.tokens=fsq-x", "optim.lr=1.5e-4", "optim.lr_reference_batch=256", "optim.min_lr=1e-5"],
    )
    assert scaled_optim(cfg.optim, 64).lr == pytest.approx(3.75e-5)
    below = r"^optim\.min_lr: 1e-05 is above the run's peak lr 2\.34e-06"  # 1.5e-4 x 4 / 256
    with pytest.raises(ConfigError, match=below) as err:
        scaled_optim(cfg.optim, 4)
    assert "\n" not in str(err.value) and "optim.lr_reference_batch 256" in str(err.value)


@pytest.mark.parametrize(("name", "lr_at_64_ranks"), [("vitb_128f", 3e-4), ("vitl_128f", 1.5e-4)])
def test_large_recipes_scale_lr_as_videomae(name: str, lr_at_64_ranks: float) -> None:
    """VideoMAE's base rate 1.5e-4 per 256 clips: at 64 ranks, the fixed rates these recipes had."""
    cfg = load_train_config([REPO / f"configs/{name}.yaml"], REQUIRED)
    assert (cfg.optim.lr, cfg.optim.lr_reference_batch) == (1.5e-4, 256)
    assert effective_lr(cfg.optim, cfg.data.batch_size * 64) == pytest.approx(lr_at_64_ranks)
    assert effective_lr(cfg.optim, cfg.data.batch_size * 8) == pytest.approx(lr_at_64_ranks / 8)


def _two_scale_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    torch.nn.init.constant_(model[0].weight, 0.1)
    torch.nn.init.constant_(model[1].weight, 0.1)
    return model


def _head_full_rate(name: str) -> float:  # layer-wise decay, as a fine-tune's: the first layer at half rate
    return 1.0 if name.startswith("1.") else 0.5


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        model(torch.ones(2, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def test_every_param_group_follows_the_scaled_schedule() -> None:
    cfg = OptimConfig(lr=1e-3, lr_reference_batch=4, min_lr=1e-5, warmup_steps=2, total_steps=10)
    scaled = scaled_optim(cfg, 16)  # a peak of 4e-3
    model = _two_scale_model()
    optimizer, scheduler = build_optimizer(model, scaled, _head_full_rate)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0] * 4  # warmup starts at 0
    for step in range(1, 11):
        _train(model, optimizer, scheduler, 1)
        full, half = sorted({g["lr"] for g in optimizer.param_groups}, reverse=True)
        assert full == pytest.approx(lr_at(step, scaled)) and half == pytest.approx(0.5 * full)
    assert scheduler.base_lrs == pytest.approx([4e-3, 4e-3, 2e-3, 2e-3])


@pytest.mark.parametrize("new_batch", [4, 8])
def test_a_resumed_schedule_takes_this_runs_rate(new_batch: int) -> None:
    """LambdaLR.load_state_dict restores the checkpoint's base_lrs; follow_schedule puts back the ones of
    this run's config (here: a global batch of 8 instead of 4 doubles the peak), at the restored step.
    At the same batch the resumed run is bit for bit the one that never stopped."""
    cfg = OptimConfig(lr=1e-3, lr_reference_batch=4, min_lr=1e-5, warmup_steps=2, total_steps=10)
    old = scaled_optim(cfg, 4)
    model = _two_scale_model()
    optimizer, scheduler = build_optimizer(model, old, _head_full_rate)
    _train(model, optimizer, scheduler, 5)
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    saved = {k: copy.deepcopy(v) for k, v in saved.items()}

    new = scaled_optim(cfg, new_batch)
    model2 = _two_scale_model()
    model2.load_state_dict(model.state_dict())
    optimizer2, scheduler2 = build_optimizer(model2, new, _head_full_rate)
    fresh = list(scheduler2.base_lrs)
    optimizer2.load_state_dict(saved["optimizer"])
    scheduler2.load_state_dict(saved["scheduler"])
    assert scheduler2.base_lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])  # the checkpoint's rates
    follow_schedule(scheduler2, fresh)
    assert scheduler2.last_epoch == 5 and scheduler2.base_lrs == fresh
    full = lr_at(5, new)
    lrs = [full, full, 0.5 * full, 0.5 * full]
    assert [g["lr"] for g in optimizer2.param_groups] == pytest.approx(lrs)
    assert scheduler2.get_last_lr() == pytest.approx(lrs)
    _train(model2, optimizer2, scheduler2, 1)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lr_at(6, new))
    if new_batch == 4:  # the same run: identical lrs and weights to one that never stopped
        _train(model, optimizer, scheduler, 1)
        assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in optimizer.param_groups]
        assert scheduler2.get_last_lr() == scheduler.get_last_lr()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


# --- DeepSpeed config -----------------------------------------------------------------------------


def test_deepspeed_config_fp32_zero3() -> None:
    cfg = load_train_config([REPO / "configs/demo_cpu.yaml"], ["data.tokens=fsq-x", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert "stage3_param_persistence_threshold" in ds["zero_optimization"]
    assert ds["bf16"] == {"enabled": False}
    assert ds["fp16"] == {"enabled": False}
    assert ds["wall_clock_breakdown"] is False
    assert ds["steps_per_print"] >= 10**6
    assert "optimizer" not in ds and "scheduler" not in ds  # client objects


def test_deepspeed_config_bf16_and_stages() -> None:
    cfg = load_train_config([REPO / "configs/vitb_128f.yaml"], REQUIRED)
    assert deepspeed_config(cfg, 8)["bf16"] == {"enabled": True}
    for stage in (0, 1, 2):
        cfg.run.zero_stage = stage
        zero = deepspeed_config(cfg, 8)["zero_optimization"]
        assert zero["stage"] == stage
        assert not any(k.startswith("stage3_") for k in zero)


def test_deepspeed_config_auto_precision_on_cpu() -> None:
    cfg = load_train_config([REPO / "configs/demo_cpu.yaml"], ["data.tokens=fsq-x", "run.precision=auto"])
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert deepspeed_config(cfg, 1)["bf16"]["enabled"] == expected


# --- a real ZeRO-3 engine on CPU ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run _worker in a fresh single-rank process group; -> its result."""
    tmp = tmp_path_factory.mktemp("zero3")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(default_extensions_dir())),
    }
    result = tmp / "result.json"
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp), str(result)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(result.read_text())


@pytest.mark.slow
def test_zero3_engine_trains_and_checkpoint_round_trips(zero3_run: dict) -> None:
    r = zero3_run
    assert all(math.isfinite(x) for x in r["losses"]), r
    assert r["max_param_change"] > 0, r
    assert r["changed_params"] == r["num_params"], r
    assert r["partitioned"], r
    assert r["lrs"][:3] == pytest.approx([0.0, 5e-4, 1e-3])
    # The restored engine's next two steps match the original's exactly (params, AdamW state, lr).
    assert r["resumed_losses"] == r["next_losses"], r
    assert r["resumed_lr"] == pytest.approx(r["next_lr"]), r


@pytest.mark.slow
def test_model_output_is_zero3_visible(zero3_run: dict) -> None:
    """ZeRO-3 re-gathers a module's parameters for backward through hooks on the tensors it returns;
    it cannot see inside a dataclass (it can inside tuples, NamedTuples and dicts)."""
    assert zero3_run["backward_error"] is None


@pytest.mark.slow
def test_model_builds_under_zero_init(zero3_run: dict) -> None:
    """ZeRO-3 builds the model inside deepspeed.zero.Init, with the same initialization as without."""
    assert zero3_run["zero_init_error"] is None
    assert zero3_run["zero_init_matches_plain"]


class TupleOutput(NamedTuple):
    pred: Any
    plan: Any


def _tuple_output_mae():
    from lvmae.mae import MaskedVideoAutoencoder

    class TupleOutputMAE(MaskedVideoAutoencoder):
        """Returns a NamedTuple, whose tensors ZeRO-3's backward hooks can find (see
        test_model_output_is_zero3_visible)."""

        def forward(self, *args, **kwargs) -> TupleOutput:
            out = super().forward(*args, **kwargs)
            return TupleOutput(out.pred, out.plan)

    return TupleOutputMAE


def _worker(tmp: Path, result: Path) -> None:
    """One rank: 3 ZeRO-3 steps of a tiny LVMAE, checkpoint, 2 more; a fresh engine resumes from it."""
    from lvmae.losses import mae_loss
    from lvmae.mae import MAEOutput, MaskedVideoAutoencoder
    from train.engine import build_engine, full_state_dict, init_distributed, model_init_context

    init_distributed()
    TupleOutputMAE = _tuple_output_mae()
    cfg = load_train_config(
        [REPO / "configs/demo_cpu.yaml"],
        [
            "data.tokens=fsq-test",
            "data.batch_size=2",
            "model.video.num_frames=8",
            "optim.lr=1e-3",
            "optim.warmup_steps=2",
            "optim.total_steps=20",
            "run.steps=20",
        ],
    )
    mcfg = cfg.model_config()
    gen = torch.Generator().manual_seed(0)
    b, grid = cfg.data.batch_size, mcfg.video.grid
    v = mcfg.video
    batches = [
        (
            torch.randn(b, v.in_chans, v.num_frames, v.img_size, v.img_size, generator=gen),
            torch.rand(b, *grid, generator=gen),  # priority
            torch.randint(0, mcfg.target.codebook_size, (b, *grid), generator=gen),  # codes
        )
        for _ in range(5)
    ]

    # Under zero.Init the model is built partitioned; where that fails (test_model_builds_under_zero_init)
    # it is built whole and deepspeed.initialize partitions it.
    torch.manual_seed(0)
    plain = {k: v.clone() for k, v in MaskedVideoAutoencoder(mcfg).state_dict().items()}
    zero_init_error, zero_init_matches_plain = None, False
    try:
        torch.manual_seed(0)
        with model_init_context(cfg):
            model = MaskedVideoAutoencoder(mcfg)
        zero_init_matches_plain = all(torch.equal(plain[k], v) for k, v in full_state_dict(model).items())
    except RuntimeError as err:
        zero_init_error = str(err)

    def build(seed: int, model_cls: type = TupleOutputMAE):
        torch.manual_seed(seed)
        with model_init_context(cfg) if zero_init_error is None else contextlib.nullcontext():
            model = model_cls(mcfg)
        return build_engine(model, cfg, world_size=1)

    def step(engine, scheduler, i: int) -> tuple[float, float]:
        video, priority, codes = batches[i]
        plan = engine.module.plan(b, torch.Generator().manual_seed(100 + i), priority)
        lr = scheduler.get_last_lr()[0]
        out = engine(video, plan=plan)
        loss = mae_loss(mcfg, MAEOutput(out.pred, out.plan), codes=codes)
        engine.backward(loss)
        engine.step()
        return loss.item(), lr  # sync point: the loss value for the report

    engine, _, scheduler = build(seed=0)
    before = full_state_dict(engine.module)
    losses, lrs = zip(*(step(engine, scheduler, i) for i in range(3)))
    after = full_state_dict(engine.module)
    changes = {k: (after[k] - before[k]).abs().max().item() for k, p in engine.module.named_parameters()}
    partitioned = all(hasattr(p, "ds_id") for p in engine.module.parameters())  # ZeRO-3 parameters
    engine.save_checkpoint(str(tmp / "ckpt"), tag="step3")
    next_lr = scheduler.get_last_lr()[0]
    next_losses = [step(engine, scheduler, i)[0] for i in (3, 4)]

    engine2, _, scheduler2 = build(seed=1)  # different initial weights: the checkpoint must replace them
    engine2.load_checkpoint(str(tmp / "ckpt"), tag="step3")
    resumed_lr = scheduler2.get_last_lr()[0]
    resumed_losses = [step(engine2, scheduler2, i)[0] for i in (3, 4)]
    # Last, as it may leave ZeRO-3 hooks half-run: the model as it is, returning its MAEOutput dataclass.
    backward_error = None
    try:
        engine3, _, scheduler3 = build(seed=2, model_cls=MaskedVideoAutoencoder)
        step(engine3, scheduler3, 0)
    except RuntimeError as err:
        backward_error = str(err)
    result.write_text(
        json.dumps(
            {
                "losses": losses,
                "lrs": lrs,
                "num_params": len(changes),
                "changed_params": sum(c > 0 for c in changes.values()),
                "max_param_change": max(changes.values()),
                "partitioned": partitioned,
                "next_lr": next_lr,
                "next_losses": next_losses,
                "resumed_lr": resumed_lr,
                "resumed_losses": resumed_losses,
                "zero_init_error": zero_init_error,
                "backward_error": backward_error,
                "zero_init_matches_plain": zero_init_matches_plain,
            }
        )
    )


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
