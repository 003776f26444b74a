"""``sparcom.intervene`` against edits and recomputations made by hand: zeroed down projections,
hooks that scale ``act_fn`` outputs, an eager recomputation of the experts, under every experts
implementation; the weights come back bit for bit; recording sees the intervened model."""

from __future__ import annotations

import copy

import pytest
import torch

import sparcom
from sparcom.edit.intervention import intervene, neuron_sites, random_like, random_sets
from sparcom.models.loading import load_model
from sparcom.models.sites import architecture_of
from sparcom.recording.conversation import encode

from helpers.models import exact_model, per_category


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a
    )


def snapshot_of_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def token_batch(tokenizer, count: int = 3) -> torch.Tensor:
    rows = [encode(r, tokenizer, max_length=48).input_ids for r in per_category(1)[:count]]
    return torch.stack([row[:32] for row in rows])


def random_neurons(model, fraction: float, seed: int, kinds=("ffn", "experts")) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        site: torch.rand(shape, generator=generator) < fraction
        for site, (kind, shape) in neuron_sites(model).items()
        if kind in kinds
    }


def scale_outputs(module, factor: torch.Tensor):
    """A forward hook multiplying the module's output (activations ``[..., d_ff]``) by ``factor``."""
    return module.register_forward_hook(lambda m, i, output: output * factor)


def test_scale_zero_on_a_whole_layer_equals_zeroing_its_down_projections():
    model, tokenizer = exact_model("tiny-qwen2-moe")
    ids = token_batch(tokenizer)
    layer = {
        s: torch.ones(shape, dtype=torch.bool) for s, (_, shape) in neuron_sites(model).items() if ".1." in s
    }
    assert set(layer) == {"model.layers.1.mlp.experts", "model.layers.1.mlp.shared_expert"}
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.model.layers[1].mlp.experts.down_proj.zero_()
        by_hand.model.layers[1].mlp.shared_expert.down_proj.weight.zero_()
    before = snapshot_of_weights(model)
    with torch.no_grad(), intervene(model, layer, 0.0):
        assert same_bytes(snapshot_of_weights(model), snapshot_of_weights(by_hand))
        edited = model(ids).logits
    assert torch.equal(edited, by_hand(ids).logits)
    assert not torch.equal(edited, model(ids).logits)  # the layer mattered
    assert same_bytes(snapshot_of_weights(model), before)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-phi3", "tiny-gemma"])
def test_scaling_dense_neurons_equals_scaling_their_activations(preset):
    """Hooks multiply the chosen entries of every ``act_fn`` output by the scale (Phi-3: its fused
    gate/up; Gemma: tanh GELU); the logits agree in float64 and the weights come back bit for bit."""
    model, tokenizer = exact_model(preset)
    ids = token_batch(tokenizer)
    intact = model(ids).logits
    neurons = random_neurons(model, 0.3, seed=1)
    modules = dict(model.named_modules())
    activation = architecture_of(model).activation
    before = snapshot_of_weights(model)
    for scale in (0.0, 0.5, 2.0, -1.0):
        with torch.no_grad(), intervene(model, neurons, scale):
            edited = model(ids).logits
        assert same_bytes(snapshot_of_weights(model), before)
        handles = [
            scale_outputs(getattr(modules[site], activation), torch.where(chosen, scale, 1.0).double())
            for site, chosen in neurons.items()
        ]
        with torch.no_grad():
            by_hand = model(ids).logits
        for handle in handles:
            handle.remove()
        assert torch.allclose(edited, by_hand, rtol=1e-10, atol=1e-10), scale
        assert (edited - intact).abs().max() > 1e-3, scale  # the intervention changed the output


def eager_experts(module, factor: torch.Tensor):
    """A forward hook replacing a fused experts module's output with a token-by-token float64
    recomputation from its own weights, each neuron's activation multiplied by ``factor[e, i]``."""

    def hook(experts, args, kwargs, output):
        given = {**dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args, strict=False)), **kwargs}
        hidden, top_k_index, top_k_weights = (
            given["hidden_states"],
            given["top_k_index"],
            given["top_k_weights"],
        )
        gate_up, down = experts.gate_up_proj.double(), experts.down_proj.double()  # [E, 2d, H], [E, H, d]
        d = down.shape[-1]
        out = torch.zeros(hidden.shape, dtype=torch.float64)
        for token in range(hidden.shape[0]):
            for slot, expert in enumerate(top_k_index[token].tolist()):
                projected = gate_up[expert] @ hidden[token].double()
                activation = experts.act_fn(projected[:d]) * projected[d:] * factor[expert]
                out[token] += top_k_weights[token, slot].double() * (down[expert] @ activation)
        return out.to(output.dtype)

    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_scaling_expert_neurons_equals_an_eager_recomputation(implementation):
    """Routed-expert and shared-expert neurons scaled by 2.5 under each experts kernel (float32, as
    users run it) against hooks: an eager float64 recomputation of every experts module, and scaled
    ``act_fn`` outputs for the shared experts."""
    model, tokenizer = load_model("tiny-qwen2-moe")
    model.set_experts_implementation(implementation)
    ids = token_batch(tokenizer)
    neurons = random_neurons(model, 0.3, seed=2)
    scale = 2.5
    before = snapshot_of_weights(model)
    with torch.no_grad(), intervene(model, neurons, scale):
        edited = model(ids).logits
    assert same_bytes(snapshot_of_weights(model), before)
    modules = dict(model.named_modules())
    handles = []
    for site, chosen in neurons.items():
        factor = torch.where(chosen, scale, 1.0)
        if chosen.dim() == 2:
            handles.append(eager_experts(modules[site], factor.double()))
        else:
            handles.append(scale_outputs(modules[site].act_fn, factor))
    with torch.no_grad():
        by_hand = model(ids).logits
    for handle in handles:
        handle.remove()
    assert torch.allclose(edited, by_hand, rtol=1e-4, atol=1e-4), (edited - by_hand).abs().max()
    assert (edited - model(ids).logits).abs().max() > 1e-2  # the intervention changed the output


def test_recording_inside_an_intervention_sees_the_intervened_model():
    """Counts recorded while layer 1's neurons are silenced equal the counts of a copy whose down
    projections were zeroed by hand: the same for layers 0-1, different after."""
    model, tokenizer = exact_model("tiny-qwen2-moe")
    records = per_category(1)[:3]
    layer = {
        s: torch.ones(shape, dtype=torch.bool) for s, (_, shape) in neuron_sites(model).items() if ".1." in s
    }
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        by_hand.model.layers[1].mlp.experts.down_proj.zero_()
        by_hand.model.layers[1].mlp.shared_expert.down_proj.weight.zero_()
    with intervene(model, layer, 0.0):
        silenced = sparcom.record(model, tokenizer, records, progress=False)
    expected = sparcom.record(by_hand, tokenizer, records, progress=False)
    intact = sparcom.record(model, tokenizer, records, progress=False)
    for site, counts in expected.instruction_counts.items():
        assert torch.equal(silenced.instruction_counts[site], counts), site
        unchanged = torch.equal(intact.instruction_counts[site], counts)
        assert unchanged == (".0." in site or ".1." in site), site


def test_interventions_nest_and_restore_in_order():
    model, tokenizer = exact_model("tiny-llama")
    first, second = random_neurons(model, 0.4, seed=3), random_neurons(model, 0.4, seed=4)
    before = snapshot_of_weights(model)
    with intervene(model, first, 3.0), intervene(model, second, 0.0):
        pass
    assert same_bytes(snapshot_of_weights(model), before)
    with pytest.raises(RuntimeError, match="inside"), intervene(model, first, 0.5):
        raise RuntimeError("failure inside the block")
    assert same_bytes(snapshot_of_weights(model), before)


def test_bad_interventions_are_refused_before_any_weight_changes():
    model, _ = load_model("tiny-qwen2-moe")
    before = snapshot_of_weights(model)
    good = random_neurons(model, 0.5, seed=0)
    router = {**good, "model.layers.0.mlp.gate": torch.ones(8, dtype=torch.bool)}
    misshapen = {**good, "model.layers.0.mlp.experts": torch.ones(8, 16, dtype=torch.bool)}
    cases = [
        (router, 0.0, r"unknown neuron site 'model.layers.0.mlp.gate'.*routers have no neurons"),
        (misshapen, 0.0, r"neurons\['model.layers.0.mlp.experts'\] is torch.bool \(8, 16\).*\(8, 32\)"),
        (good, float("nan"), r"scale must be a finite number.*got nan"),
    ]
    for neurons, scale, message in cases:
        with pytest.raises(ValueError, match=message), intervene(model, neurons, scale):
            pass
    assert same_bytes(snapshot_of_weights(model), before)


def test_random_controls_keep_per_site_counts_and_cover_sites_uniformly():
    neurons = {"a": torch.zeros(40, dtype=torch.bool), "b": torch.zeros(4, 10, dtype=torch.bool)}
    neurons["a"][:7] = True
    neurons["b"][0, :3] = True
    draws = random_sets(neurons, 4000, torch.Generator().manual_seed(0))
    assert all(int(d["a"].sum()) == 7 and int(d["b"].sum()) == 3 for d in draws)
    assert all(d["b"].shape == (4, 10) for d in draws)
    inclusion = torch.stack([d["a"] for d in draws]).double().mean(0)  # each neuron: 7/40 = 0.175
    assert (inclusion - 0.175).abs().max() < 4 * (0.175 * 0.825 / 4000) ** 0.5 + 0.005
    again = random_like(neurons, torch.Generator().manual_seed(0))
    assert torch.equal(again["a"], draws[0]["a"])  # seeded
    with pytest.raises(ValueError, match="control_draws must be an integer >= 2.*got 1"):
        random_sets(neurons, 1, torch.Generator())
