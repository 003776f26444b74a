"""Trainer callbacks: ``SparcomCallback`` records ISN/ISE snapshots during training and logs their drift."""

from callbacks.sparcom_callback import SparcomCallback

__all__ = ["SparcomCallback"]
