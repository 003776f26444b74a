"""Recording cost on tiny models: recording against a bare forward and against an nnsight trace,
peak memory in a fresh process, and host synchronisations in the recording loop.

Methods alternate round by round on the same batches (the order reversed every other round), and
every ratio uses medians, so a noisy machine slows every method alike. A second bare arm, timed
in the same rounds, gives the A/A noise floor: how far apart two identical arms land here.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import sparcom
from sparcom.data import CATEGORIES, load_records
from sparcom.models.loading import build_tiny
from sparcom.recording.conversation import encode
from sparcom.recording.probe import Recording, length_bucketed, pad_batch

LLAMA = dict(
    num_hidden_layers=8, hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4
)
MODELS = {"llama-8x256": ("tiny-llama", LLAMA), "qwen2-moe": ("tiny-qwen2-moe", {})}
BATCH = 16
SCOPE = "prompt"


def probe_records(per_category: int) -> list[dict]:
    records = load_records()
    return [r for c in CATEGORIES for r in [x for x in records if x["category"] == c][:per_category]]


def bare_forward(model, tokenizer, records, logits: bool = True) -> None:
    """The floor: tokenise, the same length-bucketed batches, a no-grad forward, nothing counted.
    ``logits=False`` runs the forward the recorder runs (no vocabulary projection)."""
    encoded = [encode(r, tokenizer).needed_for(SCOPE) for r in records]
    device = next(model.parameters()).device
    keep = {} if logits else {"logits_to_keep": 1}
    with torch.no_grad():
        for batch in length_bucketed([len(e.input_ids) for e in encoded], BATCH):
            input_ids, attention, _ = pad_batch([encoded[i] for i in batch], SCOPE, tokenizer.pad_token_id)
            model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False, **keep
            )


def sparcom_record(model, tokenizer, records) -> sparcom.Snapshot:
    return sparcom.record(
        model, tokenizer, records, Recording(token_scope=SCOPE, batch_size=BATCH), progress=False
    )


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


METHODS: dict[str, Callable] = {
    "bare": lambda m, t, r: bare_forward(m, t, r, logits=False),
    "bare again": lambda m, t, r: bare_forward(m, t, r, logits=False),
    "full forward": bare_forward,
    "record": sparcom_record,
    "nnsight": nnsight_trace,
}


def side_by_side(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU (process) seconds of each run, the runs alternating within each round and
    their order reversed every other round. CPU seconds are steadier on a shared machine."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            started, started_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            if torch.cuda.is_available():  # a bare forward returns before the GPU has finished
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
    return {
        name: {"wall_s": statistics.median(wall[name]), "cpu_s": statistics.median(cpu[name])}
        for name in runs
    }


def ratio(medians: dict, over: str, under: str) -> str:
    wall = medians[over]["wall_s"] / medians[under]["wall_s"]
    cpu = medians[over]["cpu_s"] / medians[under]["cpu_s"]
    return f"{wall:.3f}x wall, {cpu:.3f}x CPU"


def peak_memory_mb(name: str, method: str, per_category: int) -> float:
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("run.py")),
            "--peak-memory",
            name,
            method,
            "--per-category",
            str(per_category),
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def memory(field: str) -> int:
    """Bytes of a /proc/self/status field: "VmRSS" (resident now) or "VmHWM" (the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, method: str, per_category: int) -> None:
    """In a fresh process: build the model, then run one method and print the peak RSS (MB) while
    it ran. Linux lets the high-water mark be reset (``clear_refs``), so the tokenizer's training
    and the imports before it do not count; elsewhere it is the process's max RSS."""
    preset, overrides = MODELS[name]
    model, tokenizer = build_tiny(preset, **overrides)
    records = probe_records(per_category)
    try:
        reset_peak()
        linux = True
    except OSError:
        linux = False
    METHODS[method](model, tokenizer, records)
    print(memory("VmHWM") / 2**20 if linux else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def host_syncs(model, tokenizer, records) -> dict[str, int]:
    """Calls that force a host synchronisation (``SYNCING``) made during the recording loop
    (``sparcom.recording.probe._run_batches``, every batch from input transfer to the copy of its rows), split
    by who made them: the model's forward (code of transformers or torch, which a bare forward runs
    too), or the recording itself (everything else: sparcom's loop and hooks)."""
    import transformers

    loop = sparcom.recording.probe._run_batches
    libraries = tuple(str(Path(package.__file__).parent) for package in (transformers, torch))
    calls = {"sparcom": 0, "model": 0, "batches": 0}
    inside = [False]
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counted_loop(*args, **kwargs):
        inside[0] = True
        try:
            return loop(*args, **kwargs)
        finally:
            inside[0] = False

    def counting(original):
        def wrapper(self, *args, **kwargs):
            if inside[0]:
                calls[
                    "model" if sys._getframe(1).f_code.co_filename.startswith(libraries) else "sparcom"
                ] += 1
            return original(self, *args, **kwargs)

        return wrapper

    try:
        sparcom.recording.probe._run_batches = counted_loop
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        sparcom_record(model, tokenizer, records)
    finally:
        sparcom.recording.probe._run_batches = loop
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    calls["batches"] = len(length_bucketed([0] * len(records), BATCH))
    return calls


def report(per_category: int, rounds: int) -> dict:
    records = probe_records(per_category)
    print(
        f"probe: {len(records)} HexaInst records, scope={SCOPE}, batch={BATCH}, rounds={rounds}, "
        f"threads={torch.get_num_threads()}"
    )
    results = {}
    for name, (preset, overrides) in MODELS.items():
        model, tokenizer = build_tiny(preset, **overrides)
        bare_forward(model, tokenizer, records[:BATCH])  # warm-up: allocator, kernels
        methods = ["bare", "record", "bare again", "full forward"] + (["nnsight"] if "llama" in name else [])
        runs = {m: partial(METHODS[m], model, tokenizer, records) for m in methods}
        medians = side_by_side(runs, rounds)
        memory = {m: peak_memory_mb(name, m, per_category) for m in ("bare", "record")}
        syncs = host_syncs(model, tokenizer, records)
        results[name] = {"seconds": medians, "peak_rss_mb": memory, "host_syncs": syncs}
        print(
            f"\n{name}: median wall seconds "
            + ", ".join(f"{m}={s['wall_s']:.2f}" for m, s in medians.items())
        )
        print(
            f"  record / bare forward         = {ratio(medians, 'record', 'bare')}  (target <= 1.10; "
            f"A/A noise floor, bare vs bare: {ratio(medians, 'bare again', 'bare')})"
        )
        print(
            f"  record / forward with logits  = {ratio(medians, 'record', 'full forward')}  "
            "(the recorder skips the vocabulary projection; the line above compares like with like)"
        )
        if "nnsight" in medians:
            speedup = medians["nnsight"]["wall_s"] / medians["record"]["wall_s"]
            print(f"  nnsight / record (speed-up)   = {speedup:.2f}x  (target >= 1.3)")
        counts = sum(c.nbytes for c in sparcom_record(model, tokenizer, records).instruction_counts.values())
        print(
            f"  peak RSS MB while running: bare={memory['bare']:.0f} record={memory['record']:.0f} "
            f"(ratio {memory['record'] / memory['bare']:.3f}; per-instruction counts {counts / 2**20:.2f} MB)"
        )
        print(
            f"  host syncs in the recording loop over {syncs['batches']} batches: "
            f"{syncs['sparcom']} from sparcom, {syncs['model']} from the model's own forward"
        )
    return results
