"""Editing neurons to test what they do: scaling a set of neurons exactly under every experts
implementation (``intervention``), the edited-pass loop and its random-neuron null (``effects``),
the causal check (``ablation``), the dose response (``steer``) and the neuron explorer
(``explain``)."""
