"""Pretraining data: memory-mapped shards, a seeded global order, a resumable data-parallel sampler and
dynamic masking (MLM: whole-word spans; RTD: single tokens, MASKINGS).

Order (Megatron-style, independent of the number of ranks): the global sample sequence is epoch 0's
permutation, then epoch 1's, ... (permutation e is drawn from (seed, e)). Step s consumes the global
batch [consumed, consumed + micro_batch * dp_size) of that sequence; rank r takes its contiguous
micro_batch slice. The only state is `consumed_samples`, so a run resumes exactly, also on another
number of ranks (as long as micro_batch * dp_size divides the position, i.e. on a step boundary).

Masking (spec §4.1) is a pure function of (seed, epoch, sample id): whole-word units, spans of 1-3 units
with p(n) ∝ 1/n, ~15% of tokens (at most ceil(0.15 N / 10) * 10), each predicted token → [MASK] 80%,
kept 10%, random id 10%.
"""
import math

import numpy as np
import torch

from pipeline.data.shards import ShardSet
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import DataError

MASK_PROB, KEEP_PROB, RANDOM_PROB = 0.8, 0.1, 0.1
# what each objective masks: MLM (v2) whole-word spans of up to 3 words, 80/10/10; RTD (v3) single tokens, all
# [MASK] (the official NGramMaskGenerator(max_gram=1, keep_prob=0, mask_prob=1))
MASKINGS = {"mlm": dict(max_gram=3, mask_prob=MASK_PROB, keep_prob=KEEP_PROB),
            "rtd": dict(max_gram=1, mask_prob=1.0, keep_prob=0.0)}
MASK_RATE = 0.15
MAX_GRAM = 3
IGNORE_INDEX = -100
_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def epoch_permutation(num_samples, seed, epoch):
    """The order of the samples in `epoch` (int32 while it fits, to halve the memory)."""
    dtype = np.int32 if num_samples < 2**31 else np.int64
    order = np.arange(num_samples, dtype=dtype)
    np.random.Generator(np.random.PCG64([seed, epoch, 0])).shuffle(order)
    return order


class GlobalOrder:
    """position in the infinite global sequence -> (epoch, sample id); caches the current permutation."""

    def __init__(self, num_samples, seed):
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._order = None, None

    def __getitem__(self, position):
        epoch, index = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_permutation(self.num_samples, self.seed, epoch)
        return epoch, int(self._order[index])


def rank_positions(consumed_samples, micro_batch_size, dp_rank, dp_size):
    """Global positions of rank `dp_rank`'s micro batch in the global batch starting at consumed_samples."""
    start = consumed_samples + dp_rank * micro_batch_size
    return range(start, start + micro_batch_size)


# ------------------------------------------------------------------ masking

class WholeWordMasker:
    """Dynamic span masking over whole words (spec §4.1), deterministic in (seed, epoch, sample id)."""

    def __init__(self, tokenizer, max_seq_len, seed, mask_rate=MASK_RATE, max_gram=MAX_GRAM, mask_prob=MASK_PROB,
                 keep_prob=KEEP_PROB):
        self.mask_id, self.vocab_size = tokenizer.mask_id, tokenizer.vocab_size
        self.seed, self.mask_rate, self.max_gram = seed, mask_rate, max_gram
        self.mask_prob, self.keep_prob = mask_prob, keep_prob
        self.max_predictions = math.ceil(max_seq_len * mask_rate / 10) * 10  # 80 for 512
        self.is_special = tokenizer.is_special
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.spm_size)] + ["[MASK]"]
        # A piece continues the previous word unless it starts one ("▁"), is special or is punctuation.
        self.continues_word = np.array(
            [not (p.startswith("▁") or p in _PUNCTUATION) for p in pieces], dtype=bool) & ~self.is_special
        weights = 1.0 / np.arange(1, max_gram + 1)
        self.span_probs = weights / weights.sum()

    def rng(self, epoch, sample_id):
        return np.random.Generator(np.random.PCG64([self.seed, epoch, sample_id, 1]))

    def word_units(self, ids):
        """Lists of positions, one per whole word; special tokens belong to none."""
        units, previous_candidate = [], False
        for position, token in enumerate(ids):
            if self.is_special[token]:
                previous_candidate = False
                continue
            if previous_candidate and self.max_gram > 1 and self.continues_word[token]:
                units[-1].append(position)
            else:
                units.append([position])
            previous_candidate = True
        return units

    def choose_units(self, num_units, rng):
        """Indices of the units to predict: windows of 6n units, a span of n units in each (n ∝ 1/n)."""
        chosen, offset, window = [], 0, int(1 / self.mask_rate)
        while offset < num_units:
            span = int(rng.choice(self.max_gram, p=self.span_probs)) + 1
            context = min(span * window, num_units - offset)
            start = offset + int(rng.integers(context))
            end = min(start + span, num_units)
            chosen.extend(range(start, end))
            offset = max(offset + context, end)
        return chosen

    def __call__(self, ids, epoch, sample_id):
        """(input ids, labels) for one sample; labels are IGNORE_INDEX where nothing is predicted."""
        rng = self.rng(epoch, sample_id)
        ids = np.asarray(ids, dtype=np.int64)
        inputs, labels = ids.copy(), np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        units = self.word_units(ids)
        budget = min(self.max_predictions, max(1, round(len(ids) * self.mask_rate)))
        predicted = 0
        for unit_index in self.choose_units(len(units), rng):
            if predicted >= budget:
                break
            for position in units[unit_index]:
                draw = rng.random()
                if draw < self.mask_prob:
                    inputs[position] = self.mask_id
                elif draw >= self.mask_prob + self.keep_prob:
                    inputs[position] = rng.integers(self.vocab_size)
                labels[position] = ids[position]
                predicted += 1
        return inputs, labels


# ------------------------------------------------------------------ loader

class PretrainLoader:
    """Iterable of this rank's masked micro batches, forever; `state_dict()` holds the resume cursor."""

    def __init__(self, shard_set, tokenizer, micro_batch_size, dp_rank, dp_size, seed, consumed_samples=0,
                 masking="mlm"):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.data, self.tokenizer = shard_set, tokenizer
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.seed, self.consumed_samples = seed, consumed_samples
        self.max_seq_len = shard_set.max_seq_len
        self.order = GlobalOrder(len(shard_set), seed)
        self.masking = masking
        self.masker = WholeWordMasker(tokenizer, self.max_seq_len, seed, **MASKINGS[masking])

    @property
    def global_batch_size(self):
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self):
        return self.consumed_samples // len(self.data)

    def __iter__(self):
        while True:
            batch = self.batch_at(self.consumed_samples)
            self.consumed_samples += self.global_batch_size
            yield batch

    def batch_at(self, consumed_samples):
        """This rank's micro batch of the global batch that starts at `consumed_samples`."""
        rows, seeds = [], []
        for position in rank_positions(consumed_samples, self.micro_batch_size, self.dp_rank, self.dp_size):
            epoch, sample_id = self.order[position]
            rows.append(self.masker(self.data.sample(sample_id), epoch, sample_id))
            seeds.append(self.sample_seed(epoch, sample_id))
        batch = self._collate(rows)
        if self.masking == "rtd":
            batch["sample_seeds"] = torch.tensor(seeds, dtype=torch.long)
        return batch

    def sample_seed(self, epoch, sample_id):
        """A seed for the RTD generator's draws on this sample: like the masks, a function of (seed, epoch,
        sample), so that the replacements do not depend on the number of ranks or on a resume."""
        return int(np.random.Generator(np.random.PCG64([self.seed, epoch, sample_id, 2])).integers(2 ** 62))

    def _collate(self, rows):
        shape = (len(rows), self.max_seq_len)
        input_ids = torch.full(shape, self.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        for row, (inputs, row_labels) in enumerate(rows):
            n = len(inputs)
            input_ids[row, :n] = torch.from_numpy(inputs)
            labels[row, :n] = torch.from_numpy(row_labels)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def state_dict(self):
        return {"consumed_samples": self.consumed_samples, "seed": self.seed,
                "tokenizer_sha256": self.data.tokenizer_sha256, "num_samples": len(self.data)}

    def load_state_dict(self, state):
        if state["seed"] != self.seed or state["num_samples"] != len(self.data):
            raise DataError(f"loader state is for seed {state['seed']} over {state['num_samples']} samples, "
                             f"this loader has seed {self.seed} over {len(self.data)} samples: the data "
                             f"order would differ")
        if state["consumed_samples"] % self.global_batch_size:
            print(f"warning: consumed_samples {state['consumed_samples']} is not a multiple of the global batch "
                  f"{self.global_batch_size}; continuing from there")
        self.consumed_samples = state["consumed_samples"]


def build_pretrain_loader(data_dir, tokenizer_or_spm_path, micro_batch_size, dp_rank, dp_size, seed,
                          consumed_samples=0, verify="lazy", allow_incomplete=False, masking="mlm"):
    """The loader for one data-parallel rank. Checks the shards' tokenizer fingerprint against the tokenizer.

    verify: "lazy" (check each 4 MiB block's sha256 the first time it is read), "full" (all now), "none".
    masking: "mlm" or "rtd" (MASKINGS).
    """
    tokenizer = tokenizer_or_spm_path if isinstance(tokenizer_or_spm_path, Tokenizer) \
        else Tokenizer(tokenizer_or_spm_path)
    shard_set = ShardSet(data_dir, tokenizer_fingerprint=tokenizer.fingerprint, verify=verify,
                         allow_incomplete=allow_incomplete)
    return PretrainLoader(shard_set, tokenizer, micro_batch_size, dp_rank, dp_size, seed, consumed_samples, masking)
