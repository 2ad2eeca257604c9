"""The key maps between our models, the release layouts and pipeline mode's layer files
(model/state_dict_adapter.py)."""
import torch
import transformers

from model import DebertaForMaskedLM, DebertaModel, preset
from model import state_dict_adapter as keys
from pipeline.release.write import mlm_layout
from tests.helpers.hf_oracle import hf_config

CONFIG = preset("tiny", vocab_size=300, max_position_embeddings=64)


def test_transformers_layouts_map_onto_ours():
    assert keys.from_release("embeddings.word_embeddings.weight") == keys.WORD_EMBEDDINGS      # DebertaV2Model
    assert keys.from_release("cls.predictions.transform.dense.weight") == "lm_predictions.lm_head.dense.weight"
    assert keys.from_release("cls.predictions.bias") == "lm_predictions.lm_head.bias"
    for dropped in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "mask_predictions.dense.weight",
                    "deberta.embeddings.position_ids"):
        assert keys.from_release(dropped) is None
    assert keys.from_release("classifier.weight") == "classifier.weight"


def test_every_key_of_transformers_models_maps_to_ours_and_back():
    with torch.device("meta"):
        legacy = transformers.DebertaV2ForMaskedLM(hf_config(CONFIG, legacy=True))
        current = transformers.DebertaV2ForMaskedLM(hf_config(CONFIG, legacy=False))
        ours = DebertaForMaskedLM(CONFIG, emd=False)
        base = transformers.DebertaV2Model(hf_config(CONFIG))
        our_base = DebertaModel(CONFIG)
    expected = set(ours.state_dict())
    assert set(keys.from_release_state(legacy.state_dict())) == expected
    assert set(keys.from_release_state(current.state_dict())) == expected
    mapped = set(keys.from_release_state(base.state_dict()))
    assert mapped == {keys.to_release(k, "base") for k in our_base.state_dict()}
    assert {keys.to_model(k, "base") for k in mapped} == set(our_base.state_dict())


def test_pipeline_layer_keys_cover_the_mlm_model_once_except_the_tied_decoder():
    maps = keys.pipeline_layer_keys(CONFIG)
    L = CONFIG.num_hidden_layers
    assert sorted(maps) == list(range(L + 3))
    release = [key for index in range(L + 2) for key in maps[index].values()]
    assert len(release) == len(set(release))
    assert set(release) == {k for k, _ in mlm_layout(CONFIG, emd=True)}
    assert maps[L + 2] == {"weight": keys.WORD_EMBEDDINGS}
    assert keys.from_pipeline("tied_modules.word_embeddings.weight", maps) == keys.WORD_EMBEDDINGS
    assert keys.from_pipeline("3.layer.output.dense.bias", maps) == "deberta.encoder.layer.1.output.dense.bias"
    assert keys.from_pipeline("2.conv.conv.weight", maps) == "deberta.encoder.conv.conv.weight"
    assert keys.from_pipeline(f"{L + 1}.bias", maps) == "lm_predictions.lm_head.bias"
    assert keys.from_pipeline("99.layer.x", maps) is None and keys.from_pipeline("x.y", maps) is None
