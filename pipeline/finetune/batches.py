"""Which features go into which batch, in training and in evaluation.

Training: every rank walks the same order of one epoch, a function of (seed, epoch) only, padded by
wrapping around to whole global batches, so all ranks make the same number of forward/backward calls
(ZeRO's collectives need it) and any number of ranks sees the same global batches. With group_by_length
(the default) that shuffled order is cut into groups of MEGABATCH global batches, each group is sorted by
length (longest first) and cut into global batches, and the batches are shuffled again: a batch holds
examples of similar length, so little of it is padding, while the epoch still mixes long and short batches
(the Hugging Face Trainer's group_by_length sorts the same way but keeps each group longest-first). An epoch
has at least MIN_GROUPS groups: with one group (a small task: CB, COPA, WSC have 16-35 batches) the sorted
batches would be the same every epoch up to ties, and their composition is part of SGD's noise. A
global batch is split into micro-batches in its sorted order: rank r takes micro-batches r, r + ranks, ...

Evaluation and prediction: features sorted by length (stable), batched in that order; the caller puts the
outputs back in feature order.
"""
import math

import torch

MEGABATCH = 50  # global batches per length group, as the Hugging Face Trainer's LengthGroupedSampler
MIN_GROUPS = 4  # length groups per epoch at least: smaller groups for a small task


def sequence_lengths(feature):
    """Tokens of each sequence a feature puts in a batch (multiple choice: one per choice)."""
    return [len(ids) for ids in feature["choices"]] if "choices" in feature else [len(feature["input_ids"])]


def feature_length(feature):
    """The length a feature is padded to at least: its longest sequence."""
    return max(sequence_lengths(feature))


def padding_fraction(batches):
    """Padded positions over all positions when each batch (a list of features) is padded to its longest."""
    padded = total = 0
    for batch in batches:
        lengths = [n for feature in batch for n in sequence_lengths(feature)]
        total += len(lengths) * max(lengths)
        padded += len(lengths) * max(lengths) - sum(lengths)
    return padded / total if total else 0.0


def group_by_length(order, lengths, batch_size, generator):
    """`order` (whole global batches) regrouped: sorted by length within groups of MEGABATCH batches, or
    fewer so that there are MIN_GROUPS (ties keep the shuffled order), cut into batches, the batches
    shuffled."""
    group = batch_size * max(1, min(MEGABATCH, len(order) // batch_size // MIN_GROUPS))
    batches = []
    for first in range(0, len(order), group):
        ranked = sorted(order[first:first + group], key=lambda i: -lengths[i])
        batches += [ranked[i:i + batch_size] for i in range(0, len(ranked), batch_size)]
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]


def epoch_order(lengths, batch_size, seed, epoch, grouped):
    """Feature indices of one epoch, steps * batch_size of them, and the number of optimizer steps."""
    count = len(lengths)
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    steps = math.ceil(count / batch_size)
    order = (order * math.ceil(steps * batch_size / count))[:steps * batch_size]
    return (group_by_length(order, lengths, batch_size, generator) if grouped else order), steps


def epoch_micro_batches(lengths, settings, epoch, rank, world_size):
    """(this rank's micro-batches, optimizer steps, every rank's micro-batches) of one epoch; a micro-batch
    is a list of feature indices, `lengths` the length of each feature (feature_length)."""
    order, steps = epoch_order(lengths, settings.batch_size, settings.seed, epoch, settings.group_by_length)
    micro = settings.micro_batch_size
    pieces = [order[i:i + micro] for i in range(0, len(order), micro)]
    return pieces[rank::world_size], steps, pieces


def evaluation_batches(features, batch_size):
    """Batches of feature indices for evaluation: sorted by length, so each pads little."""
    order = sorted(range(len(features)), key=lambda i: feature_length(features[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
