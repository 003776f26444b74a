"""Trainer callbacks: ``SparcomCallback`` records ISN/ISE snapshots during training and logs their
drift; ``ResilientWandbCallback`` logs to W&B without ever stopping training."""

from callbacks.resilient_wandb import ResilientWandbCallback
from callbacks.sparcom_callback import SparcomCallback

__all__ = ["ResilientWandbCallback", "SparcomCallback"]
