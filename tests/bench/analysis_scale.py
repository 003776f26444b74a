"""Analysis at the paper's models' real shapes: peak memory and time of a full comparison.

For each layout (random counts with the site layout of a real model, 1,200 instructions), two
snapshots are written once into a cache folder (base, and a tuned twin with 20% of the neuron
frequencies moved); then ``analyze.py base=... tuned=...`` runs in a fresh process under
``/usr/bin/time -v``, statistics at their defaults, and its peak resident memory and wall time
are printed next to the snapshots' size on disk.

    python tests/bench/analysis_scale.py [--layouts qwen1.5-moe-a2.7b ...] [--width 1.0]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))

from helpers.synthetic_shapes import LAYOUTS, random_snapshot  # noqa: E402 - the tests folder is not a package


def snapshots(name: str, cache: Path, instructions: int, width: float) -> tuple[Path, Path]:
    """The cached base and tuned snapshots of a layout, written on first use."""
    layout = LAYOUTS[name].scaled(width=width)
    folder = cache / f"{name}-w{width:g}-n{instructions}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "base.safetensors", folder / "tuned.safetensors"
    for path, drift in zip(paths, (0.0, 0.2), strict=True):
        if not path.exists():
            started = time.perf_counter()
            random_snapshot(path, layout, instructions, seed=0, drift=drift)
            print(
                f"  wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.0f} s"
            )
    return paths


def measured(command: list[str]) -> dict:
    """Peak RSS (GB) and wall time (s) of a command in a fresh process."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**power for power, part in enumerate(reversed(clock.split(":"))))
    return {"peak_rss_gb": peak_kb / 1e6, "seconds": seconds}


def report(
    layouts: list[str], instructions: int = 1200, width: float = 1.0, cache: Path | None = None
) -> dict:
    cache = cache or ROOT / "outputs" / "bench-analysis-scale"
    print(f"\nanalysis at real shapes ({instructions} instructions, statistics at their defaults)")
    results = {}
    for name in layouts:
        base, tuned = snapshots(name, cache, instructions, width)
        out = cache / "reports" / name
        command = [sys.executable, str(ROOT / "analyze.py"), f"base={base}", f"tuned={tuned}", f"out={out}"]
        figures = measured(command) | {"snapshot_gb": base.stat().st_size / 1e9}
        results[name] = figures
        print(
            f"  {name:20s} snapshots {figures['snapshot_gb']:5.2f} GB each: peak RSS {figures['peak_rss_gb']:5.2f} GB, "
            f"{figures['seconds'] / 60:5.1f} min for the full comparison report"
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--instructions", type=int, default=1200)
    parser.add_argument(
        "--width", type=float, default=1.0, help="scale every neuron width (1 = the real model)"
    )
    args = parser.parse_args()
    report(args.layouts, args.instructions, args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
