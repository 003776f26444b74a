"""``make bench``: what sparcom costs, measured side by side in one run and printed as ratios.

Sections: ``recording`` (tiny models: recording against a bare forward and against nnsight, peak
memory, host synchronisations), ``training`` (the callback's overhead on a training run), ``scale``
(recording through the paper's models' real layer shapes, a few layers each), ``analysis`` (a full
comparison of two snapshots of each real model's shape: peak RSS and time against the size on
disk), ``statistics`` (each statistics pass against the full-sample statistic it resamples),
``real`` (SmolLM2-135M-Instruct, the packaged real model: recording against a bare forward, peak
RSS, a training-run snapshot, steps with and without the callback), ``edits`` (ablation and steering against the same number of bare forward passes), ``isn`` (ISN-only fine-tuning against LoRA and full fine-tuning), ``explain`` (the neuron
explorer's pass and the generated token scope against the forwards they need) and ``coverage`` (the bootstrap
intervals' coverage over synthetic datasets; long, so not in the default run). ``--device cuda
--dtype bfloat16`` runs the scale section on a GPU, where it also reports device memory and how
many firing decisions bfloat16 changes against float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import analysis_scale
import edits
import explorer
import isn_vs_lora
import real
import scale
import torch

import recording
import training
from helpers.synthetic_shapes import LAYOUTS

SECTIONS = (
    "recording",
    "training",
    "real",
    "scale",
    "analysis",
    "statistics",
    "isn",
    "edits",
    "explain",
    "coverage",
)
DEFAULT = SECTIONS[:-1]
HERE = Path(__file__).resolve().parent


def printed(script: str, *arguments: str) -> None:
    """A bench that prints its own table: run it as it is, its output streamed."""
    subprocess.run([sys.executable, str(HERE / script), *arguments], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT))
    parser.add_argument(
        "--per-category", type=int, default=60, help="probe records per category (tiny models)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isn-steps", type=int, default=12, help="SFT steps per arm (isn)")
    parser.add_argument("--isn-seeds", type=int, default=3, help="seeds of the ISN and random arms (isn)")
    parser.add_argument(
        "--real-per-category", type=int, default=50, help="probe prompts per category (real; 200 = HexaInst)"
    )
    parser.add_argument("--device", default="cpu", help="device of the scale section (cpu, cuda)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the scale section")
    parser.add_argument("--scale-models", nargs="+", choices=list(scale.SHAPES), default=None)
    parser.add_argument("--scale-per-category", type=int, default=2, help="prompts per category (scale)")
    parser.add_argument("--analysis-layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument(
        "--analysis-width", type=float, default=1.0, help="neuron width of the analysis snapshots (1 = real)"
    )
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
    if "real" in args.sections:
        results["real"] = real.report(args.real_per_category, args.rounds)
    if "scale" in args.sections:
        results["scale"] = scale.report(
            args.device, dtype, args.scale_per_category, args.rounds, args.scale_models
        )
    if "analysis" in args.sections:
        results["analysis"] = analysis_scale.report(args.analysis_layouts, width=args.analysis_width)
    if "statistics" in args.sections:
        print("\nstatistics passes (fresh process each)")
        printed("stats.py")
    if "isn" in args.sections:
        results["isn"] = isn_vs_lora.report(args.isn_steps, args.isn_seeds)
    if "edits" in args.sections:
        results["edits"] = edits.report(rounds=min(args.rounds, 2))
    if "explain" in args.sections:
        results["explain"] = explorer.report(args.per_category, args.rounds)
    if "coverage" in args.sections:
        print("\ncoverage of the 95% bootstrap intervals")
        printed("coverage.py")
    Path("outputs").mkdir(exist_ok=True)
    Path("outputs/bench.json").write_text(json.dumps(results, indent=2, default=str))
    print("\nresults: outputs/bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
