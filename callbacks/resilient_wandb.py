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
    printed and training continues (the SparcomCallback still writes every snapshot)."""

    setup = _guarded("setup")
    on_train_begin = _guarded("on_train_begin")
    on_log = _guarded("on_log")
    on_save = _guarded("on_save")
    on_train_end = _guarded("on_train_end")
    on_evaluate = _guarded("on_evaluate")
    on_predict = _guarded("on_predict")
