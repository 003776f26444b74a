"""``make demo``: fine-tune SmolLM2-135M-Instruct, a real trained model shipped in a wheel, on
HexaInst while recording its ISN drift and held-out loss, then turn the run into the report.
Everything offline, on CPU, in about 5 minutes on 2 cores (``experiment=demo``).

    python -m sparcom.demo [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    args = parser.parse_args(argv)
    run = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    started = time.perf_counter()
    print(
        f"[1/2] train.py experiment=demo: SmolLM2-135M-Instruct, 24 SFT steps, snapshots at 0, 12, 24 -> {run}"
    )
    train = [sys.executable, str(ROOT / "train.py"), "experiment=demo", f"hydra.run.dir={run}"]
    subprocess.run(train, check=True)
    trained = time.perf_counter() - started
    print(f"[2/2] analyze.py run={run}  (training took {trained:.0f}s)")
    subprocess.run([sys.executable, str(ROOT / "analyze.py"), f"run={run}"], check=True)
    print(f"\nDone in {time.perf_counter() - started:.0f}s. What changed:")
    print(what_changed(run))
    print(f"\nOutputs in {run}:")
    outputs = {
        "analysis/compare/report.html": "the report: findings, tables with intervals, overlap matrices, drift",
        "analysis/compare/summary.json": "every number of the report, with its interval, p-value and chance level",
        "snapshots/drift.jsonl": "drift and held-out loss per snapshot",
        "wandb/": "the offline W&B run (wandb sync to upload)",
    }
    for item, what in outputs.items():
        print(f"  {run / item}  {what}")
    return 0


def what_changed(run: Path) -> str:
    """The held-out loss and the ISN drift, first snapshot against last, per category, with the
    Jaccard that random sets of the same sizes would give and the split-half stability."""
    rows = [json.loads(line) for line in (run / "snapshots" / "drift.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    epsilon = f"{last['headline_epsilon']:g}"
    lines = [
        f"  ISN Jaccard at eps={epsilon}, step {first['step']} vs step {last['step']} (1: the same ISNs); "
        "chance: random sets of the same sizes; stability: two halves of the probe set at step 0",
        f"  {'category':<15}{'held-out loss':>24}{'ISN Jaccard':>13}{'chance':>9}{'stability':>11}",
    ]
    for category, loss in last["held_out_loss"].items():
        before = first["held_out_loss"][category]
        jaccard = last["isn_jaccard"]["base"][epsilon][category]
        chance = last.get("isn_chance", {}).get(epsilon, {}).get(category)
        stability = first["isn_stability"].get(epsilon, {}).get(category)
        lines.append(
            f"  {category:<15}{before:>11.3f} -> {loss:.3f}{jaccard:>13.3f}"
            + (f"{chance:>9.3f}" if chance is not None else f"{'–':>9}")
            + (f"{stability:>11.3f}" if stability is not None else "")
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
