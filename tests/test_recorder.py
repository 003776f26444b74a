"""The recorder: counts against an independent recomputation on every tiny architecture, the
forward it runs while recording, and the memory its counts take on the device and the host."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import sparcom
from sparcom.models.loading import TINY_PRESETS, load_model
from sparcom.models.sites import ARCHITECTURES, UnsupportedModelError, find_sites
from sparcom.recording.host_rows import count_dtype
from sparcom.recording.probe import Recording
from sparcom.recording.recorder import Recorder, count_memory, exact_float

import helpers.models as conftest
from bench.held import count_bytes_at_fullest
from helpers.models import exact_model
from helpers.reference import Reference

PRESETS = sorted(TINY_PRESETS)


def _reference(model, tokenizer, records, scope):
    architecture = ARCHITECTURES[model.config.model_type]
    return Reference(model, tokenizer, records, scope, architecture.dense_mlp, architecture.moe_block)


@pytest.mark.parametrize("preset", PRESETS)
def test_counts_equal_independent_recomputation(preset, small_records):
    model, tokenizer = exact_model(preset)
    reference = _reference(model, tokenizer, small_records, "all")
    snapshot = sparcom.record(
        model, tokenizer, small_records, Recording(token_scope="all", batch_size=5), progress=False
    )
    reference.remove()
    expected = reference.counts()
    assert set(expected) == set(snapshot.instruction_counts)
    for site, counts in expected.items():
        assert torch.equal(snapshot.instruction_counts[site], counts), site
    assert any(int(c.sum()) > 0 for c in expected.values())


@pytest.mark.parametrize("preset", PRESETS)
def test_batch_size_does_not_change_counts(preset, small_records):
    model, tokenizer = exact_model(preset)
    one = sparcom.record(model, tokenizer, small_records, Recording(batch_size=1), progress=False)
    sixteen = sparcom.record(model, tokenizer, small_records, Recording(batch_size=16), progress=False)
    assert one.tokens == sixteen.tokens
    for site in one.category_counts:
        assert torch.equal(one.instruction_counts[site], sixteen.instruction_counts[site]), site


@pytest.mark.parametrize("preset", [p for p in PRESETS if ARCHITECTURES[TINY_PRESETS[p][0]].moe_block])
def test_router_totals_and_expert_bounds(preset, small_records):
    model, tokenizer = exact_model(preset)
    snapshot = sparcom.record(model, tokenizer, small_records, Recording(token_scope="all"), progress=False)
    top_k = model.config.num_experts_per_tok
    for router in snapshot.sites("router"):
        per_category = snapshot.category_counts[router].sum(dim=1)
        assert torch.equal(per_category, top_k * snapshot.category_tokens)
        experts = router.rsplit(".", 1)[0] + ".experts"
        neurons = snapshot.instruction_counts[experts]  # [N, E, d]
        assert (neurons <= snapshot.instruction_counts[router][:, :, None]).all()


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_counts_right(implementation, small_records):
    """float32, as users run it: the reference recounts in float64 from the same captured inputs;
    only gates within 1e-4 of zero may legitimately round to the other side."""
    model, tokenizer = sparcom.models.loading.load_model("tiny-qwen2-moe")
    model.set_experts_implementation(implementation)
    reference = _reference(model, tokenizer, small_records, "all")
    snapshot = sparcom.record(
        model, tokenizer, small_records, Recording(token_scope="all", batch_size=4), progress=False
    )
    reference.remove()
    expected = reference.counts()
    for site, counts in expected.items():
        difference = int((snapshot.instruction_counts[site] - counts).abs().sum())
        assert difference <= max(1, counts.sum().item() // 100_000), (site, difference)
        if site.endswith(".gate"):
            assert difference == 0


def test_padding_never_counts(small_records):
    """Token totals equal the mask lengths; padding rows in a length-bucketed batch add nothing."""
    model, tokenizer = exact_model("tiny-llama")
    snapshot = sparcom.record(
        model, tokenizer, small_records, Recording(token_scope="response", batch_size=7), progress=False
    )
    expected = {c: 0 for c in snapshot.categories}
    for r in small_records:
        expected[r["category"]] += int(
            sparcom.recording.conversation.encode(r, tokenizer).response_mask.sum()
        )
    assert snapshot.tokens == expected
    for site in snapshot.sites("ffn"):
        assert (snapshot.category_counts[site] <= snapshot.category_tokens[:, None]).all()


def test_scopes_partition_the_tokens(small_records):
    model, tokenizer = exact_model("tiny-olmoe")
    prompt, response, both = (
        sparcom.record(model, tokenizer, small_records, Recording(token_scope=s), progress=False)
        for s in ("prompt", "response", "all")
    )
    for site in both.category_counts:
        assert torch.equal(
            prompt.category_counts[site] + response.category_counts[site], both.category_counts[site]
        )


def test_hooks_are_removed_and_mode_restored(small_records):
    model, tokenizer = sparcom.models.loading.load_model("tiny-qwen2-moe")
    model.train()
    sparcom.record(model, tokenizer, small_records[:2], progress=False)
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="supported: .*llama.*qwen2_moe"):
        find_sites(model)


def test_bad_arguments_fail_early(small_records):
    model, tokenizer = sparcom.models.loading.load_model("tiny-llama")
    with pytest.raises(ValueError, match="token_scope 'instructions'.*prompt"):
        sparcom.record(model, tokenizer, small_records, Recording(token_scope="instructions"))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        sparcom.record(model, tokenizer, small_records, Recording(batch_size=0))


def test_non_finite_activations_warn_with_the_site(small_records):
    model, tokenizer = sparcom.models.loading.load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[2].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"non-finite .* at model\.layers\.2\.mlp"):
        snapshot = sparcom.record(model, tokenizer, small_records[:3], progress=False)
    assert int(snapshot.category_counts["model.layers.2.mlp"][:, 0].sum()) == 0  # NaN never counts


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe", "tiny-llama"])
def test_count_buffers_on_the_device_are_bounded_by_the_batch(preset):
    """Two rows at a time over 6 or 36 instructions: at its fullest (after a forward, before the
    rows go to the host) the recorder holds one batch's rows, the category totals and a checksum
    per site, exactly as ``count_memory`` computes from the shapes, whatever the number of
    instructions; the per-instruction counts live on the host, in int16."""
    model, tokenizer = load_model(preset)
    sites = [site for site, _ in find_sites(model)]
    for per_category in (1, 6):
        records = conftest.per_category(per_category)
        fullest, snapshot = count_bytes_at_fullest(
            model, partial(sparcom.record, model, tokenizer, records, Recording(batch_size=2), progress=False)
        )
        expected = count_memory(sites, batch_size=2, num_categories=6, num_instructions=len(records))
        assert fullest == expected.device, per_category
        assert sum(counts.nbytes for counts in snapshot.instruction_counts.values()) == expected.host
        assert {c.dtype for c in snapshot.instruction_counts.values()} == {torch.int16}


@pytest.mark.parametrize("preset", ["tiny-qwen2-moe", "tiny-mixtral", "tiny-deepseek-v3"])
def test_recording_runs_the_models_own_computation(preset, small_records):
    """While recording, the fused experts run transformers' grouped_mm computation op for op
    (counting from the projection it computes anyway): the model's outputs are bitwise those of
    its grouped_mm implementation, and within rounding of eager's. The forward is restored after."""
    model, tokenizer = load_model(preset)
    encoded = [sparcom.recording.conversation.encode(r, tokenizer) for r in small_records[:6]]
    input_ids, attention, scope = sparcom.recording.probe.pad_batch(encoded, "all", tokenizer.pad_token_id)
    outputs = {}
    with torch.no_grad():
        for implementation in ("grouped_mm", "eager"):
            model.set_experts_implementation(implementation)
            outputs[implementation] = model(input_ids=input_ids, attention_mask=attention).logits
            recorder = Recorder(model, num_categories=6)
            recorder.stops_early = False  # the whole forward, to compare its outputs
            with recorder:
                recorder.set_batch(scope, torch.arange(6))
                outputs[f"recording, {implementation} configured"] = model(
                    input_ids=input_ids, attention_mask=attention
                ).logits
    assert torch.equal(outputs["recording, grouped_mm configured"], outputs["grouped_mm"])
    assert torch.equal(outputs["recording, eager configured"], outputs["grouped_mm"])
    torch.testing.assert_close(outputs["eager"], outputs["grouped_mm"], rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())


def test_counts_take_the_narrowest_exact_dtype():
    """Per-instruction counts never exceed the instruction's counted tokens, category totals its
    category's: the dtypes follow those bounds, with no room for a count to wrap or round."""
    assert count_dtype(32_767) == torch.int16 and count_dtype(32_768) == torch.int32
    assert count_dtype(2**31) == torch.int64
    assert count_dtype(5, smallest=torch.int32) == torch.int32
    assert exact_float(2**24 - 1) == torch.float32 and exact_float(2**24) == torch.float64
    assert torch.tensor(2**24 - 1, dtype=torch.float32) + 1 == 2**24  # still exact at the bound


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2-moe", "tiny-deepseek-v2"])
def test_stopping_the_forward_after_the_last_site_counts_the_same(preset, small_records):
    """Recording cuts each forward short once every site has counted (the last layer's up and down
    projections, the final norm and the head are not needed): the counts equal those of the whole
    forward, and the model's modules are left as they were."""
    model, tokenizer = exact_model(preset)
    cut = sparcom.record(model, tokenizer, small_records, Recording(batch_size=4), progress=False)
    original = Recorder.__init__

    def whole(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.stops_early = False

    Recorder.__init__ = whole
    try:
        full = sparcom.record(model, tokenizer, small_records, Recording(batch_size=4), progress=False)
    finally:
        Recorder.__init__ = original
    assert Recorder(model, 6).stops_early  # the cut was taken
    for site in full.category_counts:
        assert torch.equal(cut.category_counts[site], full.category_counts[site]), site
        assert torch.equal(cut.instruction_counts[site], full.instruction_counts[site]), site
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():  # and the model still runs whole afterwards
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
