"""Logits of a task's features in feature order, for evaluation during fine-tuning (every rank, under DeepSpeed)
and for `deberta-ds predict` (one process). Batches are formed by length (batches.evaluation_batches), so a
batch pads little; the outputs are put back in feature order."""
import math

import numpy as np
import torch

from pipeline.finetune.batches import evaluation_batches
from pipeline.finetune.features import collate


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def predict_logits(forward, features, batch_size, device, rank=0, world_size=1):
    """Logits of all features in feature order, each rank computing every world_size-th batch: an array
    [features, ...], or a list of one array per feature where their widths differ (ReCoRD: one logit per
    candidate the feature holds).

    Ranks with one batch fewer repeat their last batch (discarded), so all ranks run the same number
    of forwards (ZeRO-3 gathers parameters collectively in each)."""
    batches = evaluation_batches(features, batch_size)
    mine = list(range(rank, len(batches), world_size))
    rounds = math.ceil(len(batches) / world_size)
    results = {}
    with torch.no_grad():
        for turn in range(rounds):
            index = mine[min(turn, len(mine) - 1)] if mine else 0
            logits = forward(**to_device(collate([features[i] for i in batches[index]]), device)).logits
            if turn < len(mine):
                results[index] = logits.float().cpu().numpy()
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    rows = [None] * len(features)
    for index, batch in enumerate(batches):
        for row, feature_index in zip(results[index], batch):
            rows[feature_index] = row
    same_shape = len({row.shape for row in rows}) == 1
    return np.stack(rows) if same_shape else rows


def evaluate(engine, task, examples, features, batch_size, rank, world_size):
    """The task's scores on examples (the engine in eval mode for the forwards, then back in training mode)."""
    engine.eval()
    logits = predict_logits(engine, features, batch_size, engine.device, rank, world_size)
    engine.train()
    return task.score(examples, task.decode(examples, features, logits))
