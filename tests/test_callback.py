"""SparcomCallback in a user's own transformers Trainer (no train.py, no TRL, no Hydra)."""

from __future__ import annotations

import pytest

from callbacks import SparcomCallback
from sparcom.config import TrainSparcomConfig
from sparcom.models.loading import load_model
from sparcom.snapshot import snapshot_series

from helpers.models import per_category, plain_trainer


@pytest.mark.slow
def test_callback_in_a_plain_trainer(tmp_path):
    model, tokenizer = load_model("tiny-olmoe")
    model.gradient_checkpointing_enable()
    trainer = plain_trainer(model, tokenizer, tmp_path, max_steps=4, save_steps=2)
    callback = SparcomCallback(tokenizer, per_category(2), TrainSparcomConfig(epsilons=[0.5]))
    callback.draw_figures = False
    trainer.add_callback(callback)
    trainer.train()
    assert sorted(snapshot_series(tmp_path / "snapshots")) == [0, 2, 4]
    assert model.training and model.is_gradient_checkpointing  # restored after every probe
    assert all(not m._forward_pre_hooks for m in model.modules())  # no hook left attached


def test_bad_callback_settings_fail_at_construction():
    _, tokenizer = load_model("tiny-llama")
    with pytest.raises(
        ValueError, match=r"^sparcom.epsilons\[0\]: 0 is not a valid epsilon; expected a number in"
    ):
        SparcomCallback(tokenizer, [], TrainSparcomConfig(epsilons=[0]))
    with pytest.raises(ValueError, match="unknown selection mode 'top'"):
        SparcomCallback(tokenizer, [], TrainSparcomConfig(selection_mode="top"))
