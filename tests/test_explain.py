"""The neuron explorer: the chosen neurons are the most specific ones, and their top contexts are
the largest activations of the probe set, recomputed by brute force from the model's weights."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from transformers.activations import ACT2FN

import sparcom
from analyze import analyze
from sparcom.cli import compose
from sparcom.edit.explain import (
    MARK,
    Context,
    Neuron,
    NeuronCard,
    RunningTop,
    explain,
    most_specific,
    neuron_named,
    specificity,
    write_neurons,
)
from sparcom.errors import ConfigError
from sparcom.models.loading import load_model
from sparcom.models.sites import ARCHITECTURES
from sparcom.recording.conversation import encode
from sparcom.recording.probe import Recording
from sparcom.report.cards import card_html
from sparcom.snapshot import Snapshot

from helpers.models import exact_model, per_category

TOP = 5
CHROMIUM = shutil.which("chromium")
NEWLINE = '<span class="newline">↵</span>'


def _counted_sequences(snapshot, records, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each record's token ids and counted mask, built here from the scope's definition."""
    scope = snapshot.meta["token_scope"]
    sequences = []
    for record in records:
        encoded = encode(record, tokenizer)
        if scope == "generated":
            prompt = encoded.input_ids[encoded.prompt_mask]
            continuation = torch.tensor(snapshot.generated[record["id"]], dtype=torch.long)
            ids = torch.cat([prompt, continuation])
            counted = torch.arange(len(ids)) >= len(prompt)
        else:
            ids, counted = encoded.input_ids, encoded.scope_mask(scope)
        sequences.append((ids, counted))
    return sequences


def _all_activations(model, sequences, neuron) -> list[torch.Tensor]:
    """``act(gate(x))`` of one neuron at every token of every sequence (NaN where it does not count:
    outside the scope, or a token its expert was not routed), from the block's captured input and
    the module weights, one unpadded forward per sequence."""
    architecture = ARCHITECTURES[model.config.model_type]
    act = ACT2FN[model.config.hidden_act]
    modules = dict(model.named_modules())
    routed = neuron.site.endswith(".experts")
    block = modules[neuron.site.rsplit(".", 1)[0] if routed else neuron.site]
    captured = []
    handle = block.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    values = []
    with torch.no_grad():
        for ids, counted in sequences:
            captured.clear()
            model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None])
            x = captured[0]  # [L, H]
            if routed:
                assert type(block).__name__ == architecture.moe_block
                expert, i = neuron.index
                experts = block.experts
                d_expert = experts.gate_up_proj.shape[1] // 2
                activation = act(x @ experts.gate_up_proj[expert, i])  # the gate row of neuron i
                on_expert = (block.gate(x)[2] == expert).any(-1)
                activation = torch.where(on_expert & counted, activation, torch.nan)
                assert i < d_expert
            else:
                activation = act(x @ block.gate_proj.weight[neuron.index[0]])
                activation = torch.where(counted, activation, torch.nan)
            values.append(activation)
    handle.remove()
    return values


@pytest.mark.parametrize(
    ("preset", "scope"),
    [("tiny-llama", "response"), ("tiny-qwen2-moe", "prompt"), ("tiny-qwen2-moe", "generated")],
)
def test_top_contexts_are_the_largest_recomputed_activations(preset, scope):
    model, tokenizer = exact_model(preset)
    records = per_category(3)
    snapshot = sparcom.record(
        model,
        tokenizer,
        records,
        Recording(token_scope=scope, max_new_tokens=12, batch_size=5),
        progress=False,
    )
    neurons = most_specific(snapshot, 2)
    if preset.endswith("moe"):  # a routed-expert neuron, which counts only where its expert is chosen
        neurons.append(neuron_named(snapshot, "model.layers.1.mlp.experts:3,7"))
    cards = explain(model, tokenizer, records, snapshot, neurons, top=TOP, batch_size=4)
    sequences = _counted_sequences(snapshot, records, tokenizer)
    position_of = {r["id"]: n for n, r in enumerate(records)}
    for card in cards:
        values = _all_activations(model, sequences, card.neuron)
        everything = torch.cat(values)
        everything = everything[~everything.isnan()].sort(descending=True).values
        reported = torch.tensor([c.activation for c in card.top], dtype=torch.float64)
        # The reported activations are the largest of all counted positions, in order...
        assert len(card.top) == min(TOP, len(everything)), card.neuron.label
        torch.testing.assert_close(reported, everything[: len(card.top)], rtol=1e-6, atol=1e-6)
        for context in card.top:
            # ... and each is the recomputed activation at the position it names.
            row = position_of[context.instruction_id]
            recomputed = float(values[row][context.position])
            assert context.activation == pytest.approx(recomputed, rel=1e-6, abs=1e-6), card.neuron.label
            ids = sequences[row][0]
            assert context.token == tokenizer.decode(ids[context.position : context.position + 1])
            assert f"{MARK[0]}{context.token}{MARK[1]}" in context.text
    assert any(card.top for card in cards)


def test_specificity_is_the_gap_to_the_most_frequent_other_category():
    frequency = torch.tensor([[0.9, 0.2, 0.5, 0.4], [0.1, 0.2, 0.5, 0.7], [0.3, 0.6, 0.1, 0.4]])
    expected = torch.tensor(
        [
            [0.9 - 0.3, 0.2 - 0.6, 0.0, 0.4 - 0.7],
            [0.1 - 0.9, 0.2 - 0.6, 0.0, 0.7 - 0.4],
            [0.3 - 0.9, 0.6 - 0.2, 0.1 - 0.5, 0.4 - 0.7],
        ]
    )
    torch.testing.assert_close(specificity(frequency), expected)


def test_planted_specific_neurons_are_chosen_first():
    """Three categories, two sites: neuron (site b, 5) fires only on math, (site a, 2) mostly on code."""
    categories = ["code", "math", "summarization"]
    tokens = torch.tensor([100, 200, 50])
    dense = torch.full((3, 8), 30)  # every neuron fires at 0.3, 0.15, 0.6: no code or math gap
    dense[:, 2] = torch.tensor([90, 20, 5])  # code 0.9, math 0.1, summarization 0.1: gap 0.8
    experts = torch.zeros((3, 2, 4), dtype=torch.long)
    experts[1, 1, 1] = 160  # math only: 0.8, gap 0.8 (ties with nothing in math)
    experts[0, 0, 0] = 50  # code 0.5: gap 0.5
    snapshot = Snapshot(
        categories=categories,
        category_tokens=tokens,
        category_counts={"a": dense, "b": experts, "router": torch.zeros((3, 2), dtype=torch.long)},
        site_kinds={"a": "ffn", "b": "experts", "router": "router"},
        site_layers={"a": 0, "b": 1, "router": 1},
    )
    chosen = most_specific(snapshot, 2)
    code = [(n.site, n.index) for n in chosen if n.category == "code"]
    math = [(n.site, n.index) for n in chosen if n.category == "math"]
    summary = [(n.site, n.index, round(n.gap, 6)) for n in chosen if n.category == "summarization"]
    assert code == [("a", (2,)), ("b", (0, 0))]
    assert math == [("b", (1, 1))]  # the only neuron more frequent in math than elsewhere
    assert summary == [("a", (0,), 0.3), ("a", (1,), 0.3)]  # 0.6 - 0.3; ties keep index order
    assert chosen[0].frequency == {"code": 0.9, "math": 0.1, "summarization": 0.1}


def test_running_top_equals_a_sort_of_everything():
    generator = torch.Generator().manual_seed(0)
    running = RunningTop(neurons=3, top=4)
    seen = []
    for batch in range(5):
        activations = torch.randn((2, 7, 3), generator=generator)
        activations[:, 5:] = float("-inf")  # padding: never among the top
        rows = torch.tensor([2 * batch, 2 * batch + 1])
        running.update(activations, rows)
        seen.append((activations, rows))
    values, rows, positions = running.result()
    for neuron in range(3):
        everything = sorted(
            ((float(a[b, p, neuron]), int(r[b]), p) for a, r in seen for b in range(2) for p in range(5)),
            reverse=True,
        )[:4]
        assert [
            (float(v), int(r), int(p))
            for v, r, p in zip(values[neuron], rows[neuron], positions[neuron], strict=True)
        ] == everything


def test_neuron_names_are_checked_with_what_exists(tmp_path):
    model, tokenizer = exact_model("tiny-qwen2-moe")
    records = per_category(1)
    snapshot = sparcom.record(model, tokenizer, records, progress=False)
    assert neuron_named(snapshot, "model.layers.0.mlp.experts:7,31").index == (7, 31)
    assert neuron_named(snapshot, "model.layers.0.mlp.shared_expert:63").index == (63,)
    with pytest.raises(
        ValueError,
        match=r"^neuron 'model.layers.9.mlp.experts:1,2': no neuron site .* of the 8 neuron sites \(model.layers.0.mlp.experts, ",
    ):
        neuron_named(snapshot, "model.layers.9.mlp.experts:1,2")
    with pytest.raises(
        ValueError,
        match=r"index '8,0' does not exist .* expected expert,i with 0 <= expert < 8 and 0 <= i < 32$",
    ):
        neuron_named(snapshot, "model.layers.0.mlp.experts:8,0")
    with pytest.raises(ValueError, match=r"index '5' does not exist .* expected expert,i"):
        neuron_named(snapshot, "model.layers.0.mlp.experts:5")
    with pytest.raises(ValueError, match=r"index 'x' does not exist .* expected i with 0 <= i < 64$"):
        neuron_named(snapshot, "model.layers.0.mlp.shared_expert:x")

    cards = explain(
        model,
        tokenizer,
        records,
        snapshot,
        [neuron_named(snapshot, "model.layers.0.mlp.shared_expert:3")],
        top=2,
    )
    lines = write_neurons(cards, tmp_path / "neurons.jsonl").read_text().splitlines()
    line = json.loads(lines[0])
    assert set(line) >= {"site", "index", "category", "frequency", "top"}
    assert line["index"] == 3 and set(line["frequency"]) == set(snapshot.categories)
    assert [t["activation"] for t in line["top"]] == sorted(
        (t["activation"] for t in line["top"]), reverse=True
    )


# ------------------------------------------------------------------------------ analyze.py


def _explained(*overrides: str, out: Path) -> list[Path]:
    return analyze(compose("analyze", ["mode=explain", *overrides, f"out={out}"]), out)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A run folder as train.py leaves it: a saved checkpoint and the snapshot recorded at its step."""
    run = tmp_path_factory.mktemp("explain") / "run"
    model, tokenizer = load_model("tiny-qwen2-moe")
    model.save_pretrained(run / "checkpoint-2")
    tokenizer.save_pretrained(run / "checkpoint-2")
    sparcom.record(model, tokenizer, per_category(2), step=2, progress=False).save(
        run / "snapshots" / "snapshot-step0000002.safetensors"
    )
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": {"name_or_path": "tiny-qwen2-moe", "dtype": None, "chat_template_from": None}}
        )
    )
    return run


def test_explain_a_run_writes_neurons_and_a_self_contained_report(run_folder):
    out = run_folder / "analysis"
    assert _explained(f"run={run_folder}", "explain.per_category=2", "explain.top=3", out=out) == [
        out / "explain" / "report.html"
    ]
    snapshot = Snapshot.load(run_folder / "snapshots" / "snapshot-step0000002.safetensors")
    expected = most_specific(snapshot, 2)  # selected on the run's own snapshot, not a new recording
    lines = [json.loads(line) for line in (out / "explain" / "neurons.jsonl").read_text().splitlines()]
    assert [(line["site"], line["index"], line["category"]) for line in lines] == [
        (n.site, n.index[0] if len(n.index) == 1 else list(n.index), n.category) for n in expected
    ]
    probe = set(snapshot.instruction_ids)
    assert all(t["instruction_id"] in probe for line in lines for t in line["top"])
    assert all(len(line["top"]) == 3 for line in lines)

    page = (out / "explain" / "report.html").read_text()
    assert "explain/report.html" in (out / "index.html").read_text()
    assert 'src="http' not in page and 'href="http' not in page  # self-contained
    contents = page[page.index('<nav class="contents">') : page.index("</nav>")]  # a long page: its contents
    for category in {line["category"] for line in lines}:
        anchor = re.search(rf'href="#(section-\d+)">{category}</a>', contents).group(1)
        assert f'<section id="{anchor}"><h2>{category}</h2>' in page
    for line in lines:
        assert f"{line['site']}:" in page
        for top in line["top"]:
            assert f"<mark>{html.escape(top['token']).replace(chr(10), NEWLINE)}</mark>" in page


def test_cards_escape_what_the_model_read():
    neuron = Neuron("model.layers.0.mlp", (3,), "code", 0.5, {"code": 0.75, "math": 0.25})
    context = Context("code-001", 7, "<script>", 1.25, "a < b &\n", "</td>")
    page = card_html(NeuronCard(neuron, [context]))
    assert "<script>" not in page and '</td>"' not in page
    assert f"a &lt; b &amp;{NEWLINE}<mark>&lt;script&gt;</mark>&lt;/td&gt;" in page
    assert 'style="width:75.0%"' in page and 'style="width:25.0%"' in page  # the frequency bars


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium")
def test_explain_report_renders_in_chromium(run_folder, tmp_path):
    out = run_folder / "analysis"
    if not (out / "explain" / "report.html").exists():
        _explained(f"run={run_folder}", "explain.per_category=2", "explain.top=3", out=out)
    shot = tmp_path / "explain.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            (out / "explain" / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 50_000  # text, bars and highlighted tokens, not a blank page


def test_one_neuron_card_is_printed_and_a_bad_one_named(tmp_path, capsys):
    base = ["base=tiny-llama", "sparcom.probe.per_category=2", "explain.top=3"]
    assert _explained(*base, "explain.neuron=model.layers.1.mlp:5", out=tmp_path) == []
    printed = capsys.readouterr().out
    assert printed.startswith("model.layers.1.mlp:5  (most frequent in ")
    assert "frequency: classification " in printed and "top 3 contexts" in printed
    assert printed.count(MARK[0]) == 3
    with pytest.raises(
        ConfigError,
        match=r"^explain\.neuron: neuron 'model\.layers\.1\.mlp:500': index '500' does not exist in model\.layers\.1\.mlp; expected i with 0 <= i < 128$",
    ):
        _explained(*base, "explain.neuron=model.layers.1.mlp:500", out=tmp_path)
    with pytest.raises(ConfigError, match=r"no neuron site 'model\.layers\.1\.mlp\.experts'"):
        _explained(*base, "explain.neuron=model.layers.1.mlp.experts:2", out=tmp_path)


def test_experts_offloaded_to_disk_give_the_same_cards(tmp_path):
    """accelerate keeps an offloaded module's weights on "meta" until its own forward loads them:
    the explorer reads routed experts there, so a disk-offloaded model explains as a resident one."""
    model, tokenizer = exact_model("tiny-qwen2-moe")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    records = per_category(1)
    snapshot = sparcom.record(model, tokenizer, records, progress=False)
    neurons = [neuron_named(snapshot, f"model.layers.{layer}.mlp.experts:2,5") for layer in range(4)]
    resident = explain(model, tokenizer, records, snapshot, neurons, top=3)
    offloaded, _ = load_model(
        str(tmp_path / "model"), dtype="float64", device_map={"": "disk"}, offload_folder=tmp_path / "offload"
    )
    offloaded.set_experts_implementation("eager")
    assert offloaded.model.layers[3].mlp.experts.gate_up_proj.device.type == "meta"
    on_disk = explain(offloaded, tokenizer, records, snapshot, neurons, top=3)
    assert [c.to_json() for c in on_disk] == [c.to_json() for c in resident]
    assert any(card.top for card in resident)
