"""Run under torchrun: every rank records the same records; rank 0 saves the reduced snapshot."""

import sys

import torch.distributed as dist

import sparcom
from sparcom.models import load_model

from conftest import per_category

if __name__ == "__main__":
    dist.init_process_group("gloo")
    model, tokenizer = load_model(sys.argv[2])
    snapshot = sparcom.record(model, tokenizer, per_category(3), batch_size=4, progress=False)
    if dist.get_rank() == 0:
        snapshot.save(sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
