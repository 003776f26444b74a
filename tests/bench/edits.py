"""Ablation and steering against their floor: the same number of bare forward passes over the same
records. Each edited pass is one forward over the evaluated instructions, so the floor is
``passes x one forward``; what the modes add on top (setting up and removing interventions,
selecting the ISNs, tokenising, the loss) is the ratio's excess over 1."""

from __future__ import annotations

import time

import torch

from sparcom.data import load_records
from sparcom.edit.ablation import ablation_matrices
from sparcom.edit.effects import Edits
from sparcom.edit.steer import dose_response, held_out
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording, record
from sparcom.train.sft import probe_set

from recording import side_by_side

MODELS = ("tiny-qwen2-moe", "smollm2-135m-instruct")


def bare_passes(model, tokenizer, records, passes: int, batch_size: int) -> None:
    """``passes`` plain forwards (logits and all) over the records' conversations, in the batches
    the response loss uses: what any measurement of a loss must run at the least."""
    from sparcom.recording.response_loss import ResponseLoss

    batches = ResponseLoss(tokenizer, records, sorted({r["category"] for r in records}), batch_size).batches
    with torch.no_grad():
        for _ in range(passes):
            for ids, attention, *_ in batches:
                model(input_ids=ids, attention_mask=attention, use_cache=False)


def report(per_category: int = 4, draws: int = 2, rounds: int = 2) -> dict:
    print(
        f"\nablation and steering against the same number of bare forward passes ({per_category} held-out "
        f"instructions per category, {draws} control draws, steering scales [0, 2])"
    )
    results = {}
    for name in MODELS:
        model, tokenizer = load_model(name)
        records = load_records()
        snapshot = record(model, tokenizer, probe_set(records, 4), Recording(), progress=False)
        evaluated = held_out(records, snapshot, per_category, seed=0)
        edits = Edits(per_category=per_category, control_draws=draws, batch_size=8)
        categories = len(snapshot.categories)
        ablation_passes = 1 + categories * (1 + draws)
        steering_passes = 1 + categories * 2 * (1 + draws)

        def ablate(model=model, tokenizer=tokenizer, evaluated=evaluated, snapshot=snapshot, edits=edits):
            ablation_matrices(model, tokenizer, evaluated, snapshot, edits)

        def steer(model=model, tokenizer=tokenizer, evaluated=evaluated, snapshot=snapshot, edits=edits):
            dose_response(model, tokenizer, evaluated, snapshot, edits, [0.0, 2.0])

        runs = {
            "ablate": ablate,
            "bare x ablate": lambda m=model, t=tokenizer, r=evaluated, n=ablation_passes: bare_passes(
                m, t, r, n, 8
            ),
            "steer": steer,
            "bare x steer": lambda m=model, t=tokenizer, r=evaluated, n=steering_passes: bare_passes(
                m, t, r, n, 8
            ),
        }
        started = time.perf_counter()
        medians = side_by_side(runs, rounds)
        results[name] = medians
        print(
            f"{name}: ablate {medians['ablate']['wall_s']:.1f}s ({ablation_passes} passes) = "
            f"{medians['ablate']['wall_s'] / medians['bare x ablate']['wall_s']:.3f}x its bare passes; steer "
            f"{medians['steer']['wall_s']:.1f}s ({steering_passes} passes) = "
            f"{medians['steer']['wall_s'] / medians['bare x steer']['wall_s']:.3f}x (target <= 1.2; "
            f"{time.perf_counter() - started:.0f}s)"
        )
    return results
