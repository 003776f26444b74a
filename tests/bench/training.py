"""Training overhead of the SparcomCallback, measured side by side: step time with and without it
(between snapshots), and the cost of one snapshot against a bare forward over the probe set."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from functools import partial
from types import SimpleNamespace

from transformers import Trainer, TrainerCallback, TrainingArguments

from callbacks import SparcomCallback
from sparcom.data import load_records
from sparcom.models.loading import build_tiny
from sparcom.train.sft import collate_sft, probe_set, sft_dataset

PROBE_PER_CATEGORY = 20


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def timed_steps(
    model, tokenizer, records, callback, *, steps: int, batch: int, learning_rate: float = 5e-5
) -> list[float]:
    """Seconds of each step of a plain Trainer over ``records`` (up to 256 tokens), with ``callback``
    (a SparcomCallback, or None) attached; the first steps include the warm-up."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=batch,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            remove_unused_columns=False,
            learning_rate=learning_rate,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=sft_dataset(records, tokenizer, 256),
            data_collator=partial(collate_sft, pad_id=tokenizer.pad_token_id or 0),
            callbacks=[timer] + ([callback] if callback is not None else []),
        )
        trainer.train()
    return timer.seconds


def step_seconds(preset: str, overrides: dict, with_callback: bool, steps: int) -> list[float]:
    model, tokenizer = build_tiny(preset, **overrides)
    records = load_records()
    with tempfile.TemporaryDirectory() as out:
        callback = (
            SparcomCallback(tokenizer, probe_set(records, 4), snapshot_dir=out + "/snapshots")
            if with_callback
            else None
        )
        seconds = timed_steps(model, tokenizer, records, callback, steps=steps, batch=8)
    return seconds[2:]  # the first steps warm up allocator and kernels


def snapshot_vs_forward(preset: str, overrides: dict, rounds: int, bare_forward) -> tuple[float, float]:
    """Median seconds of one mid-training snapshot (record + save + drift + W&B log) and of a bare
    forward over the same probe set; W&B is a real offline run."""
    import wandb

    model, tokenizer = build_tiny(preset, **overrides)
    probe = probe_set(load_records(), PROBE_PER_CATEGORY)
    snapshot_times, forward_times = [], []
    with tempfile.TemporaryDirectory() as out:
        os.environ["WANDB_SILENT"] = "true"
        wandb.init(mode="offline", dir=out, project="sparcom-bench")
        callback = SparcomCallback(tokenizer, probe, snapshot_dir=out)
        state = SimpleNamespace(global_step=0, is_world_process_zero=True)
        callback._snapshot(None, state, model)  # the base
        for step in range(1, rounds + 1):
            started = time.perf_counter()
            bare_forward(model, tokenizer, probe)
            forward_times.append(time.perf_counter() - started)
            state.global_step = step
            started = time.perf_counter()
            callback._snapshot(None, state, model)
            snapshot_times.append(time.perf_counter() - started)
        callback.close()
        wandb.finish()
    return statistics.median(snapshot_times), statistics.median(forward_times)


def report(models: dict, rounds: int, bare_forward) -> dict:
    """``bare_forward(model, tokenizer, records)``: the floor the recorder benchmark uses too."""
    results = {}
    for name, (preset, overrides) in models.items():
        without, with_, halves = [], [], ([], [])
        rounds_ = 2 * ((rounds + 1) // 2)
        for round_ in range(rounds_):  # ABBA order: drift in machine speed hits both alike
            for attached in (False, True) if round_ % 2 == 0 else (True, False):
                seconds = step_seconds(preset, overrides, attached, 20)
                (with_ if attached else without).extend(seconds)
                if not attached:
                    halves[round_ >= rounds_ // 2].extend(seconds)
        throughput = statistics.median(without) / statistics.median(with_)
        # The same configuration against itself: how far apart two identical arms land on this machine.
        noise = statistics.median(halves[0]) / statistics.median(halves[1])
        snapshot, forward = snapshot_vs_forward(preset, overrides, rounds, bare_forward)
        results[name] = {
            "throughput_ratio": throughput,
            "a_a_ratio": noise,
            "snapshot_s": snapshot,
            "probe_forward_s": forward,
        }
        print(
            f"\n{name} training: median step {statistics.median(without) * 1e3:.0f} ms without the callback, "
            f"{statistics.median(with_) * 1e3:.0f} ms with it"
        )
        print(
            f"  throughput with / without     = {throughput:.3f}x  (target >= 0.98; "
            f"A/A noise floor, without vs without: {noise:.3f}x)"
        )
        print(
            f"  one snapshot / probe forward  = {snapshot / forward:.3f}x  (target <= 1.2; {snapshot:.2f}s vs {forward:.2f}s)"
        )
    return results
