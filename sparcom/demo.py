"""``make demo``: fine-tune a tiny offline MoE on HexaInst while recording its ISN/ISE drift,
then turn the run into the report. Everything offline, on CPU, in about a minute.

    python -m sparcom.demo [--steps 40] [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")
    run = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    started = time.perf_counter()
    print(
        f"[1/2] train.py: tiny Qwen2-MoE, {args.steps} SFT steps, snapshots every {args.steps // 4} steps -> {run}"
    )
    train = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=tiny-qwen2-moe",
        f"hydra.run.dir={run}",
        f"trainer.args.max_steps={args.steps}",
        f"trainer.args.save_steps={max(args.steps // 4, 1)}",
        "trainer.args.learning_rate=3e-4",
        "sparcom.probe.per_category=20",
        "trainer.args.logging_steps=5",
    ]
    subprocess.run(train, check=True)
    print(f"[2/2] analyze.py run={run}")
    subprocess.run([sys.executable, str(ROOT / "analyze.py"), f"run={run}"], check=True)
    print(f"\nDone in {time.perf_counter() - started:.0f}s. Outputs in {run}:")
    outputs = {
        "analysis/compare/report.html": "the report: findings, tables with intervals, overlap matrices, drift",
        "analysis/compare/summary.json": "every number of the report, with its interval, p-value and chance level",
        "analysis/compare/tables/": "the tables as CSV and Markdown",
        "snapshots/": "one snapshot per checkpoint, drift.jsonl, figures/",
        "wandb/": "the offline W&B run (wandb sync to upload)",
    }
    for item, what in outputs.items():
        print(f"  {run / item}  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
