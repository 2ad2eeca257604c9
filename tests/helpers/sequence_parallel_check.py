"""Run under torchrun with SP ranks (gloo): the loss and every gradient of a tiny model with its encoders split
over the ranks (pipeline/train/sequence_parallel.py) against the same model unsplit, on the same batch.

Summed over the group, a split model's gradients are SP times the unsplit model's (the module docstring there);
this prints, on rank 0, one JSON line {case: [loss difference, largest gradient difference, largest gradient]}.
Usage: torchrun --nproc_per_node 2 tests/helpers/sequence_parallel_check.py IMPL [IMPL ...]
"""
import json
import sys

import deepspeed
import torch
import torch.distributed as dist

from model.config import preset
from model.fast import convert
from model.heads import DebertaForMaskedLM
from model.rtd import RTDModel, generator_config_of
from pipeline.train import sequence_parallel

SEQ, VOCAB = 48, 200


def batch():
    """Two sequences of SEQ tokens, the second padded after 37, 15% of the real tokens masked (the same on
    every rank: a fixed generator)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 37:] = 0
    labels = torch.full_like(ids, -100)
    picked = (torch.rand(2, SEQ, generator=g) < 0.15) & mask.bool()
    labels[picked] = ids[picked]
    ids = ids.masked_fill(picked, 4)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(kind, impl):
    torch.manual_seed(0)
    config = preset("tiny", vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    max_position_embeddings=SEQ)
    if kind == "mlm":
        model = DebertaForMaskedLM(config)
    else:
        v3 = config.replace(conv_kernel_size=0)
        model = RTDModel(v3, generator_config_of(v3, 2))  # two generator layers: one split, the EMD's
    return convert.apply(model, impl, fuse_qkv=True)


def loss_and_grads(model, inputs):
    model.zero_grad()
    extra = {"sample_seeds": torch.tensor([11, 12])} if isinstance(model, RTDModel) else {}
    loss = model(**inputs, **extra).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def compare(kind, impl, group):
    inputs = batch()
    plain_loss, plain = loss_and_grads(build(kind, impl), inputs)
    split_model = sequence_parallel.apply(build(kind, impl), group)
    split_loss, split = loss_and_grads(split_model, inputs)
    assert plain.keys() == split.keys(), sorted(set(plain) ^ set(split))
    worst, largest = 0.0, 0.0
    for name, grad in split.items():
        dist.all_reduce(grad)
        worst = max(worst, (grad / group.size - plain[name]).abs().max().item())
        largest = max(largest, plain[name].abs().max().item())
    return [abs(split_loss.item() - plain_loss.item()), worst, largest]


def main():
    deepspeed.init_distributed(dist_backend="gloo")
    group = sequence_parallel.SequenceGroup(dist.get_world_size())
    results = {f"{kind} {impl}": compare(kind, impl, group) for impl in sys.argv[1:] for kind in ("mlm", "rtd")}
    if dist.get_rank() == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
