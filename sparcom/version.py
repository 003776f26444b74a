"""The version written into every snapshot's metadata (a leaf: it imports nothing)."""

__version__ = "0.3.0"
