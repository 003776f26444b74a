"""Presets and the one loader: tiny models built offline, saved to disk, loaded by path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import sparcom
from sparcom.conversation import encode, messages
from sparcom.models import TINY_PRESETS, load_model
from sparcom.sites import ARCHITECTURES

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def test_every_preset_file_names_a_loadable_model():
    presets = sorted(CONF.glob("*.yaml"))
    assert len(presets) >= 15
    for path in presets:
        spec = yaml.safe_load(path.read_text())
        assert set(spec) == {"name_or_path", "dtype", "chat_template_from"}, path.name
        if spec["name_or_path"].startswith("tiny-"):
            assert spec["name_or_path"] in TINY_PRESETS
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
    assert bool((encoded.prompt_mask ^ encoded.response_mask).all())
    prompt = tokenizer.decode(encoded.input_ids[encoded.prompt_mask])
    response = tokenizer.decode(encoded.input_ids[encoded.response_mask])
    assert prompt.endswith("<|im_start|>assistant\n") and record["input"] in prompt
    assert response == record["output"] + "<|im_end|>\n"
    assert encoded.prompt_mask[: int(encoded.prompt_mask.sum())].all()  # prompt first, then response
