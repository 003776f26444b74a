"""A model whose weights are set by hand so that known neurons fire only on known tokens:
the recovered ISNs must be exactly those neurons."""

from __future__ import annotations

import torch

import sparcom
from sparcom.data import CATEGORIES
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording
from sparcom.stats.select import category_isn

CANDIDATE_WORDS = [
    "zebra",
    "quartz",
    "violin",
    "harbor",
    "meteor",
    "walnut",
    "copper",
    "glacier",
    "saffron",
    "tundra",
]


def _disjoint_words(tokenizer, count):
    """Words whose BPE pieces (with a leading space) share no token with each other or the template."""
    template = set(
        tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True)
    )
    chosen, used = [], set(template)
    for word in CANDIDATE_WORDS:
        pieces = set(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if not pieces & used:
            chosen.append((word, pieces))
            used |= pieces
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough words with disjoint token pieces")


def test_planted_neurons_are_recovered_exactly():
    model, tokenizer = load_model("tiny-llama", num_hidden_layers=1)
    hidden = model.config.hidden_size
    words = _disjoint_words(tokenizer, len(CATEGORIES))
    bias = hidden - 1  # every token carries +1 on this dimension
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding.zero_()
        embedding[:, bias] = 1.0
        for category, (_, pieces) in enumerate(words):
            embedding[sorted(pieces), category] = 1.0  # a category's word lights up "its" dimension
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # attention adds nothing: the MLP sees the token itself
        layer.post_attention_layernorm.weight.fill_(1.0)
        gate = layer.mlp.gate_proj.weight  # [d_ff, H]
        gate.zero_()
        gate[:, bias] = -1.0  # by default every neuron is negative on every token
        for category in range(len(CATEGORIES)):
            gate[category, category] = 1.0  # neuron c: positive iff the token is a piece of word c
            gate[category, bias] = -0.5
    records = [
        {
            "id": f"{c}-{i}",
            "category": c,
            "instruction": (" " + words[k][0]) * 40,
            "input": "",
            "output": "ok",
            "origin": "test",
        }
        for k, c in enumerate(CATEGORIES)
        for i in range(3)
    ]
    snapshot = sparcom.record(
        model, tokenizer, records, Recording(token_scope="prompt", batch_size=4), progress=False
    )
    for k, category in enumerate(CATEGORIES):
        chosen = category_isn(snapshot, category, epsilon=0.5)["model.layers.0.mlp"]
        assert chosen.nonzero().flatten().tolist() == [k], category
        top = category_isn(
            snapshot, category, epsilon=1 / model.config.intermediate_size, mode="percentile_layer"
        )
        assert top["model.layers.0.mlp"].nonzero().flatten().tolist() == [k]
