"""Config presets and counts, release directories in every accepted layout, and bad input."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from tests.helpers.hf_oracle import hf_and_ours, hf_config
from model import DebertaConfig, DebertaForMaskedLM, DebertaModel, preset
from pipeline.release import load_release, save_release
from pipeline.release.write import write_config
from pipeline.errors import ReleaseError

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
    write_config(str(tmp_path), config, "mlm", torch.float32)
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
    with pytest.raises(ReleaseError, match=r"query_proj.weight has shape \(3, 3\) in the release but \(64, 64\)"):
        load_release(str(tmp_path / "rel"), task="mlm")
    rewrite({k: v for k, v in state.items() if k != key})
    with pytest.raises(ReleaseError, match="missing keys: " + key.replace(".", r"\.")):
        load_release(str(tmp_path / "rel"), task="mlm")
    rewrite({**state, "deberta.encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ReleaseError, match="unexpected keys: deberta.encoder.extra.weight"):
        load_release(str(tmp_path / "rel"), task="mlm")
    (tmp_path / "rel" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ReleaseError, match="model.safetensors: cannot read tensors"):
        load_release(str(tmp_path / "rel"), task="mlm")
    os.remove(tmp_path / "rel" / "model.safetensors")
    with pytest.raises(ReleaseError, match="no weights"):
        load_release(str(tmp_path / "rel"), task="mlm")


def test_classification_head_with_wrong_number_of_labels_is_refused(tmp_path):
    config = preset("tiny", **SMALL)
    theirs, _ = hf_and_ours(config, "classification", num_labels=3)
    write_hf_release(theirs, tmp_path)
    assert load_release(str(tmp_path), task="classification", num_labels=3) is not None
    with pytest.raises(ReleaseError, match=r"classifier.weight has shape \(3, 64\) in the release but \(2, 64\)"):
        load_release(str(tmp_path), task="classification", num_labels=2)


# ---------------------------------------------------------------- loading builds the model once
def test_loaded_parameters_are_real_owned_tied_and_trainable(tmp_path):
    """load_release builds the model with its parameters on the meta device and makes each read tensor the
    parameter: check that nothing stays on meta, nothing aliases the file, the MLM decoder still reads the
    word embedding, and a training step updates everything, also from a pytorch_model.bin (memory-mapped)."""
    config = preset("tiny", **SMALL)
    theirs, ours = hf_and_ours(config, "mlm", emd=True)
    save_release(ours, str(tmp_path / "safe"))
    os.makedirs(tmp_path / "bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    torch.save({k: v.clone() for k, v in ours.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    for name in ("safe", "bin"):
        model = load_release(str(tmp_path / name), task="mlm").train()
        tensors = list(model.parameters()) + list(model.buffers())
        assert not any(t.is_meta for t in tensors) and all(t.is_contiguous() for t in tensors)
        assert all(p.requires_grad for p in model.parameters())
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())
        word = model.deberta.embeddings.word_embeddings.weight
        ids = torch.randint(4, 1000, (2, 9))
        model(input_ids=ids).logits.sum().backward()
        # the decoder's gradient reaches the one word-embedding tensor (rows of tokens not in the input too)
        assert word.grad is not None and int((word.grad.abs().sum(-1) > 0).sum()) > 100
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        assert not torch.equal(word, ours.deberta.embeddings.word_embeddings.weight)
        # the files are untouched by the in-place update: loading again gives the saved weights
        again = load_release(str(tmp_path / name), task="mlm")
        assert torch.equal(again.deberta.embeddings.word_embeddings.weight, ours.deberta.embeddings.word_embeddings.weight)
    bf16 = load_release(str(tmp_path / "safe"), task="classification", num_labels=3, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    # the new head is real and initialised like our Linear layers (normal(0, 0.02), zero bias)
    assert not bf16.classifier.weight.is_meta and bf16.classifier.weight.float().std() > 0.005
    assert not bf16.classifier.bias.float().any()


def test_legacy_decoder_that_is_not_tied_is_refused(tmp_path):
    config = preset("tiny", **SMALL)
    legacy = transformers.DebertaV2ForMaskedLM(hf_config(config, legacy=True)).eval()
    state = {k: v.clone().contiguous() for k, v in legacy.state_dict().items()}
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1
    legacy.config.save_pretrained(str(tmp_path))
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ReleaseError, match="decoder.weight differs from the word embeddings"):
        load_release(str(tmp_path), task="mlm")


PEAK_RSS = """
import resource, sys
import torch
from pipeline.release import load_release
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_release(sys.argv[1], task="mlm")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_loading_holds_the_weights_about_once(tmp_path):
    """Peak RSS of load_release (a fresh process) grows by about one copy of the weights, not two (the
    state dict and a randomly initialised model side by side, as before). ~270 MB of fp32 weights."""
    import subprocess
    import sys

    torch.manual_seed(0)
    config = preset("base", num_hidden_layers=1, vocab_size=80000)
    save_release(DebertaForMaskedLM(config, emd=True), str(tmp_path))
    size = os.path.getsize(tmp_path / "model.safetensors")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path)], capture_output=True, text=True,
                            cwd=root, env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    assert size > 250e6 and growth < 1.3 * size, (growth, size)


def test_a_new_task_head_is_announced_by_its_keys(tmp_path, capsys):
    config = preset("tiny", **SMALL)
    _, ours = hf_and_ours(config, "mlm", emd=True)
    save_release(ours, str(tmp_path / "rel"))
    load_release(str(tmp_path / "rel"), task="classification", num_labels=3)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'rel'}: new task head, initialised randomly: pooler.dense.weight, pooler.dense.bias, " \
           "classifier.weight, classifier.bias" in err


@pytest.mark.parametrize("safe", [True, False])
def test_an_integer_weight_is_refused_naming_file_key_and_dtype(tmp_path, safe):
    """Before, an int32 weight was cast to float and loaded silently (as whole numbers)."""
    config = preset("tiny", **SMALL)
    _, ours = hf_and_ours(config, "mlm", emd=True)
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    key = "deberta.encoder.layer.0.attention.self.query_proj.weight"
    state[key] = state[key].to(torch.int32)
    write_config(str(tmp_path), config, "mlm", torch.float32)
    if safe:
        save_file(state, str(tmp_path / "model.safetensors"))
        file, dtype = tmp_path / "model.safetensors", "I32"
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
        file, dtype = tmp_path / "pytorch_model.bin", "torch.int32"
    for task in ("mlm", "base", "classification"):
        with pytest.raises(ReleaseError) as refused:
            load_release(str(tmp_path), task=task)
        assert str(refused.value) == (f"{file}: {key} is {dtype}, not a floating-point weight (a release holds "
                                      "float32, bfloat16 or float16 weights)")
