"""``make bench``: what recording costs, measured side by side in one run and printed as ratios.

Sections: ``recording`` (tiny models: recording against a bare forward and against nnsight, peak
memory, host synchronisations), ``training`` (the callback's overhead on a training run) and
``scale`` (the paper's models' real layer shapes, a few layers each). ``--device cuda --dtype
bfloat16`` runs the scale section on a GPU, where it also reports device memory and how many
firing decisions bfloat16 changes against float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import recording
import scale
import torch
import training

SECTIONS = ("recording", "training", "scale")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--per-category", type=int, default=60, help="probe records per category (tiny models)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="device of the scale section (cpu, cuda)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the scale section")
    parser.add_argument("--scale-models", nargs="+", choices=list(scale.SHAPES), default=None)
    parser.add_argument("--scale-per-category", type=int, default=2, help="prompts per category (scale)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 is steadier on a shared machine)",
    )
    parser.add_argument("--peak-memory", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_memory:
        recording.peak_memory_child(*args.peak_memory, args.per_category)
        return 0
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype):
        parser.error(f"unknown --dtype {args.dtype!r}; expected e.g. float32, bfloat16")

    results = {}
    if "recording" in args.sections:
        results["recording"] = recording.report(args.per_category, args.rounds)
    if "training" in args.sections:
        models = {"qwen2-moe": recording.MODELS["qwen2-moe"], "llama-8x256": recording.MODELS["llama-8x256"]}
        results["training"] = training.report(models, args.rounds, recording.bare_forward)
    if "scale" in args.sections:
        results["scale"] = scale.report(
            args.device, dtype, args.scale_per_category, args.rounds, args.scale_models
        )
    Path("outputs").mkdir(exist_ok=True)
    Path("outputs/bench.json").write_text(json.dumps(results, indent=2, default=str))
    print("\nresults: outputs/bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
