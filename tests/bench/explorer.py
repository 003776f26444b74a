"""The neuron explorer's pass and the generated token scope, against the work they cannot avoid.

- explain: ``top_activations`` over the probe set for each category's most specific neurons,
  against a bare no-grad forward over the same batches (what the pass needs at least);
- generated: recording with ``token_scope="generated"`` (greedy generation, then the counting
  forward over prompt + continuation) against greedy generation alone, and against a prompt-scope
  recording (the cost of counting each model's own words instead of its prompts).

Runs alternate round by round (``recording.side_by_side``); ratios are of medians.
"""

from __future__ import annotations

from functools import partial

import torch

import sparcom
from sparcom.edit.explain import most_specific, top_activations
from sparcom.models.loading import build_tiny
from sparcom.recording.conversation import encode
from sparcom.recording.generation import greedy_continuations
from sparcom.recording.probe import Recording
from sparcom.recording.recorder import inference_mode

from recording import BATCH, MODELS, bare_forward, probe_records, ratio, side_by_side

PER_CATEGORY_NEURONS = 20
TOP = 10
NEW_TOKENS = 32


def report(per_category: int, rounds: int) -> dict:
    records = probe_records(per_category)
    print(
        f"\nexplain and generated scope: {len(records)} HexaInst records, batch={BATCH}, rounds={rounds}, "
        f"{PER_CATEGORY_NEURONS} neurons per category, top {TOP}, max_new_tokens={NEW_TOKENS}"
    )
    results = {}
    for name, (preset, overrides) in MODELS.items():
        model, tokenizer = build_tiny(preset, **overrides)
        snapshot = sparcom.record(model, tokenizer, records, Recording(batch_size=BATCH), progress=False)
        neurons = most_specific(snapshot, PER_CATEGORY_NEURONS)

        def explain_pass(model=model, tokenizer=tokenizer, neurons=neurons):
            # tokenised inside, as the bare forward is: like with like
            prompts = [encode(r, tokenizer).needed_for("prompt") for r in records]
            top_activations(model, prompts, neurons, TOP, "prompt", BATCH)

        bare = partial(bare_forward, model, tokenizer, records, logits=False)
        medians = side_by_side({"bare": bare, "explain": explain_pass}, rounds)

        def generate_only(model=model, tokenizer=tokenizer):
            prompts = [encode(r, tokenizer).needed_for("prompt") for r in records]
            with inference_mode(model):
                greedy_continuations(model, tokenizer, prompts, NEW_TOKENS, BATCH)

        generated_scope = Recording(token_scope="generated", batch_size=BATCH, max_new_tokens=NEW_TOKENS)
        generated = side_by_side(
            {
                "prompt scope": partial(
                    sparcom.record, model, tokenizer, records, Recording(batch_size=BATCH), progress=False
                ),
                "generate only": generate_only,
                "generated scope": partial(
                    sparcom.record, model, tokenizer, records, generated_scope, progress=False
                ),
            },
            rounds,
        )
        state = sum(
            t.nbytes for t in (torch.zeros(len(neurons), TOP), torch.zeros(len(neurons), TOP, 2).long())
        )
        results[name] = {"explain": medians, "generated": generated, "running_top_bytes": state}
        print(
            f"\n{name}: {len(neurons)} neurons; explain pass / bare forward = {ratio(medians, 'explain', 'bare')} "
            f"(running top-k state {state / 1024:.0f} KiB)"
        )
        print(
            f"  generated scope / greedy generation alone = {ratio(generated, 'generated scope', 'generate only')}; "
            f"/ prompt-scope recording = {ratio(generated, 'generated scope', 'prompt scope')}"
        )
    return results
