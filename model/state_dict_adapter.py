"""Key names: ours, the release layouts (transformers' keys) and pipeline mode's layer files. Pure functions
over names; nothing here reads a file.

Ours are transformers' keys with a task model's layout: `deberta.*` for the encoder, `lm_predictions.lm_head.*`
for the MLM head (the official checkpoints' and transformers' legacy=False layout), `pooler.*`/`classifier.*`
for task heads (`proj.*`/`classifier.*` for ReCoRD's entity scoring, the official keys), and `deberta.embeddings.position_embeddings.weight` for the Enhanced Mask Decoder's absolute
position table (transformers ignores it).

Accepted from a release besides ours:
  * bare `embeddings.* / encoder.*` (transformers' DebertaV2Model)
  * transformers' legacy MLM head `cls.predictions.*`, whose decoder is the tied word embedding (its copy
    must equal the word embeddings: the reader checks it)
  * v3 releases' replaced-token-detection head `mask_predictions.*`, which the v2 models do not load; its
    classifier is `mask_predictions.classifier.*` (the published checkpoints); an earlier official revision
    and our releases before it spelt it `classifer`, which still loads (renamed_rtd_classifier)

Pipeline mode (pipeline/train/pipe.py) holds the model as a sequence of layers, saved one file
per layer (`layer_XX-model_states.pt`):
  0       the word embeddings (tied to the decoder, also layer L+2)
  1       the rest of the embeddings, and the relative table with its LayerNorm (rel_embeddings, rel_LayerNorm)
  2+i     encoder layer i (as `layer.*`); layer 0 also holds the nGiE conv (`conv.*`), the last also the
          EMD's position table and the MLM head's transform and bias (LMHead's names)
"""
import torch

WORD_EMBEDDINGS = "deberta.embeddings.word_embeddings.weight"
POSITION_TABLE = "deberta.embeddings.position_embeddings.weight"
# transformers' legacy MLM head -> ours
LEGACY_HEAD = {
    "cls.predictions.transform.dense.weight": "lm_predictions.lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_predictions.lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_predictions.lm_head.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_predictions.lm_head.LayerNorm.bias",
    "cls.predictions.bias": "lm_predictions.lm_head.bias",
}
LEGACY_DECODER = "cls.predictions.decoder.weight"
TIED_LEGACY = (LEGACY_DECODER, "cls.predictions.decoder.bias")
IGNORED_PREFIXES = ("mask_predictions.",)
MLM_HEAD_PREFIX = "lm_predictions."
RTD_CLASSIFIER, OLD_RTD_CLASSIFIER = "mask_predictions.classifier.", "mask_predictions.classifer."
TASK_HEAD_PREFIXES = ("pooler.", "classifier.", "proj.")  # proj: the entity-scoring head (ReCoRD)


def from_release(key):
    """A release key in our layout, or None for a key we do not load (ignored heads, tied legacy copies)."""
    if key.startswith(IGNORED_PREFIXES) or key.endswith("position_ids") or key in TIED_LEGACY:
        return None
    key = LEGACY_HEAD.get(key, key)
    if key.startswith(("embeddings.", "encoder.")):
        key = "deberta." + key
    return key


def from_release_state(state):
    """{our key: value} of a release's {key: value} (values of any kind: tensors, or references to them)."""
    return {ours: value for key, value in state.items() if (ours := from_release(key)) is not None}


def renamed_rtd_classifier(key):
    """A key of the RTD head with the old spelling of its classifier (`classifer`) in the published one; any
    other key as it is."""
    return key.replace(OLD_RTD_CLASSIFIER, RTD_CLASSIFIER, 1) if OLD_RTD_CLASSIFIER in key else key


def to_release(key, task):
    """A model's state-dict key as a release key: the base model's keys get the `deberta.` prefix."""
    return "deberta." + key if task == "base" else key


def to_model(key, task):
    """A release key (ours) as the model's state-dict key: to_release's inverse."""
    return key[len("deberta."):] if task == "base" else key


# ---------------------------------------------------------------- pipeline layer files
def pipeline_layer_keys(config):
    """{pipe layer index: {key inside that layer's state dict: release key}} for a model of `config`."""
    from model.encoder import Embeddings, Layer
    L = config.num_hidden_layers
    with torch.device("meta"):
        embedding_keys = list(Embeddings(config, word_table=False).state_dict())
        layer_keys = list(Layer(config).state_dict())
    maps = {0: {"weight": WORD_EMBEDDINGS}}
    tail = {f"embeddings.{k}": f"deberta.embeddings.{k}" for k in embedding_keys}
    tail.update({"rel_embeddings.weight": "deberta.encoder.rel_embeddings.weight",
                 "rel_LayerNorm.weight": "deberta.encoder.LayerNorm.weight",
                 "rel_LayerNorm.bias": "deberta.encoder.LayerNorm.bias"})
    maps[1] = tail
    for i in range(L):
        layer = {f"layer.{name}": f"deberta.encoder.layer.{i}.{name}" for name in layer_keys}
        if i == 0:
            layer.update({f"conv.{n}": f"deberta.encoder.conv.{n}" for n in
                          ("conv.weight", "conv.bias", "LayerNorm.weight", "LayerNorm.bias")})
        if i == L - 1:
            layer["position_embeddings.weight"] = POSITION_TABLE
            layer.update({n: f"lm_predictions.lm_head.{n}" for n in
                          ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias", "bias")})
        maps[2 + i] = layer
    maps[L + 2] = {"weight": WORD_EMBEDDINGS}  # the tied decoder: its file holds a copy of layer 0's
    return maps


def from_pipeline(pipe_key, maps):
    """A PipelineModule state-dict key ("tied_modules.word_embeddings.weight", "5.layer.output.dense.bias")
    -> its release key, or None for a key the layout does not have."""
    if pipe_key.startswith("tied_modules.word_embeddings."):
        return WORD_EMBEDDINGS
    index, _, inner = pipe_key.partition(".")
    return maps.get(int(index), {}).get(inner) if index.isdigit() else None
