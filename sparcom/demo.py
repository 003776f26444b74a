"""``make demo``: record HexaInst through a tiny offline MoE model and report its ISNs and ISEs.

python -m sparcom.demo [--model tiny-qwen2-moe] [--out outputs/demo] [--epsilon 0.5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from sparcom.data import load_records
from sparcom.metrics import general_and_unique, layer_profile, overlap_matrix, size
from sparcom.models import load_model
from sparcom.probe import record
from sparcom.report import layer_profile_plot, markdown_table, overlap_heatmap
from sparcom.select import category_isn, expert_frequency, ise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen2-moe")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--epsilon", type=float, default=0.5)
    parser.add_argument("--top-k-experts", type=int, default=2)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    records = load_records()
    model, tokenizer = load_model(args.model)
    snapshot = record(model, tokenizer, records, token_scope="prompt", batch_size=16)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    snapshot_path = snapshot.save(args.out / f"snapshot-{args.model}-{stamp}.safetensors")

    sets = {c: category_isn(snapshot, c, args.epsilon) for c in snapshot.categories}
    general, unique = general_and_unique(sets)
    rows = []
    for category in snapshot.categories:
        experts = ise(expert_frequency(snapshot, category), top_k=args.top_k_experts)
        first = next(iter(experts.values()), None)
        rows.append([category, snapshot.tokens[category], size(sets[category]), size(unique[category]),
                     first.nonzero().flatten().tolist() if first is not None else "-"])  # fmt: skip
    print(
        f"\nISNs of {args.model} on HexaInst prompts (epsilon={args.epsilon}); general ISNs: {size(general)}\n"
    )
    print(markdown_table(rows, ["category", "tokens", "ISNs", "unique ISNs", "ISEs of layer 0"]))

    matrix = overlap_matrix(snapshot, args.epsilon)
    heatmap = overlap_heatmap(matrix, snapshot.categories, f"ISN overlap, {args.model}, eps={args.epsilon}",
                              args.out / "overlap.png")  # fmt: skip
    profiles = {c: layer_profile(sets[c], snapshot.site_layers) for c in snapshot.categories}
    profile = layer_profile_plot(profiles, f"ISNs per layer, {args.model}", args.out / "layer_profile.png")
    print(f"\nDone in {time.perf_counter() - started:.0f}s. Outputs:")
    for path in (snapshot_path, heatmap, profile):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
