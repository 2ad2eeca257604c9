"""A DeBERTa-v3 directory laid out as the published ones (microsoft/deberta-v3-*) are, written from an RTDModel:

  pytorch_model.bin            the discriminator as the official code saves it: deberta.* with the merged word
                               table and the absolute position table (GDES shares it; transformers ignores it),
                               an MLM head lm_predictions.lm_head.*, and the RTD head
                               mask_predictions.{dense,LayerNorm,classifier}.* (LMMaskPredictionHead)
  pytorch_model.generator.bin  the generator: deberta.* and lm_predictions.lm_head.*
  config.json                  the discriminator's, with the published keys only
  spm.model, tokenizer_config.json
and no generator_config.json, no safetensors. `classifier="classifer"` spells the RTD head's classifier as an
earlier official revision (and our releases before) did."""
import json
import os
import shutil

import torch

from model import state_dict_adapter as keys
from pipeline.release.read import read_state_dict
from tests.helpers.launch import NO_DROPOUT, cli, explain, pretrain

OURS_ONLY = ("attention_impl", "architectures", "legacy", "tie_word_embeddings")


def write_published_v3(rtd, out, spm_path=None, classifier="classifier"):
    os.makedirs(out)
    generator = {k: v.detach().clone() for k, v in rtd.generator.state_dict().items()}
    discriminator = {k.replace(keys.RTD_CLASSIFIER, f"mask_predictions.{classifier}."): v.detach().clone()
                     for k, v in rtd.discriminator.state_dict().items()}
    discriminator[keys.WORD_EMBEDDINGS] = rtd.discriminator_word_table().detach().clone()
    discriminator[keys.POSITION_TABLE] = generator[keys.POSITION_TABLE].clone()
    discriminator.update({k: v.clone() for k, v in generator.items() if k.startswith("lm_predictions.")})
    torch.save(discriminator, os.path.join(out, "pytorch_model.bin"))
    torch.save(generator, os.path.join(out, "pytorch_model.generator.bin"))
    config = {k: v for k, v in rtd.config.to_dict().items() if k not in OURS_ONLY}
    config["pos_att_type"] = "|".join(rtd.config.pos_att_type)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"do_lower_case": False, "vocab_type": "spm"}, f)
    if spm_path:
        shutil.copy(spm_path, os.path.join(out, "spm.model"))
    return discriminator, generator


def assert_release_round_trip(release, shards, out, rtd_sets):
    """A run of `rtd_sets` starting from the v3 directory `release` (init_from_release), one step at lr 0 (and so
    discriminator_lr 0), converted back to a release in OUT/again: the same discriminator and generator."""
    sets = rtd_sets + NO_DROPOUT + ["max_steps=1", "save_interval=1", "lr=0",
                                    f"init_from_release={json.dumps(str(release))}"]
    result = pretrain(shards, out / "run", sets=sets)
    assert result.returncode == 0, explain(result)
    again = cli("convert", "to-release", "--checkpoint", str(out / "run" / "checkpoints"), "--output", str(out / "again"))
    assert again.returncode == 0, explain(again)
    a, b = read_state_dict(str(release)), read_state_dict(str(out / "again"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ga, gb = (torch.load(os.path.join(d, "pytorch_model.generator.bin")) for d in (release, out / "again"))
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
