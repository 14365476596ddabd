"""bench/gpu_check.py's `tokenizer` section: the tokenizer's clips/s as `lvmae ingest tokens` runs it."""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch
from gpu_check_common import (
    Clock,
    Context,
    SectionTimeout,
    error_text,
    release_memory,
    say,
    tokenizer_config,
)


def section_tokenizer(rec: dict[str, Any], clock: Clock, ctx: Context) -> None:
    """Tokenizer.encode as `lvmae ingest tokens` runs it (ingest.tokens.encode_clips), on
    random uint8 clips already decoded: host -> device, encode, codes and priorities back to the host;
    at each batch size of the settings (a failure at one is recorded, the others still run)."""
    from ingest.tokens import encode_clips
    from lvmae.tokenizer import Tokenizer

    s, dev = ctx.settings, ctx.device
    cfg = tokenizer_config(s.tokenizer_recipe)
    torch.manual_seed(0)
    model = Tokenizer(cfg).to(dev).eval().requires_grad_(False)
    v = cfg.video
    cuda = dev.type == "cuda"
    rec.update(
        recipe=s.tokenizer_recipe,
        frames=v.num_frames,
        size=v.img_size,
        grid=list(v.grid),
        params=sum(p.numel() for p in model.parameters()),
        dtype="bf16 autocast (FSQ and the scorer in float32)" if cuda else "float32",
        timed="host -> device copy of uint8 clips, to_model_input, encode, codes and priorities to the host",
        runs=[],
    )

    def run(b: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(b)
        shape = (b, v.num_frames, v.img_size, v.img_size, 3)
        clips = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

        def encode() -> None:
            encode_clips(model, clips, str(dev))  # the host copies of codes and priorities: the sync point

        row: dict[str, Any] = {"batch": b}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        encode()
        row["first_batch_s"] = round(time.perf_counter() - start, 3)
        times: list[float] = []
        for _ in range(s.tokenizer_timed):
            if times and clock.left() < 2 * max(times):
                row["note"] = f"stopped after {len(times)} timed batches: the section's budget"
                break
            start = time.perf_counter()
            encode()
            times.append(time.perf_counter() - start)
        row["batch_s"] = [round(t, 4) for t in times]
        row["clips_per_s"] = round(b * len(times) / sum(times), 3) if times else None
        if cuda:
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        return row

    for b in s.tokenizer_batches:
        if rec["runs"] and clock.left() < 10:
            rec["runs"].append({"batch": b, "skipped": "over the section's budget"})
            continue
        say(f"tokenizer: batch {b}")
        try:
            row = run(b)
        except SectionTimeout:
            raise
        except Exception as err:
            row = {"batch": b, "error": error_text(err)}
            ctx.log(f"=== tokenizer batch {b}\n{traceback.format_exc()}")
        rec["runs"].append(row)
        release_memory()
        ctx.save()
    rates = [r["clips_per_s"] for r in rec["runs"] if r.get("clips_per_s")]
    rec["clips_per_s"] = max(rates) if rates else None
    if not rates:
        raise RuntimeError(f"the tokenizer ran at no batch size: {rec['runs']}")
    train = ctx.result["sections"].get("train", {})
    stage = train.get("ingest_tokens", {})
    rec["ingest_tokens_clips_per_s"] = stage.get("clips_per_s")
    rec["ingest_tokens_note"] = (
        f"the whole `lvmae ingest tokens` stage of the train section (batch {stage.get('batch')}, PyAV "
        f"decode included) on the {train.get('tokenizer', {}).get('recipe', '?')} tokenizer"
        if stage.get("clips_per_s")
        else "the train section's ingest tokens stage did not run"
    )
