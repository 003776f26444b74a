"""transformers' W&B callback, made unable to stop training: a W&B failure becomes a warning."""

from __future__ import annotations

import warnings

from transformers.integrations import WandbCallback


def _guarded(name: str):
    original = getattr(WandbCallback, name)

    def method(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any W&B failure: warn, carry on without W&B
            warnings.warn(
                f"W&B {name} failed ({type(err).__name__}: {err}); training continues without W&B; "
                "snapshots are still saved",
                stacklevel=2,
            )
            self._wandb = None  # every WandbCallback event is a no-op from here on
            return None

    method.__name__ = name
    return method


class ResilientWandbCallback(WandbCallback):
    """Logs like ``report_to="wandb"``; if ``wandb.init`` or a later log call fails, a warning is
    printed and training continues (the SparcomCallback still writes every snapshot).

    Where a W&B run is already active (train.py starts it with the run's whole config), the run's
    config is left as it is: transformers would add every TrainingArguments field and the model
    config as flat keys beside it, among them ``project: huggingface`` and a ``run_name`` that
    contradict the run's real project and name. Only the parameter count is added."""

    def setup(self, args, state, model, **kwargs):
        if (
            self._wandb is None or self._wandb.run is None
        ):  # a trainer of the user's own: as transformers does
            return _guarded("setup")(self, args, state, model, **kwargs)
        self._initialized = True
        if not state.is_world_process_zero:
            return None
        try:
            from sparcom.train.drift import SUMMARIES

            self._wandb.define_metric("train/global_step")
            for pattern, summary in SUMMARIES.items():  # the best loss, the drift where it ended
                self._wandb.define_metric(pattern, step_metric="train/global_step", summary=summary)
            self._wandb.define_metric("*", step_metric="train/global_step", step_sync=True)
            self._wandb.config.update({"model/num_parameters": model.num_parameters()}, allow_val_change=True)
        except Exception as err:  # noqa: BLE001 - W&B must never stop training
            warnings.warn(f"W&B setup failed ({type(err).__name__}: {err}); training continues", stacklevel=2)
        return None

    on_train_begin = _guarded("on_train_begin")
    on_log = _guarded("on_log")
    on_save = _guarded("on_save")
    on_train_end = _guarded("on_train_end")
    on_evaluate = _guarded("on_evaluate")
    on_predict = _guarded("on_predict")
