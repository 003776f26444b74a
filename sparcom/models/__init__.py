"""The models: presets and the one loader (``loading``: tiny random presets for coverage, the
packaged real SmolLM2, local folders, hub ids), the packaged GGUF (``packaged``), where each
architecture keeps its FFN neurons, experts and router (``sites``, the one table) and where a
dispatched model takes its inputs (``placement``)."""
