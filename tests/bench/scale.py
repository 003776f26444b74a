"""Recording at the real layer shapes of the paper's models: randomly initialised, only a few layers
and a small vocabulary, so a CPU can bear it. Per model: tokens/s of recording against the same
forward without hooks, the bytes of counts per instruction (device and host) at the full model's
depth, and what the recorder actually held for counts on the reduced model against that formula.
On a GPU (``--device cuda``) also the device memory the recording took and the fraction of firing
decisions that differ between bfloat16 and float32.
"""

from __future__ import annotations

import copy
import time
import warnings
from functools import partial
from pathlib import Path

import torch
from precision import decision_flips

import sparcom
from sparcom.models.loading import tiny_tokenizer
from sparcom.models.sites import find_sites
from sparcom.recording.conversation import encode
from sparcom.recording.recorder import count_memory

from held import count_bytes_at_fullest
from recording import BATCH, bare_forward, probe_records, side_by_side, sparcom_record

# model_type, the config of the full model (its real depth), and how many layers the bench builds.
SHAPES = {
    "Qwen1.5-MoE-A2.7B": (
        "qwen2_moe",
        dict(
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=16,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_experts=60,
            num_experts_per_tok=4,
            num_hidden_layers=24,
        ),
        2,
    ),
    "Llama-3.1-8B": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_hidden_layers=32,
        ),
        2,
    ),
    "DeepSeek-V2-Lite": (
        "deepseek_v2",
        dict(
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            num_attention_heads=16,
            num_key_value_heads=16,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            head_dim=64,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            num_hidden_layers=27,
        ),
        2,
    ),
    "Mixtral-8x7B": (
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_hidden_layers=32,
        ),
        1,
    ),
}
HEXAINST = 1200
CATEGORIES = 6


def build(model_type: str, config: dict, layers: int | None, device, dtype, seed: int = 0):
    """A randomly initialised model of this shape (``layers`` None: weights on the meta device, full
    depth, for its shapes only). Weights ~ N(0, 0.02), norms at 1: what an initialisation gives, without
    the cost of transformers' initialisers at this size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        **{**config, **({"num_hidden_layers": layers} if layers else {})},
    )
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if layers is None:
        return model
    buffers = {name: buffer.to(device) for name, buffer in model.named_buffers()}
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.02, generator=generator)
            else:
                parameter.fill_(1.0 if "norm" in name else 0.0)
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return model.eval()


def report(
    device: str,
    dtype: torch.dtype,
    per_category: int,
    rounds: int,
    models: list[str] | None = None,
    shapes: dict = SHAPES,
) -> dict:
    records = probe_records(per_category)
    print(
        f"\nscale: {len(records)} HexaInst prompts per pass, batch={BATCH}, {dtype}, {device}; random weights"
    )
    results = {}
    for name in models or list(shapes):
        model_type, config, layers = shapes[name]
        results[name] = one_model(name, model_type, config, layers, device, dtype, records, rounds)
    return results


def one_model(name, model_type, config, layers, device, dtype, records, rounds, precision=False) -> dict:
    """One shape's figures; ``precision`` (always on CUDA): also bfloat16 against float32 flips."""
    full = [site for site, _ in find_sites(build(model_type, config, None, device, dtype))]
    staging = torch.device(device).type == "cuda"
    memory = count_memory(full, BATCH, CATEGORIES, HEXAINST, staging=staging)
    per_instruction = memory.host // HEXAINST
    started = time.perf_counter()
    model = build(model_type, config, layers, device, dtype)
    tokenizer = tiny_tokenizer()
    built = time.perf_counter() - started
    tokens = sum(len(encode(r, tokenizer).needed_for("prompt").input_ids) for r in records)
    bare = partial(bare_forward, model, tokenizer, records, logits=False)
    bare()  # warm-up
    medians = side_by_side(
        {"bare": bare, "record": partial(sparcom_record, model, tokenizer, records), "bare again": bare},
        rounds,
    )
    speed = {m: tokens / s["wall_s"] for m, s in medians.items()}
    reduced = [site for site, _ in find_sites(model)]
    rows = min(BATCH, len(records))  # the largest batch
    expected = count_memory(reduced, rows, CATEGORIES, len(records)).device  # staging is not the recorder's
    held, _ = count_bytes_at_fullest(model, partial(sparcom_record, model, tokenizer, records))
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"\n{name} ({layers} of {config['num_hidden_layers']} layers, {parameters / 1e9:.2f} B parameters, "
        f"built in {built:.0f}s): {tokens} tokens per pass"
    )
    print(
        f"  tokens/s: bare {speed['bare']:.0f}, record {speed['record']:.0f}  ->  record / bare = "
        f"{medians['record']['wall_s'] / medians['bare']['wall_s']:.3f}x wall, "
        f"{medians['record']['cpu_s'] / medians['bare']['cpu_s']:.3f}x CPU "
        f"(A/A {medians['bare again']['wall_s'] / medians['bare']['wall_s']:.3f}x)"
    )
    print(
        f"  counts per instruction at full depth: {per_instruction / 2**20:.2f} MiB on the host (int16), "
        f"{2 * per_instruction / 2**20:.2f} MiB per batch row on the device (float32)"
    )
    print(
        f"  {HEXAINST} instructions, batch {BATCH}: device {memory.device / 2**30:.3f} GiB "
        f"(rows + category totals{' + staging' if staging else ''}), host {memory.host / 2**30:.2f} GiB; "
        f"int32 counts of every instruction on the device would take {2 * memory.host / 2**30:.2f} GiB"
    )
    print(
        f"  held for counts by the recorder on the reduced model: {held / 2**20:.2f} MiB "
        f"(formula {expected / 2**20:.2f} MiB)"
    )
    result = {
        "layers": layers,
        "tokens": tokens,
        "tokens_per_s": speed,
        "seconds": medians,
        "count_bytes_full_depth": memory.__dict__,
        "held_bytes": held,
        "formula_bytes": expected,
    }
    if precision or torch.device(device).type == "cuda":
        result |= gpu_figures(model, tokenizer, records, dtype)
    del model
    return result


def gpu_figures(model, tokenizer, records, dtype) -> dict:
    """Device memory a recording takes beyond the model's, synchronisations CUDA itself sees in the
    recording loop, and bfloat16 vs float32 decision flips. Written device-agnostic (memory and
    synchronisations are only measured on CUDA), so a test runs it on CPU."""
    result = {}
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        bare_forward(model, tokenizer, records, logits=False)
        bare_peak = torch.cuda.max_memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        sparcom_record(model, tokenizer, records)
        record_peak = torch.cuda.max_memory_allocated() - before
        syncs = cuda_syncs_in_loop(model, tokenizer, records)
        print(
            f"  device memory above the weights: bare forward {bare_peak / 2**20:.0f} MiB, "
            f"recording {record_peak / 2**20:.0f} MiB"
        )
        print(
            f"  synchronisations CUDA reports in the recording loop: {syncs['sparcom']} from sparcom, "
            f"{syncs['model']} from the model's own forward"
        )
        result |= {"device_peak_bytes": {"bare": bare_peak, "record": record_peak}, "cuda_syncs": syncs}
    reference = copy.deepcopy(model).to(torch.float32)
    lower = model if dtype != torch.float32 else copy.deepcopy(model).to(torch.bfloat16)
    flips = decision_flips(reference, lower, tokenizer, records)
    del reference
    shown = ", ".join(
        f"{kind} {f['fraction']:.2e} ({f['differing']} of {f['total']})" for kind, f in flips.items()
    )
    print(f"  firing decisions that differ, bfloat16 vs float32: {shown}")
    return result | {"decision_flips": flips}


def cuda_syncs_in_loop(model, tokenizer, records) -> dict[str, int]:
    """Synchronising CUDA calls during ``sparcom.recording.probe._run_batches`` (CUDA's sync debug mode warns
    on each, naming the Python line that made it), split into sparcom's and the model's."""
    loop = sparcom.recording.probe._run_batches
    ours = str(Path(sparcom.__file__).parent)

    def debugged(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return loop(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparcom.recording.probe._run_batches = debugged
        try:
            sparcom_record(model, tokenizer, records)
        finally:
            sparcom.recording.probe._run_batches = loop
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    mine = sum(1 for w in syncs if w.filename.startswith(ours))
    return {"sparcom": mine, "model": len(syncs) - mine}
