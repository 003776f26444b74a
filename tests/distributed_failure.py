"""Run under torchrun: rank 1's model breaks in its second probe batch; every rank must end."""

import sys

import torch.distributed as dist

import sparcom
from sparcom.models.loading import load_model
from sparcom.recording.probe import Recording

from helpers.models import per_category

if __name__ == "__main__":
    dist.init_process_group("gloo")
    model, tokenizer = load_model(sys.argv[1])
    if dist.get_rank() == 1:
        calls = []

        def fail_on_second_batch(module, args):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("simulated device failure")

        model.model.layers[1].mlp.register_forward_pre_hook(fail_on_second_batch)
    sparcom.record(model, tokenizer, per_category(3), Recording(batch_size=2), progress=False)
    dist.destroy_process_group()
