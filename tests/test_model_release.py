"""Config presets and counts, release directories in every accepted layout, and bad input."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from hf_oracle import hf_and_ours, hf_config
from model import CheckpointError, DebertaConfig, DebertaForMaskedLM, DebertaModel, load_release, preset, save_release

SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=1000,
             max_position_embeddings=128, position_buckets=32)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_xxlarge_preset_has_the_exact_parameter_counts():
    config = preset("xxlarge")
    with torch.device("meta"):
        encoder = DebertaModel(config)
        mlm = DebertaForMaskedLM(config, emd=False)
        mlm_emd = DebertaForMaskedLM(config, emd=True)
    assert n_params(encoder) == 1_564_549_632
    assert n_params(mlm) == 1_567_041_636  # + LM head; the decoder is the tied word embedding
    assert n_params(mlm_emd) == 1_567_041_636 + 786_432  # + absolute position table for the EMD
    assert config.head_size == 64 and config.att_span == 256 and config.scale_factor == 3


def test_presets_match_transformers_counts():
    for name in ("tiny", "base", "xlarge"):
        config = preset(name)
        with torch.device("meta"):
            ours = DebertaModel(config)
            theirs = transformers.DebertaV2Model(hf_config(config))
        assert n_params(ours) == n_params(theirs), name


def test_config_json_round_trip_and_transformers_defaults(tmp_path):
    config = preset("xxlarge")
    config.to_json(str(tmp_path / "config.json"))
    assert DebertaConfig.from_json(str(tmp_path)) == config
    loaded = transformers.AutoConfig.from_pretrained(str(tmp_path))
    for key in ("hidden_size", "num_hidden_layers", "position_buckets", "share_att_key", "conv_act",
                "pos_att_type", "layer_norm_eps", "vocab_size"):
        assert getattr(loaded, key) == getattr(config, key), key
    # absent keys take transformers' defaults, not the 1.5B values
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deberta-v2", "hidden_size": 64,
                                                      "num_attention_heads": 4}))
    sparse = DebertaConfig.from_json(str(tmp_path))
    assert sparse.relative_attention is False and sparse.position_biased_input is True
    assert sparse.pos_att_type == [] and sparse.num_hidden_layers == 24
    # the official "p2c|c2p" string form
    assert DebertaConfig(pos_att_type="p2c|c2p").pos_att_type == ["p2c", "c2p"]


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=100, num_attention_heads=12), "not divisible by num_attention_heads"),
    (dict(relative_attention=True, position_buckets=1024, max_position_embeddings=512), "position_buckets 1024"),
    (dict(pos_att_type=["p2p"]), "p2p"),
    (dict(conv_kernel_size=4), "must be odd"),
    (dict(attention_impl="flash"), "attention_impl"),
])
def test_inconsistent_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        DebertaConfig(**bad)


def write_hf_release(model, path, safe=True):
    model.save_pretrained(str(path), safe_serialization=safe)


@pytest.mark.parametrize("safe", [True, False])
def test_load_release_written_by_transformers(tmp_path, safe):
    config = preset("tiny", **SMALL)
    theirs, _ = hf_and_ours(config, "mlm")
    write_hf_release(theirs, tmp_path, safe)
    ids = torch.randint(4, 1000, (2, 9))
    mask = torch.ones_like(ids)
    base = load_release(str(tmp_path), task="base")
    mlm = load_release(str(tmp_path), task="mlm")
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids, attention_mask=mask).last_hidden_state,
                              theirs.deberta(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5)
        assert torch.allclose(mlm(input_ids=ids, attention_mask=mask).logits,
                              theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    clf = load_release(str(tmp_path), task="classification", num_labels=3)
    assert clf(input_ids=ids, attention_mask=mask).logits.shape == (2, 3)


def test_legacy_cls_predictions_layout_loads_the_same_head(tmp_path):
    config = preset("tiny", **SMALL)
    torch.manual_seed(0)
    legacy = transformers.DebertaV2ForMaskedLM(hf_config(config, legacy=True)).eval()
    write_hf_release(legacy, tmp_path)
    ours = load_release(str(tmp_path), task="mlm")
    ids = torch.randint(4, 1000, (1, 11))
    with torch.no_grad():
        # the legacy head: dense -> gelu -> LN -> decoder (tied word embeddings) + bias: the same function
        assert torch.allclose(ours(input_ids=ids).logits, legacy(input_ids=ids).logits, atol=1e-5)


def test_official_layout_with_position_table_uses_the_emd_and_round_trips_exactly(tmp_path):
    config = preset("tiny", **SMALL)
    _, ours = hf_and_ours(config, "mlm", emd=True)
    save_release(ours, str(tmp_path / "rel"))
    # transformers loads it (ignoring the position table) with no missing keys
    hf, info = transformers.DebertaV2ForMaskedLM.from_pretrained(str(tmp_path / "rel"), output_loading_info=True)
    assert not info["missing_keys"]
    again = load_release(str(tmp_path / "rel"), task="mlm")
    assert again.emd_steps == 2
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_release_with_index(tmp_path):
    config = preset("tiny", **SMALL)
    _, ours = hf_and_ours(config, "mlm", emd=True)
    save_release(ours, str(tmp_path / "rel"), max_shard_size="100KB")
    files = os.listdir(tmp_path / "rel")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    again = load_release(str(tmp_path / "rel"), task="mlm")
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in again.state_dict().items())
    hf = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path / "rel"))
    assert hf.config.model_type == "deberta-v2"


def test_bad_checkpoints_name_the_key_and_shapes(tmp_path):
    config = preset("tiny", **SMALL)
    _, ours = hf_and_ours(config, "mlm", emd=True)
    save_release(ours, str(tmp_path / "rel"))
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "rel" / "model.safetensors"))

    def rewrite(mutated):
        save_file(mutated, str(tmp_path / "rel" / "model.safetensors"))

    key = "deberta.encoder.layer.0.attention.self.query_proj.weight"
    rewrite({**state, key: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"query_proj.weight has shape \(3, 3\) in the checkpoint but \(64, 64\)"):
        load_release(str(tmp_path / "rel"), task="mlm")
    rewrite({k: v for k, v in state.items() if k != key})
    with pytest.raises(CheckpointError, match="missing keys: " + key.replace(".", r"\.")):
        load_release(str(tmp_path / "rel"), task="mlm")
    rewrite({**state, "deberta.encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected keys: deberta.encoder.extra.weight"):
        load_release(str(tmp_path / "rel"), task="mlm")
    (tmp_path / "rel" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read tensors"):
        load_release(str(tmp_path / "rel"), task="mlm")
    os.remove(tmp_path / "rel" / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        load_release(str(tmp_path / "rel"), task="mlm")


def test_classification_head_with_wrong_number_of_labels_is_refused(tmp_path):
    config = preset("tiny", **SMALL)
    theirs, _ = hf_and_ours(config, "classification", num_labels=3)
    write_hf_release(theirs, tmp_path)
    assert load_release(str(tmp_path), task="classification", num_labels=3) is not None
    with pytest.raises(CheckpointError, match=r"classifier.weight has shape \(3, 64\) in the checkpoint but \(2, 64\)"):
        load_release(str(tmp_path), task="classification", num_labels=2)
