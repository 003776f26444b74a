"""``make bench``: recording cost, measured side by side in one run and printed as ratios.

Methods alternate round by round on the same batches, and each ratio uses the medians, so a
noisy machine slows every method alike. Peak memory is each method's max RSS in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import training

import sparcom
from sparcom.conversation import encode
from sparcom.data import CATEGORIES, load_records
from sparcom.models import build_tiny
from sparcom.probe import length_bucketed, pad_batch

LLAMA = dict(
    num_hidden_layers=8, hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4
)
MODELS = {"llama-8x256": ("tiny-llama", LLAMA), "qwen2-moe": ("tiny-qwen2-moe", {})}
BATCH = 16
SCOPE = "prompt"


def probe_records(per_category: int) -> list[dict]:
    records = load_records()
    return [r for c in CATEGORIES for r in [x for x in records if x["category"] == c][:per_category]]


def bare_forward(model, tokenizer, records) -> None:
    """The floor: tokenise, the same length-bucketed batches, a no-grad forward, nothing counted."""
    encoded = [encode(r, tokenizer).needed_for(SCOPE) for r in records]
    with torch.no_grad():
        for batch in length_bucketed([len(e.input_ids) for e in encoded], BATCH):
            input_ids, attention, _ = pad_batch([encoded[i] for i in batch], SCOPE, tokenizer.pad_token_id)
            model(input_ids=input_ids, attention_mask=attention, use_cache=False)


def sparcom_record(model, tokenizer, records) -> None:
    sparcom.record(model, tokenizer, records, token_scope=SCOPE, batch_size=BATCH, progress=False)


def nnsight_trace(model, tokenizer, records) -> None:
    """What a researcher would write: fixed-size padded batches in dataset order, an nnsight trace
    saving every ``act_fn`` output, then counts per category from the saved activations."""
    from nnsight import NNsight

    traced = NNsight(model)
    counts = {
        c: [torch.zeros(model.config.intermediate_size, dtype=torch.long) for _ in traced.model.layers]
        for c in CATEGORIES
    }
    for start in range(0, len(records), BATCH):
        rows = [encode(r, tokenizer).needed_for(SCOPE) for r in records[start : start + BATCH]]
        length = max(len(e.input_ids) for e in rows)
        input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, e in enumerate(rows):
            input_ids[i, : len(e.input_ids)] = e.input_ids
            attention[i, : len(e.input_ids)] = 1
            mask[i, : len(e.input_ids)] = e.prompt_mask
        saved = []
        with torch.no_grad(), traced.trace(input_ids=input_ids, attention_mask=attention, use_cache=False):
            for layer in traced.model.layers:
                saved.append(layer.mlp.act_fn.output.save())
        for i, record in enumerate(records[start : start + BATCH]):
            for layer, activation in enumerate(saved):
                counts[record["category"]][layer] += (activation[i][mask[i]] > 0).sum(0)


METHODS = {"bare": bare_forward, "record": sparcom_record, "nnsight": nnsight_trace}


def timings(preset: str, overrides: dict, methods: list[str], records, rounds: int) -> dict[str, float]:
    model, tokenizer = build_tiny(preset, **overrides)
    METHODS["bare"](model, tokenizer, records[:BATCH])  # warm-up: allocator, kernels
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method in methods:
            started = time.perf_counter()
            METHODS[method](model, tokenizer, records)
            times[method].append(time.perf_counter() - started)
    return {m: statistics.median(t) for m, t in times.items()}


def peak_memory_mb(name: str, method: str, per_category: int) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--peak-memory", name, method, "--per-category", str(per_category)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(done.stdout.strip().splitlines()[-1])


def host_syncs_per_batch(records) -> float:
    """Calls that force a host sync (item, tolist, cpu, numpy, bool) made from sparcom's hooks
    during a recording, divided by the number of batches."""
    recorder_file = str(Path(sparcom.recorder.__file__))
    calls = 0
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "cpu", "numpy", "__bool__")}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            nonlocal calls
            if sys._getframe(1).f_code.co_filename == recorder_file:
                calls += 1
            return original(self, *args, **kwargs)

        return wrapper

    model, tokenizer = build_tiny("tiny-qwen2-moe")
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        sparcom_record(model, tokenizer, records)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return calls / len(length_bucketed([0] * len(records), BATCH))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-category", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-memory", nargs=2, metavar=("MODEL", "METHOD"))
    args = parser.parse_args()
    records = probe_records(args.per_category)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if args.peak_memory:
        name, method = args.peak_memory
        preset, overrides = MODELS[name]
        model, tokenizer = build_tiny(preset, **overrides)
        METHODS[method](model, tokenizer, records)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return 0

    print(f"probe: {len(records)} HexaInst records, scope={SCOPE}, batch={BATCH}, rounds={args.rounds}, "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    results = {}
    for name, (preset, overrides) in MODELS.items():
        methods = ["bare", "record", "nnsight"] if name.startswith("llama") else ["bare", "record"]
        medians = timings(preset, overrides, methods, records, args.rounds)
        memory = {m: peak_memory_mb(name, m, args.per_category) for m in ("bare", "record")}
        results[name] = {"seconds": medians, "peak_rss_mb": memory}
        print(f"\n{name}: median seconds " + ", ".join(f"{m}={s:.2f}" for m, s in medians.items()))
        print(f"  record / bare forward       = {medians['record'] / medians['bare']:.3f}x  (target <= 1.15)")
        if "nnsight" in medians:
            print(
                f"  nnsight / record (speed-up) = {medians['nnsight'] / medians['record']:.2f}x  (target >= 1.3)"
            )
        print(f"  peak RSS MB: bare={memory['bare']:.0f} record={memory['record']:.0f} "
              f"(ratio {memory['record'] / memory['bare']:.3f})")  # fmt: skip
    results["training"] = training.report({"qwen2-moe": MODELS["qwen2-moe"], "llama-8x256": MODELS["llama-8x256"]},
                                          args.rounds, bare_forward)  # fmt: skip
    syncs = host_syncs_per_batch(records)
    print(f"\nhost syncs per batch from sparcom hooks: {syncs:g}")
    results["host_syncs_per_batch"] = syncs
    Path("outputs").mkdir(exist_ok=True)
    Path("outputs/bench.json").write_text(json.dumps(results, indent=2))
    print("results: outputs/bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
