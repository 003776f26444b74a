"""sparcom: instruction-specific neurons and experts (SPARCOM, arXiv 2505.21191), live during fine-tuning."""

import importlib

from sparcom.version import __version__

__all__ = ["Recording", "Snapshot", "__version__", "intervene", "record"]


def __getattr__(name: str):
    # Lazy (PEP 562): importing sparcom, or a torch-free part of it such as sparcom.config, must not
    # import torch, so that a bad config is reported in a fraction of a second.
    if name in ("record", "Recording"):
        import sparcom.recording.probe

        return getattr(sparcom.recording.probe, name)
    if name == "Snapshot":
        from sparcom.snapshot import Snapshot

        return Snapshot
    if name == "intervene":
        from sparcom.edit.intervention import intervene

        return intervene
    try:  # a submodule, as `import sparcom; sparcom.stats.metrics` worked when everything was imported eagerly
        return importlib.import_module(f"sparcom.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"sparcom.{name}":  # the submodule exists but an import inside it failed
            raise
        raise AttributeError(f"module 'sparcom' has no attribute {name!r}") from None
