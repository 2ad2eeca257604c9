"""transformers as the oracle: build its DeBERTa-v2 models from our config and copy their weights into ours."""
import torch
import transformers

from model import DebertaConfig
from model import state_dict_adapter as keys
from model.fast import convert
from pipeline.release.read import build_model

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


def hf_and_ours(config: DebertaConfig, task="base", num_labels=2, emd=False, seed=0, position_table=False, impl="plain"):
    """The same random weights in transformers' model and ours (transformers initialises, we copy). impl "plain":
    our plain model (model/, the math path); else an attention_impl, with model/fast/convert.py applied."""
    torch.manual_seed(seed)
    theirs = HF_CLASSES[task](hf_config(config, num_labels=num_labels, legacy=False)).eval()
    state = keys.from_release_state(theirs.state_dict())
    ours = build_model(config, task, num_labels, position_table=position_table, emd=emd)
    if emd or position_table:  # transformers has no absolute table when position_biased_input=False
        table = torch.randn(config.max_position_embeddings, config.embed_size) * 0.02
        state[keys.POSITION_TABLE] = table
    ours.load_state_dict({keys.to_model(k, task): v for k, v in state.items()}, strict=True)  # every key, every shape
    if impl != "plain":
        convert.apply(ours, impl)
    return theirs, ours.eval()
