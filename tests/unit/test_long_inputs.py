"""Inputs longer than 512 tokens: a published 512-position model beyond 512 (against transformers), and a release
of a long-sequence model that transformers loads with the same outputs."""
import torch
import transformers

from model import preset
from model.attention import relative_position_index
from pipeline.release import load_release, save_release
from tests.helpers.hf_oracle import hf_and_ours

# the published models' position settings (max_position_embeddings 512, 256 log buckets) at tiny widths
PUBLISHED_512 = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                     vocab_size=1000, max_position_embeddings=512, position_buckets=256)


def padded_batch(length, seed=0):
    """Two sequences of `length` tokens, the second with its last quarter padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 3 * length // 4:] = 0
    return ids * mask, mask


def test_a_512_position_model_beyond_512_equals_transformers():
    """The encoder has no absolute positions: a 512-position config runs at 1024 tokens, as transformers does."""
    config = preset("tiny", **PUBLISHED_512)
    theirs, ours = hf_and_ours(config, "base")
    ids, mask = padded_batch(1024)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert torch.allclose(a[keep], b[keep], atol=1e-5)


def test_relative_positions_saturate_beyond_512():
    """The log buckets reach the table's last row at |i - j| = 511. Beyond it, keys to the left (i - j >= 512)
    stay on the last row (511); keys to the right (j - i >= 512) read row 0, which inputs of 512 tokens never
    use (their farthest right key is row 1): transformers does the same, the official code clamps to row 1."""
    config = preset("tiny", **PUBLISHED_512)
    index = relative_position_index(1024, 1024, config)
    assert index[511, 0] == 511 and index[1023, 0] == 511 and index[600, 0] == 511
    assert index[0, 511] == 1 and index[0, 512] == 0 and index[0, 1023] == 0
    assert index[:512, :512].min() == 1  # row 0 is out of reach at 512 tokens


def test_a_2048_token_release_loads_in_transformers_with_our_outputs(tmp_path):
    """A model pretrained at 2048 tokens (its EMD table 2048 rows): transformers loads its release and gives our
    last_hidden_state at 2048 tokens, padded or not; our loader reads the table back whole for the EMD."""
    config = preset("tiny", **dict(PUBLISHED_512, max_position_embeddings=2048, max_relative_positions=512))
    _, ours = hf_and_ours(config, "mlm", emd=True)
    assert ours.deberta.embeddings.position_embeddings.weight.shape[0] == 2048
    save_release(ours, str(tmp_path / "rel"))
    theirs = transformers.DebertaV2Model.from_pretrained(str(tmp_path / "rel")).eval()
    again = load_release(str(tmp_path / "rel"), task="base")
    ids, mask = padded_batch(2048, seed=1)  # the first sequence whole, the second padded
    keep = mask.bool()
    with torch.no_grad():
        a = again(input_ids=ids, attention_mask=mask).last_hidden_state
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a[keep], b[keep], atol=1e-5), (a[keep] - b[keep]).abs().max()
    mlm = load_release(str(tmp_path / "rel"), task="mlm")
    assert mlm.emd_steps == 2 and torch.equal(mlm.deberta.embeddings.position_embeddings.weight,
                                              ours.deberta.embeddings.position_embeddings.weight)


def test_fine_tuning_length_is_limited_only_by_an_input_position_table():
    import pytest
    from pipeline.errors import ConfigError
    from pipeline.finetune.start import check_length
    check_length(preset("tiny", **PUBLISHED_512), 8192, "REL")  # v2/v3: relative positions only, any length
    with pytest.raises(ConfigError, match=r"max_seq_len 1024 is longer than REL's absolute positions "
                                          r"\(max_position_embeddings 512, added to its input\)"):
        check_length(preset("tiny", **PUBLISHED_512, position_biased_input=True), 1024, "REL")
