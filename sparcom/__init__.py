"""sparcom: instruction-specific neurons and experts (SPARCOM, arXiv 2505.21191), live during fine-tuning."""

__version__ = "0.1.0"

from sparcom.probe import record  # noqa: E402
from sparcom.snapshot import Snapshot  # noqa: E402

__all__ = ["Snapshot", "__version__", "record"]
