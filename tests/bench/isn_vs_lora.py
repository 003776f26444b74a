"""ISN-only fine-tuning against its controls on the real model, SmolLM2-135M-Instruct: full
fine-tuning, LoRA with about as many trainable parameters, ISN-only, and the matched random subset
(random neurons with the ISN set's counts in every layer, ``trainer.isn.control=random``) over
several seeds; then the category-targeted case (only the math ISNs, against their own control).
Every arm runs train.py's own trainer (``train.sft_trainer``) for the same steps on the same data, in a
fresh process, and reports its held-out loss change per category (instructions never trained on),
the ISN Jaccard of step 0 against the end with its chance level, trainable parameters and step time.
The ISN-vs-random difference in held-out loss change is given with a t-interval across seeds.

    python tests/bench/isn_vs_lora.py --steps 12 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # train.py, the entry point whose trainer every arm runs, is not in the package

MODEL = "smollm2-135m-instruct"
# Sparse selection, as NeFT-style tuning chooses: the top 1% of each layer's neurons per category
# (the paper's threshold 0.5 selects over a quarter of a SiLU model's FFN, not a sparse subset).
SELECTION = ["trainer.isn.selection_mode=percentile_layer", "trainer.isn.epsilon=0.01"]
COMMON = [
    f"model={MODEL}",
    "logger=disabled",
    "data.max_length=192",
    "data.held_out=12",
    "sparcom.probe.per_category=12",
    "sparcom.epsilons=[0.5]",
    "stats.enabled=false",
    "trainer.args.per_device_train_batch_size=4",
    "trainer.args.lr_scheduler_type=constant",
    "trainer.args.save_strategy=no",
    "trainer.args.logging_steps=1000",
    "trainer.args.disable_tqdm=true",
]
ARMS = {
    "full": ["trainer=full", "trainer.args.learning_rate=5e-5"],
    "lora": ["trainer=lora", "trainer.args.learning_rate=5e-4"],
    "isn": ["trainer=isn", *SELECTION, "trainer.args.learning_rate=1e-3"],
    "random": ["trainer=isn", *SELECTION, "trainer.isn.control=random", "trainer.args.learning_rate=1e-3"],
    "isn math": [
        "trainer=isn",
        *SELECTION,
        "trainer.isn.categories=[math]",
        "trainer.args.learning_rate=1e-3",
    ],
    "random math": [
        "trainer=isn",
        *SELECTION,
        "trainer.isn.categories=[math]",
        "trainer.isn.control=random",
        "trainer.args.learning_rate=1e-3",
    ],
}


def run_one(arm: str, seed: int, steps: int) -> dict:
    """One arm, in this process: train.py's trainer with a step clock; the numbers from its drift record."""
    import copy

    import train as entry
    from sparcom.cli import compose
    from sparcom.config.checks import check_data
    from sparcom.models.loading import load_model
    from sparcom.recording.probe import record
    from sparcom.stats.estimates import expected_jaccard
    from sparcom.train.drift import run_result
    from sparcom.train.isn_training import isn_only, lora_rank_matching, select_isns
    from sparcom.train.sft import run_records

    from training import StepTimer

    overrides = [*COMMON, *ARMS[arm], f"trainer.args.max_steps={steps}", f"seed={seed}"]
    if "random" in arm:
        overrides.append(f"trainer.isn.control_seed={seed}")
    cfg = compose("train", overrides)
    if arm == "lora":  # as many trainable parameters as the ISN arm
        model, tokenizer = load_model(MODEL)
        _, _, probe = run_records(check_data(cfg), 12, 0, "held_out", 12, 0)
        mask = select_isns(record(model, tokenizer, probe, progress=False), 0.01, None, "percentile_layer")
        cfg.trainer.peft.r = lora_rank_matching(model, isn_only(copy.deepcopy(model), mask).trainable)
        cfg.trainer.peft.lora_alpha = 2.0 * cfg.trainer.peft.r
    records = check_data(cfg)
    train_records, held_out, probe = run_records(records, 12, 0, "held_out", 12, 0)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        trainer = entry.sft_trainer(cfg, run_dir, train_records, held_out, probe, False, 0)
        trainer.add_callback(timer)
        trainer.train()
        result = run_result(run_dir)
        from sparcom.snapshot import Snapshot, snapshot_series

        series = snapshot_series(run_dir / "snapshots")
        base, tuned = Snapshot.load(series[min(series)]), Snapshot.load(series[max(series)])
        from sparcom.stats.analysis import category_tallies

        tallies = category_tallies([base, tuned], [0.01], "percentile_layer")[0.01]
        jaccard = [tallies.jaccard(c) for c in base.categories]
        chance = [
            expected_jaccard(tallies.sizes[0][i], tallies.sizes[1][i], tallies.widths)
            for i in range(len(base.categories))
        ]
    model = trainer.model
    return {
        "arm": arm,
        "seed": seed,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_change": {
            c: result.final.held_out_loss[c] - result.start.held_out_loss[c]
            for c in result.final.held_out_loss
        },
        "jaccard": sum(jaccard) / len(jaccard),
        "chance": sum(chance) / len(chance),
        "step_s": statistics.median(timer.seconds[1:]),
        "lora_rank": cfg.trainer.peft.r if cfg.trainer.peft else None,
    }


def in_fresh_process(arm: str, seed: int, steps: int) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--one", arm, "--seed", str(seed), "--steps", str(steps)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval of a few values."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def report(steps: int = 12, seeds: int = 3) -> dict:
    runs: dict[str, list[dict]] = {}
    plan = [("full", 0), ("lora", 0), ("isn math", 0), ("random math", 0)]
    plan += [(arm, seed) for seed in range(seeds) for arm in ("isn", "random")]
    for arm, seed in plan:
        runs.setdefault(arm, []).append(in_fresh_process(arm, seed, steps))
    print(
        f"\nISN-only against its controls: {MODEL}, {steps} SFT steps at batch 4 (<= 192 tokens), the held-out "
        "loss on 12 instructions per category never trained on; ISNs: top 1% of each layer's neurons per "
        "category (percentile_layer 0.01), union of the six"
    )
    categories = list(runs["full"][0]["loss_change"])
    print(
        f"{'arm':<12} {'seeds':>5} {'trainable':>11} {'share':>7} {'step s':>7} {'loss change (mean)':>19} "
        f"{'ISN Jaccard':>12} {'chance':>7}  " + " ".join(f"{c[:8]:>8}" for c in categories)
    )
    for arm, done in runs.items():
        mean_change = statistics.mean(_mean(r["loss_change"]) for r in done)
        per_category = [statistics.mean(r["loss_change"][c] for r in done) for c in categories]
        print(
            f"{arm:<12} {len(done):>5} {done[0]['trainable']:>11,} {done[0]['trainable'] / done[0]['parameters']:>7.2%} "
            f"{statistics.median(r['step_s'] for r in done):>7.2f} {mean_change:>+19.4f} "
            f"{statistics.mean(r['jaccard'] for r in done):>12.3f} {statistics.mean(r['chance'] for r in done):>7.3f}  "
            + " ".join(f"{v:>+8.4f}" for v in per_category)
        )
    differences = [
        _mean(i["loss_change"]) - _mean(r["loss_change"])
        for i, r in zip(runs["isn"], runs["random"], strict=True)
    ]
    mean, low, high = t_interval(differences)
    print(
        f"ISN - random, held-out loss change (mean over categories), paired by seed: {mean:+.4f} "
        f"(95% t-interval {low:+.4f} to {high:+.4f}, {len(differences)} seeds); below 0: the ISNs lowered the loss more"
    )

    def targeted(row: dict) -> float:
        others = [v for c, v in row["loss_change"].items() if c != "math"]
        return row["loss_change"]["math"] - sum(others) / len(others)

    print(
        f"math ISNs only: math's loss change minus the other categories' mean {targeted(runs['isn math'][0]):+.4f}; "
        f"their matched random control {targeted(runs['random math'][0]):+.4f} (below 0: math gained more)"
    )
    return {"steps": steps, "runs": runs, "isn_minus_random": {"mean": mean, "ci95": [low, high]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.seed, args.steps)))
        return 0
    report(args.steps, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
