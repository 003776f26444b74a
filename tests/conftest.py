"""The test session's environment (offline W&B, one thread per process) and shared fixtures; the
shared code itself lives in ``tests/helpers``."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny: a second thread per matmul costs more in synchronisation than it
# saves, and on a shared 2-core machine it makes every test wait on the other's load. Child
# processes (torchrun ranks, the CLI) inherit the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_records() -> list[dict]:
    from helpers.models import per_category

    return per_category(3)
