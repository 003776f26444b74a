"""ISN-only fine-tuning against LoRA with as many trainable parameters and full fine-tuning, side by
side on one tiny preset: trainable parameters, held-out response loss after N steps, ISN drift
(Jaccard of the ISN sets recorded at step 0 and at the end), median step time and peak memory.

Each run is a fresh process (peak RSS is its own), and the methods take turns round by round, so a
noisy machine slows every method alike. Random tiny models prove the plumbing, not the science.

    python tests/bench/isn_vs_lora.py --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile

MODEL = (
    "tiny-llama",
    dict(
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
)
LEARNING_RATES = {"isn": 1e-3, "lora": 5e-4, "full": 1e-4}
# The top 1% of each layer's neurons per category, as NeFT-style sparse tuning would choose them;
# at a threshold of 0.5 half of a random model's neurons fire often enough to be selected.
SELECTION_MODE, EPSILON = "percentile_layer", 0.01
PROBE_PER_CATEGORY = 10
HELD_OUT_PER_CATEGORY = 4
DISCLAIMER = (
    "Random tiny models prove the plumbing, not the science: these numbers say the three methods run "
    "and how their costs compare, not which one fine-tunes better."
)


def run_one(method: str, steps: int) -> dict:
    """Train the preset with one method for ``steps`` SFT steps and measure it (in this process)."""
    import torch
    from training import StepTimer  # the training section's step clock
    from trl import SFTConfig, SFTTrainer

    import sparcom
    from sparcom.analysis import isn_alteration
    from sparcom.data import load_records
    from sparcom.isn_training import isn_only, lora_rank_matching, select_isns
    from sparcom.models import build_tiny
    from sparcom.response_loss import ResponseLoss
    from sparcom.steer import held_out
    from sparcom.training import probe_set, sft_dataset

    preset, overrides = MODEL
    model, tokenizer = build_tiny(preset, **overrides)
    parameters = sum(p.numel() for p in model.parameters())
    records = load_records()
    probe = probe_set(records, PROBE_PER_CATEGORY)
    base = sparcom.record(model, tokenizer, probe, progress=False)
    evaluation = held_out(records, base, HELD_OUT_PER_CATEGORY, seed=1)
    loss = ResponseLoss(tokenizer, evaluation, base.categories)
    loss_before = loss(model)
    mask = select_isns(base, EPSILON, selection_mode=SELECTION_MODE)
    isn_trainable = isn_only(copy.deepcopy(model), mask).trainable  # the count LoRA matches
    peft_config, detail = None, ""
    if method == "isn":
        isn_only(model, mask)
        detail = (
            f"{sum(int(m.sum()) for m in mask.values())} ISNs ({SELECTION_MODE} {EPSILON:g}, union of six)"
        )
    elif method == "lora":
        from peft import LoraConfig

        rank = lora_rank_matching(model, isn_trainable)
        peft_config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        detail = f"rank {rank}, all-linear"
    timer = StepTimer()
    train = [r for r in records if r["id"] not in {e["id"] for e in evaluation}]
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=LEARNING_RATES[method],
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            max_length=256,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=sft_dataset(train, tokenizer, 256),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
        )
        trainer.train()
    tuned = trainer.model
    trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    loss_after = loss(tuned)
    drift = isn_alteration(
        base, sparcom.record(tuned, tokenizer, probe, progress=False), EPSILON, SELECTION_MODE
    )
    return {
        "method": method,
        "detail": detail,
        "trainable": trainable,
        "parameters": parameters,
        "learning_rate": LEARNING_RATES[method],
        "loss_before": float(loss_before.mean()),
        "loss_after": float(loss_after.mean()),
        "isn_jaccard": sum(drift.values()) / len(drift),
        "step_s": statistics.median(timer.seconds[2:]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def in_fresh_process(method: str, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--one", method, "--steps", str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(steps: int = 40, rounds: int = 2) -> dict:
    """Every method ``rounds`` times, in turns (isn, lora, full, then full, lora, isn, ...); prints a
    table of medians and returns it."""
    methods = ["isn", "lora", "full"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for round_ in range(rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            runs[method].append(in_fresh_process(method, steps))
    results = {}
    for method, done in runs.items():
        first = done[0]
        results[method] = {
            **{k: first[k] for k in ("detail", "trainable", "parameters", "learning_rate", "loss_before")},
            **{
                k: statistics.median(r[k] for r in done)
                for k in ("loss_after", "isn_jaccard", "step_s", "peak_rss_mb")
            },
        }
    preset, overrides = MODEL
    full = results["full"]
    print(
        f"\nISN-only vs LoRA vs full fine-tuning: {preset} {overrides}, {steps} SFT steps, batch 8, "
        f"{rounds} fresh-process runs each (medians)"
    )
    print(DISCLAIMER)
    print(
        f"{'method':<6} {'trainable':>10} {'share':>7} {'lr':>7} {'held-out loss':>19} {'ISN Jaccard':>12} "
        f"{'step / full':>12} {'peak RSS MB':>12}  detail"
    )
    for method, row in results.items():
        print(
            f"{method:<6} {row['trainable']:>10,} {row['trainable'] / row['parameters']:>7.2%} "
            f"{row['learning_rate']:>7.0e} {row['loss_before']:>8.4f} -> {row['loss_after']:<8.4f} "
            f"{row['isn_jaccard']:>12.3f} {row['step_s'] / full['step_s']:>11.3f}x {row['peak_rss_mb']:>12.0f}  "
            f"{row['detail']}"
        )
    print(
        f"(model weights: {full['parameters'] * 4 / 2**20:.1f} MB in float32; ISN Jaccard: step 0 vs the end, "
        f"{SELECTION_MODE} {EPSILON:g}, mean over the six categories; 1 = the ISN sets did not move)"
    )
    print(DISCLAIMER)
    return {
        "model": [preset, overrides],
        "steps": steps,
        "rounds": rounds,
        "methods": results,
        "note": DISCLAIMER,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", choices=["isn", "lora", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.steps)))
        return 0
    report(args.steps, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
