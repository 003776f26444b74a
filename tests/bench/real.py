"""The real model: SmolLM2-135M-Instruct (the packaged preset) recorded over HexaInst against a
bare forward over the same length-sorted batches (the floor), tokens per second, peak RSS beside
the model's size, the time of one training-run snapshot at the default probe size (recording, the
held-out loss and the drift together), and a training step with and without the callback."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from types import SimpleNamespace

import torch

import sparcom
from callbacks import SparcomCallback
from sparcom.config import RecordConfig, TrainSparcomConfig
from sparcom.data import load_records
from sparcom.models.loading import load_model
from sparcom.recording.conversation import encode
from sparcom.recording.probe import Recording, length_bucketed, pad_batch
from sparcom.train.sft import probe_set, run_records

from recording import memory, ratio, reset_peak, side_by_side
from training import timed_steps

PRESET = "smollm2-135m-instruct"
BATCH = 16


def bare_forward(model, tokenizer, records) -> None:
    """The forward the recorder needs, nothing counted: prompts only, the same length-sorted
    batches, no vocabulary projection beyond the last token."""
    encoded = [encode(r, tokenizer).needed_for("prompt") for r in records]
    with torch.no_grad():
        for batch in length_bucketed([len(e.input_ids) for e in encoded], BATCH):
            ids, attention, _ = pad_batch([encoded[i] for i in batch], "prompt", tokenizer.pad_token_id)
            model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=1)


def record(model, tokenizer, records) -> None:
    sparcom.record(model, tokenizer, records, Recording(batch_size=BATCH), progress=False)


def peak_rss_child(per_category: int) -> None:
    """In a fresh process: load the model, reset the high-water mark, record; prints the resident
    size before recording and the peak while it ran (MB)."""
    model, tokenizer = load_model(PRESET)
    records = probe_set(load_records(), per_category)
    before = memory("VmRSS")
    reset_peak()
    record(model, tokenizer, records)
    print(before / 2**20, memory("VmHWM") / 2**20)


def snapshot_seconds(model, tokenizer, rounds: int) -> float:
    """One mid-training snapshot as train.py takes it at the defaults: the probe (20 held-out
    instructions per category), its drift against step 0, and the held-out loss (20 per category)."""
    _, held_out, probe = run_records(load_records(), 20, 0, "held_out", 20, 0)
    times = []
    with tempfile.TemporaryDirectory() as out:
        callback = SparcomCallback(tokenizer, probe, held_out=held_out, max_length=512, snapshot_dir=out)
        callback.draw_figures = False
        state = SimpleNamespace(global_step=0, is_world_process_zero=True)
        callback._snapshot(None, state, model)
        for step in range(1, rounds + 1):
            state.global_step = step
            started = time.perf_counter()
            callback._snapshot(None, state, model)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_seconds(with_callback: bool, steps: int) -> list[float]:
    """Steps of a plain Trainer on SmolLM2 (batch 4, up to 256 tokens); with the callback recording
    at step 0 only, so the steps measure what it costs while no snapshot is taken."""
    model, tokenizer = load_model(PRESET)
    records = load_records()
    with tempfile.TemporaryDirectory() as out:
        callback = (
            SparcomCallback(
                tokenizer,
                probe_set(records, 2),
                TrainSparcomConfig(record=RecordConfig(on_save=False)),
                snapshot_dir=out + "/snapshots",
            )
            if with_callback
            else None
        )
        seconds = timed_steps(model, tokenizer, records, callback, steps=steps, batch=4)
    return seconds[1:]  # the first step warms up


def report(per_category: int, rounds: int) -> dict:
    model, tokenizer = load_model(PRESET)
    records = probe_set(load_records(), per_category)
    tokens = sum(int(encode(r, tokenizer).prompt_mask.sum()) for r in records)
    computed = sum(len(encode(r, tokenizer).needed_for("prompt").input_ids) for r in records)
    size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(
        f"\nreal model: {PRESET} (float32, {size_mb:.0f} MB of weights), {len(records)} HexaInst prompts, "
        f"{computed} tokens run ({tokens} counted), batch {BATCH}, threads {torch.get_num_threads()}"
    )
    bare_forward(model, tokenizer, records[:BATCH])  # warm-up
    runs = {
        "bare": partial(bare_forward, model, tokenizer, records),
        "record": partial(record, model, tokenizer, records),
        "bare again": partial(bare_forward, model, tokenizer, records),
    }
    medians = side_by_side(runs, rounds)
    print(
        f"  record / bare forward = {ratio(medians, 'record', 'bare')}  (goal <= 1.0; A/A noise floor, "
        f"bare vs bare: {ratio(medians, 'bare again', 'bare')})"
    )
    print(
        f"  tokens/s: record {computed / medians['record']['wall_s']:.0f}, bare {computed / medians['bare']['wall_s']:.0f}"
    )
    done = subprocess.run(
        [sys.executable, __file__, "--peak-rss", str(per_category)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, peak = map(float, done.stdout.strip().splitlines()[-1].split())
    print(
        f"  peak RSS while recording: {peak:.0f} MB, beside {size_mb:.0f} MB of weights "
        f"({before:.0f} MB before it: the process with the model loaded)"
    )
    snapshot = snapshot_seconds(model, tokenizer, rounds)
    print(f"  one training-run snapshot at the defaults (probe + drift + held-out loss): {snapshot:.1f} s")
    without, with_ = [], []
    for round_ in range(2):  # ABBA
        for attached in (False, True) if round_ == 0 else (True, False):
            (with_ if attached else without).extend(step_seconds(attached, 4))
    print(
        f"  training step (batch 4, <= 256 tokens): {statistics.median(without):.2f} s without the callback, "
        f"{statistics.median(with_):.2f} s with it (throughput ratio {statistics.median(without) / statistics.median(with_):.3f})"
    )
    return {
        "seconds": medians,
        "tokens": computed,
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "weights_mb": size_mb,
        "snapshot_s": snapshot,
        "step_s": {"without": statistics.median(without), "with": statistics.median(with_)},
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak-rss"]:
        peak_rss_child(int(sys.argv[2]))
