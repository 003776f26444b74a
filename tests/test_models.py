"""Presets and the one loader: tiny models built offline, saved to disk, loaded by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import sparcom
from sparcom.models.loading import TINY_PRESETS, load_model
from sparcom.models.packaged import PACKAGED
from sparcom.models.sites import ARCHITECTURES
from sparcom.recording.conversation import encode, messages
from sparcom.recording.probe import Recording

from helpers.models import exact_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def test_every_preset_file_names_a_loadable_model():
    presets = sorted(CONF.glob("*.yaml"))
    assert len(presets) >= 15
    for path in presets:
        spec = yaml.safe_load(path.read_text())
        assert set(spec) == {"name_or_path", "dtype", "chat_template_from"}, path.name
        if spec["name_or_path"].startswith("tiny-"):
            assert spec["name_or_path"] in TINY_PRESETS
        elif spec["name_or_path"] in PACKAGED:
            assert path.stem == spec["name_or_path"]
        else:
            assert "/" in spec["name_or_path"], path.name  # a hub id


def test_tiny_presets_are_deterministic_and_supported():
    for model_type, _ in TINY_PRESETS.values():
        assert model_type in ARCHITECTURES
    first, _ = load_model("tiny-olmoe")
    second, _ = load_model("tiny-olmoe")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_saved_tiny_model_loads_by_path_through_the_hub_code_path(tmp_path, small_records):
    model, tokenizer = load_model("tiny-qwen2-moe")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, loaded_tokenizer = load_model(str(tmp_path / "model"))
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    ids = encode(small_records[0], tokenizer).input_ids[None]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    a = sparcom.record(model, tokenizer, small_records, progress=False)
    b = sparcom.record(loaded, loaded_tokenizer, small_records, progress=False)
    for site in a.category_counts:
        assert torch.equal(a.category_counts[site], b.category_counts[site])


def test_unknown_tiny_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown tiny preset 'tiny-gpt5'.*tiny-llama"):
        load_model("tiny-gpt5")


def test_conversation_masks_split_prompt_and_response(small_records):
    _, tokenizer = load_model("tiny-llama")
    record = next(r for r in small_records if r["input"])
    assert messages(record)[0]["content"] == record["instruction"] + "\n\n" + record["input"]
    encoded = encode(record, tokenizer)
    assert bool((encoded.prompt_mask ^ encoded.response_mask).all())  # this template injects no context
    prompt = tokenizer.decode(encoded.input_ids[encoded.prompt_mask])
    response = tokenizer.decode(encoded.input_ids[encoded.response_mask])
    assert prompt.endswith("<|im_start|>assistant\n") and record["input"] in prompt
    assert response == record["output"] + "<|im_end|>\n"
    assert encoded.prompt_mask[: int(encoded.prompt_mask.sum())].all()  # prompt first, then response


# ----------------------------------------------------------------- models bigger than one device


@pytest.fixture(scope="module")
def saved_exact_moe(tmp_path_factory) -> Path:
    """tiny-qwen2-moe in float64, saved: kernel rounding can no longer flip a gate's sign, so any
    placement of the same weights must count exactly the same."""
    model, tokenizer = exact_model("tiny-qwen2-moe")
    path = tmp_path_factory.mktemp("exact") / "tiny-qwen2-moe"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _eager(model):
    model.set_experts_implementation("eager")
    return model


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_offloaded_layers_record_exactly_what_resident_ones_do(saved_exact_moe, small_records, tmp_path):
    resident, tokenizer = load_model(str(saved_exact_moe), dtype="float64")
    plain = sparcom.record(
        _eager(resident), tokenizer, small_records, Recording(token_scope="all"), progress=False
    )

    # Room on the CPU for about two layers: accelerate puts the rest on disk, loaded per forward.
    budget = int(0.8 * _weight_bytes(resident))
    dispatched, _ = load_model(
        str(saved_exact_moe),
        dtype="float64",
        device_map="auto",
        max_memory={"cpu": budget},
        offload_folder=tmp_path / "offload",
    )
    placements = dispatched.hf_device_map
    assert "disk" in placements.values() and any(
        name.startswith("model.layers.") and device == "cpu" for name, device in placements.items()
    ), placements
    assert dispatched.model.layers[3].mlp.experts.gate_up_proj.device.type == "meta"  # truly offloaded
    on_disk = sparcom.record(
        _eager(dispatched), tokenizer, small_records, Recording(token_scope="all"), progress=False
    )

    from accelerate import cpu_offload

    offloaded, _ = load_model(str(saved_exact_moe), dtype="float64")
    cpu_offload(_eager(offloaded), execution_device=torch.device("cpu"))  # every weight in an offload store
    in_store = sparcom.record(
        offloaded, tokenizer, small_records, Recording(token_scope="all"), progress=False
    )

    assert any(int(c.sum()) > 0 for c in plain.instruction_counts.values())
    for snapshot in (on_disk, in_store):
        assert snapshot.tokens == plain.tokens
        for site, counts in plain.instruction_counts.items():
            assert torch.equal(snapshot.instruction_counts[site], counts), site
            assert torch.equal(snapshot.category_counts[site], plain.category_counts[site]), site
    # Recording left the offload hooks as they were: the model still runs and matches.
    ids = encode(small_records[0], tokenizer).input_ids[None]
    with torch.no_grad():
        assert torch.equal(dispatched(ids).logits, resident(ids).logits)


def test_interventions_refuse_offloaded_weights(saved_exact_moe, small_records, tmp_path):
    """Silencing neurons edits weights in place; on an offloaded module the edit would silently not
    apply (accelerate reloads the weights from its store), so it is refused, naming the site, and
    the ablation refuses before its long intact pass."""
    from sparcom.edit.ablation import ablation_matrices
    from sparcom.edit.effects import Edits
    from sparcom.edit.intervention import intervene

    model, tokenizer = load_model(
        str(saved_exact_moe), dtype="float64", device_map={"": "disk"}, offload_folder=tmp_path / "offload"
    )
    snapshot = sparcom.record(_eager(model), tokenizer, small_records, progress=False)
    site = snapshot.sites("ffn")[0]
    neurons = {site: torch.ones_like(snapshot.category_counts[site][0], dtype=torch.bool)}
    refused = pytest.raises(
        ValueError, match=rf"intervening on {site} edits weights in place, but .* is offloaded"
    )
    with refused, intervene(model, neurons, 0.0):
        pass
    passes = []
    model.register_forward_pre_hook(lambda *args: passes.append(1))
    with pytest.raises(ValueError, match="is offloaded"):
        ablation_matrices(model, tokenizer, small_records, snapshot, Edits(epsilon=0.5))
    assert not passes  # refused before any forward


def test_analyze_dispatches_a_model_over_cpu_and_disk_and_counts_the_same(
    saved_exact_moe, small_records, tmp_path
):
    """analyze.py's device_map, max_memory and offload_folder reach accelerate: the recording it
    makes of a model spread over CPU memory and disk equals the resident model's, count for count."""
    import dataclasses

    from analyze import loading
    from sparcom.cli import compose
    from sparcom.config import ProbeConfig
    from sparcom.report.workflows import Loading, load_for_analysis, record_model

    budget = int(0.8 * _weight_bytes(load_model(str(saved_exact_moe), dtype="float64")[0]))
    cfg = compose(
        "analyze",
        [
            f"base={saved_exact_moe}",
            f"tuned={saved_exact_moe}",
            "device_map=auto",
            f"+max_memory={{cpu: {budget}}}",
            f"offload_folder={tmp_path / 'offload'}",
        ],
    )
    spec = {"name_or_path": str(saved_exact_moe)}
    dispatch = dataclasses.replace(loading(cfg), dtype="float64")
    dispatched, _ = load_for_analysis(spec, dispatch)
    assert "disk" in dispatched.hf_device_map.values()
    probe, how = ProbeConfig(per_category=2), Recording(token_scope="all", batch_size=4)
    offloaded = record_model(spec, small_records, probe, how, dispatch)
    resident = record_model(spec, small_records, probe, how, Loading(dtype="float64"))
    assert any(int(c.sum()) > 0 for c in resident.instruction_counts.values())
    for site, counts in resident.instruction_counts.items():
        assert torch.equal(offloaded.instruction_counts[site], counts), site


def test_loading_options_are_checked_before_loading():
    with pytest.raises(ValueError, match="max_memory need a device_map"):
        load_model("tiny-llama", max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="tiny preset 'tiny-llama' takes a single device.*save_pretrained"):
        load_model("tiny-llama", device_map="auto")
    model, _ = load_model("tiny-llama", device_map="cpu")
    assert next(model.parameters()).device.type == "cpu"
