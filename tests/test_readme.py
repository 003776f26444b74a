"""The README's notebook example runs as written: only the checkpoint path is replaced by a real
checkpoint of the same architecture, and the snapshot's printed form is the one the README shows."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sparcom.models.loading import load_model

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE_CHECKPOINT = "outputs/2026-11-20_10-00-00_3fa2c1/checkpoint-20"


def notebook_example() -> str:
    section = README.read_text().split("## Record a model in a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_runs_as_written(tmp_path, monkeypatch):
    code = notebook_example()
    assert EXAMPLE_CHECKPOINT in code
    model, tokenizer = load_model("tiny-qwen2-moe")
    with torch.no_grad():  # a "fine-tuned" model: the same one, its FFN weights moved
        for name, parameter in model.named_parameters():
            if "mlp" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    checkpoint = tmp_path / "checkpoint-20"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code.replace(EXAMPLE_CHECKPOINT, str(checkpoint)), "README.md", "exec"), namespace)

    shown = re.search(r"^snap\n# (Snapshot\(.*\))$", code, re.M).group(1)
    assert repr(namespace["snap"]) == shown
    assert (tmp_path / "base.safetensors").is_file()
    estimate = namespace["result"].isn_jaccard["math"][0.5]
    assert estimate.ci95 is not None and estimate.ci95.lo <= estimate.value <= estimate.ci95.hi
    assert 0 <= estimate.chance < 1
