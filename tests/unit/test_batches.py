"""Length-grouped training batches and length-sorted evaluation batches (pipeline/finetune/batches.py)."""
import random
from collections import Counter

import numpy as np
import torch

from model import Output
from pipeline.finetune.batches import epoch_micro_batches, epoch_order, evaluation_batches, padding_fraction
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.inference import predict_logits


def lengths_like_boolq(count, seed=0):
    rng = random.Random(seed)
    return [max(4, int(rng.lognormvariate(4.7, 0.5))) for _ in range(count)]


def settings(**values):
    base = dict(lr=1e-5, batch_size=16, micro_batch_size=4, seed=7, epochs=1, warmup_steps=0, cls_drop_out=0.0,
                max_seq_len=512)
    return FinetuneConfig(**dict(base, **values))


def features_of(lengths):
    return [{"input_ids": [1] * n} for n in lengths]


def test_grouping_keeps_each_epochs_examples_and_cuts_the_padding():
    lengths = lengths_like_boolq(1000)
    grouped, steps = epoch_order(lengths, 16, seed=7, epoch=1, grouped=True)
    plain, plain_steps = epoch_order(lengths, 16, seed=7, epoch=1, grouped=False)
    assert steps == plain_steps == 63 and Counter(grouped) == Counter(plain)     # the same multiset
    assert set(grouped) == set(range(1000)) and len(grouped) == 63 * 16
    features = features_of(lengths)
    batches = lambda order: [[features[i] for i in order[k:k + 4]] for k in range(0, len(order), 4)]  # noqa: E731
    assert padding_fraction(batches(grouped)) < 0.1 < 0.3 < padding_fraction(batches(plain))


def test_the_order_is_a_function_of_seed_and_epoch():
    lengths = lengths_like_boolq(300)
    first = epoch_order(lengths, 16, seed=7, epoch=2, grouped=True)
    assert epoch_order(list(lengths), 16, seed=7, epoch=2, grouped=True) == first
    assert epoch_order(lengths, 16, seed=7, epoch=3, grouped=True)[0] != first[0]
    assert epoch_order(lengths, 16, seed=8, epoch=2, grouped=True)[0] != first[0]


def test_batches_mix_long_and_short_over_the_epoch():
    """Batches are shuffled after grouping: the epoch does not run from the longest to the shortest."""
    lengths = lengths_like_boolq(16 * 200)
    order, _ = epoch_order(lengths, 16, seed=7, epoch=1, grouped=True)
    longest = [max(lengths[i] for i in order[k:k + 16]) for k in range(0, len(order), 16)]
    first_group = longest[:50]
    assert first_group != sorted(first_group, reverse=True)
    assert abs(np.corrcoef(np.arange(len(longest)), longest)[0, 1]) < 0.3


def test_two_ranks_see_the_micro_batches_of_one_process():
    """2 ranks with micro-batch 4 run the micro-batches one process runs with 2 accumulation steps."""
    lengths = lengths_like_boolq(200)
    one = epoch_micro_batches(lengths, settings(micro_batch_size=4), 1, rank=0, world_size=1)[0]
    per_rank = [epoch_micro_batches(lengths, settings(micro_batch_size=4), 1, rank=r, world_size=2)[0] for r in range(2)]
    assert one[0::2] == per_rank[0] and one[1::2] == per_rank[1]
    # within a global batch the micro-batches are cut from the length-sorted batch
    global_batch = one[0] + one[1] + one[2] + one[3]
    assert [lengths[i] for i in global_batch] == sorted((lengths[i] for i in global_batch), reverse=True)


def test_evaluation_comes_back_in_feature_order():
    """Batches are formed by length; the logits are returned in the order of the features (the file's)."""
    lengths = [5, 30, 2, 17, 9, 30, 1]
    features = [{"input_ids": [10 + i] + [3] * (n - 1), "label": 0} for i, n in enumerate(lengths)]
    batches = evaluation_batches(features, 3)
    assert [[lengths[i] for i in b] for b in batches] == [[1, 2, 5], [9, 17, 30], [30]]

    def forward(input_ids, attention_mask, labels):   # logits: the feature's number and its length
        return Output(logits=torch.stack([input_ids[:, 0] - 10, attention_mask.sum(1)], 1).float())
    logits = predict_logits(forward, features, 3, "cpu")
    assert logits.tolist() == [[i, n] for i, n in enumerate(lengths)]
