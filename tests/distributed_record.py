"""Run under torchrun: every rank records the same records (in the token scope given, prompt by
default); rank 0 saves the reduced snapshot."""

import sys

import torch.distributed as dist

import sparcom
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording

from helpers.models import per_category

if __name__ == "__main__":
    dist.init_process_group("gloo")
    model, tokenizer = load_model(sys.argv[2])
    scope = sys.argv[3] if len(sys.argv) > 3 else "prompt"
    snapshot = sparcom.record(
        model,
        tokenizer,
        per_category(3),
        Recording(token_scope=scope, max_new_tokens=8, batch_size=4),
        progress=False,
    )
    if dist.get_rank() == 0:
        snapshot.save(sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
