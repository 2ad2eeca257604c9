"""transformers as the oracle: build its DeBERTa-v2 models from our config and copy their weights into ours."""
import torch
import transformers

from model import DebertaConfig
from model.release import build_model, check_and_load, normalise_keys

HF_CLASSES = {
    "base": transformers.DebertaV2Model,
    "mlm": transformers.DebertaV2ForMaskedLM,
    "classification": transformers.DebertaV2ForSequenceClassification,
    "multiple_choice": transformers.DebertaV2ForMultipleChoice,
}


def hf_config(config: DebertaConfig, **extra):
    values = config.to_dict()
    values.update(extra)
    return transformers.DebertaV2Config(**values)


def hf_and_ours(config: DebertaConfig, task="base", num_labels=2, emd=False, seed=0, position_table=False):
    """The same random weights in transformers' model and ours (transformers initialises, we copy)."""
    torch.manual_seed(seed)
    theirs = HF_CLASSES[task](hf_config(config, num_labels=num_labels, legacy=False)).eval()
    state = normalise_keys(theirs.state_dict(), source="transformers")
    ours = build_model(config, task, num_labels, position_table=position_table, emd=emd)
    if emd or position_table:  # transformers has no absolute table when position_biased_input=False
        table = torch.randn(config.max_position_embeddings, config.embed_size) * 0.02
        state["deberta.embeddings.position_embeddings.weight"] = table
    check_and_load(ours, task, state, source="transformers")
    return theirs, ours.eval()
