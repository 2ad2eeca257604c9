import numpy as np
import pytest
import torch

from pipeline.data.mlm_loader import IGNORE_INDEX, WholeWordMasker, build_pretrain_loader, epoch_permutation
from pipeline.data.shards import ShardError


def _loaders(data_env, tok, micro, dp, seed=7, consumed=0):
    return [build_pretrain_loader(data_env["shards"], tok, micro, rank, dp, seed, consumed) for rank in range(dp)]


def _global_batches(loaders, steps):
    """Per step, the ranks' micro batches concatenated in rank order."""
    iterators = [iter(loader) for loader in loaders]
    return [torch.cat([next(it)["input_ids"] for it in iterators]) for _ in range(steps)]


def test_batch_layout(data_env, tok):
    batch = next(iter(build_pretrain_loader(data_env["shards"], data_env["spm"], 4, 0, 1, seed=0)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (4, 64) for t in batch.values())
    assert torch.all(batch["input_ids"][:, 0] == tok.cls_id)
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)


def test_every_epoch_is_a_permutation_and_epochs_differ():
    first, second = epoch_permutation(1000, 3, 0), epoch_permutation(1000, 3, 1)
    assert sorted(first.tolist()) == list(range(1000)) and sorted(second.tolist()) == list(range(1000))
    assert not np.array_equal(first, second) and np.array_equal(first, epoch_permutation(1000, 3, 0))


def test_resume_with_same_rank_count(data_env, tok):
    full = _global_batches(_loaders(data_env, tok, 2, 2), 5)
    loaders = _loaders(data_env, tok, 2, 2)
    _global_batches(loaders, 3)
    state = loaders[0].state_dict()
    assert state["consumed_samples"] == 12
    resumed = _loaders(data_env, tok, 2, 2)
    for loader in resumed:
        loader.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(full[3:], _global_batches(resumed, 2)))


def test_resume_with_another_rank_count(data_env, tok):
    full = _global_batches(_loaders(data_env, tok, 3, 2), 6)  # global batch 6 on 2 ranks
    assert all(torch.equal(a, b) for a, b in zip(full, _global_batches(_loaders(data_env, tok, 1, 6), 6)))
    resumed = _loaders(data_env, tok, 2, 3, consumed=4 * 6)  # 3 ranks resume after step 4
    assert all(torch.equal(a, b) for a, b in zip(full[4:], _global_batches(resumed, 2)))


def test_epochs_wrap_around_exactly(data_env, tok):
    loader = build_pretrain_loader(data_env["shards"], tok, 1, 0, 1, seed=1)
    n = len(loader.data)
    ids = [loader.order[p][1] for p in range(2 * n)]
    assert sorted(ids[:n]) == list(range(n)) == sorted(ids[n:]) and ids[:n] != ids[n:]
    assert loader.order[n][0] == 1


def test_tokenizer_mismatch_is_refused(data_env, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(data_env["spm"], "rb").read())
    proto.pieces[10].score -= 1.0  # another model with the same special pieces
    other = tmp_path / "other.model"
    other.write_bytes(proto.SerializeToString())
    with pytest.raises(ShardError, match="tokenizer sha256"):
        build_pretrain_loader(data_env["shards"], str(other), 2, 0, 1, seed=0)


@pytest.fixture(scope="module")
def masked(data_env, tok):
    loader = build_pretrain_loader(data_env["shards"], tok, 1, 0, 1, seed=5)
    masker = WholeWordMasker(tok, 64, seed=5)
    samples = [loader.data.sample(i) for i in range(min(len(loader.data), 1500))]
    return masker, samples, [masker(s, 0, i) for i, s in enumerate(samples)]


def test_masking_rates(masked, tok):
    _, samples, outputs = masked
    predicted = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in outputs)
    total = sum(len(s) for s in samples)
    assert 0.13 < predicted / total < 0.16
    as_mask = sum(int(((labels != IGNORE_INDEX) & (inputs == tok.mask_id)).sum()) for inputs, labels in outputs)
    kept = sum(int(((labels != IGNORE_INDEX) & (inputs == labels)).sum()) for inputs, labels in outputs)
    assert abs(as_mask / predicted - 0.8) < 0.02
    assert abs(kept / predicted - 0.1) < 0.02  # random replacements that hit the same id count here too
    assert abs((predicted - as_mask - kept) / predicted - 0.1) < 0.02


def test_masking_takes_whole_words_and_no_specials(masked, tok):
    masker, samples, outputs = masked
    spans_longer_than_one = 0
    for sample, (inputs, labels) in zip(samples, outputs):
        chosen = labels != IGNORE_INDEX
        assert not chosen[tok.is_special[np.asarray(sample)]].any()
        assert np.array_equal(labels[chosen], np.asarray(sample)[chosen])
        for unit in masker.word_units(np.asarray(sample)):
            assert chosen[unit].all() or not chosen[unit].any()
        spans_longer_than_one += int(np.any(chosen[1:] & chosen[:-1]))
    assert spans_longer_than_one > len(samples) / 2


def test_masking_is_deterministic_per_seed_epoch_and_sample(masked):
    masker, samples, outputs = masked
    again_inputs, again_labels = masker(samples[3], 0, 3)
    assert np.array_equal(again_inputs, outputs[3][0]) and np.array_equal(again_labels, outputs[3][1])
    other_epoch = masker(samples[3], 1, 3)[1]
    assert not np.array_equal(other_epoch, outputs[3][1])


def test_rtd_masking_is_single_tokens_all_mask_with_a_seed_per_sample(data_env, tok):
    """objective rtd (the official NGramMaskGenerator(max_gram=1, keep_prob=0, mask_prob=1)): every selected token
    becomes [MASK], about 15% of them; each sample carries a seed for the generator's draws that depends on the
    sample, not on the rank that reads it."""
    one = build_pretrain_loader(data_env["shards"], tok, 4, 0, 1, seed=7, masking="rtd")
    batch = one.batch_at(0)
    selected = batch["labels"] != IGNORE_INDEX
    assert torch.all(batch["input_ids"][selected] == tok.mask_id)
    assert 0.10 < selected.sum().item() / batch["attention_mask"].sum().item() < 0.20
    halves = [build_pretrain_loader(data_env["shards"], tok, 2, r, 2, seed=7, masking="rtd").batch_at(0) for r in (0, 1)]
    assert torch.equal(torch.cat([h["sample_seeds"] for h in halves]), batch["sample_seeds"])
    assert len(set(batch["sample_seeds"].tolist())) == 4
    assert "sample_seeds" not in build_pretrain_loader(data_env["shards"], tok, 4, 0, 1, seed=7).batch_at(0)
