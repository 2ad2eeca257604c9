"""Pipeline mode: the same DeBERTa blocks as a `deepspeed.pipe.PipelineModule`.

The sequence of layers (one LayerSpec per DeBERTa layer):

    0        TiedLayerSpec "word_embeddings": token ids -> word vectors
    1        EmbeddingTail: (+positions/types) -> embed_proj -> LayerNorm -> mask -> dropout, and the
             normalised relative-embedding table P (computed once, then carried to every stage)
    2        FirstBlock: encoder layer 0 and the nGiE convolution (which reads the embedding output)
    3..L     Block: encoder layers 1 .. L-2
    L+1      LastBlock: encoder layer L-1 run as the Enhanced Mask Decoder (twice, query = absolute
             positions + its input) and the LM head's dense/LayerNorm, at the masked positions only
    L+2      TiedLayerSpec "word_embeddings": the tied decoder, logits = h · Wᵀ + bias

Only tensors cross stage boundaries: (hidden, mask, labels, P), and the embedding output until the
conv (after layer 0) has read it. P's gradient flows back
through the pipe like any activation, so the relative table needs no tie; the word embedding is used
on the first and the last stage and is tied (DeepSpeed all-reduces its gradient between them).
Partitioning balances the encoder blocks ("type:Block"): the embedding and head layers ride along.

DeepSpeed's pipeline engine refuses ZeRO-2/3: this mode runs with ZeRO-0/1 (see run_config.py).
"""
import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from model.attention import attention_mask_4d, relative_position_index
from model.encoder import ConvLayer, Embeddings, Layer, activation, relative_table
from model.heads import IGNORE_INDEX
from model.init import Embedding, Linear


class WordEmbedding(nn.Module):
    """The word table, used at the input (lookup) and at the output (tied decoder)."""

    def __init__(self, config):
        super().__init__()
        self.weight = Embedding(config.vocab_size, config.embed_size, config.pad_token_id,
                                std=config.initializer_range).weight
        self.padding_idx = config.pad_token_id

    def forward(self, inputs):
        """One module at both ends of the pipe, with no forward_fn: DeepSpeed then saves it in the layer files
        (layer_00 and the last layer's); a TiedLayerSpec with a forward_fn is a plain function to its
        save_state_dict and the word table would be in no layer file. Token ids come in at the input,
        float hidden states at the output."""
        if inputs[0].is_floating_point():
            return decode_forward(self, inputs)
        return embed_forward(self, inputs)


def embed_forward(module, inputs):
    input_ids, attention_mask, labels = inputs
    vectors = F.embedding(input_ids, module.weight, module.padding_idx)
    return vectors, attention_mask, labels


def decode_forward(module, inputs):
    hidden, targets, bias = inputs
    return torch.matmul(hidden, module.weight.t()) + bias, targets


class EmbeddingTail(nn.Module):
    """The model's own Embeddings after the word lookup (the word table is layer 0), plus the shared
    normalised relative table."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = Embeddings(config, word_table=False)
        if config.relative_attention:
            self.rel_embeddings = Embedding(2 * config.att_span, config.hidden_size, std=config.initializer_range)
            if config.norm_rel_ebd == "layer_norm":
                self.rel_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inputs):
        vectors, attention_mask, labels = inputs
        x = self.embeddings(input_mask=attention_mask, inputs_embeds=vectors)
        if hasattr(self, "rel_embeddings"):
            rel = relative_table(self.rel_embeddings, getattr(self, "rel_LayerNorm", None))
        else:
            # a placeholder (only tensors travel between stages); integer, so no gradient is expected for it
            rel = torch.zeros(1, dtype=torch.long, device=x.device)
        return x, x, attention_mask, labels, rel


class Block(nn.Module):
    """One encoder layer; the attention mask and relative indices are rebuilt from the token mask on
    each stage (cheap) instead of being sent."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = Layer(config)

    def attention_inputs(self, attention_mask, rel):
        n = attention_mask.shape[1]
        rel_index = relative_position_index(n, n, self.config, attention_mask.device) \
            if self.config.relative_attention else None
        return attention_mask_4d(attention_mask), rel_index, rel if self.config.relative_attention else None

    def forward(self, inputs):
        hidden, attention_mask, labels, rel = inputs
        mask4d, rel_index, rel_emb = self.attention_inputs(attention_mask, rel)
        return self.layer(hidden, mask4d, rel_index, rel_emb), attention_mask, labels, rel


class FirstBlock(Block):
    def __init__(self, config):
        super().__init__(config)
        if config.conv_kernel_size > 0:
            self.conv = ConvLayer(config)

    def forward(self, inputs):
        """(embeddings, embeddings, mask, labels, P) -> (hidden, mask, labels, P): the conv is the last reader
        of the embedding output, so it stops travelling here (DeepSpeed expects a gradient for every
        floating tensor a stage receives)."""
        embeddings, _, attention_mask, labels, rel = inputs
        hidden, attention_mask, labels, rel = super().forward((embeddings, attention_mask, labels, rel))
        if hasattr(self, "conv"):
            hidden = self.conv(embeddings, hidden, attention_mask)
        return hidden, attention_mask, labels, rel


class LastBlock(Block):
    """The last encoder layer as the Enhanced Mask Decoder, then the LM head's transform, at the
    masked positions only. Outputs (transformed hidden [M, E], targets [M], decoder bias)."""

    def __init__(self, config, emd_steps=2):
        super().__init__(config)
        std = config.initializer_range
        self.emd_steps = emd_steps if not config.position_biased_input else 0
        if self.emd_steps:
            self.position_embeddings = Embedding(config.max_position_embeddings, config.embed_size, std=std)
        self.dense = Linear(config.hidden_size, config.embed_size, std=std)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.embed_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, inputs):
        hidden, attention_mask, labels, rel = inputs
        mask4d, rel_index, rel_emb = self.attention_inputs(attention_mask, rel)
        if self.emd_steps:
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            query = self.position_embeddings(positions)[None] + hidden
            for _ in range(self.emd_steps):
                query = self.layer(hidden, mask4d, rel_index, rel_emb, query_states=query)
        else:
            query = self.layer(hidden, mask4d, rel_index, rel_emb)
        flat_labels = labels.reshape(-1)
        index = torch.nonzero(flat_labels != IGNORE_INDEX, as_tuple=True)[0]
        selected = query.reshape(-1, query.shape[-1])[index]
        return self.LayerNorm(self.act(self.dense(selected))), flat_labels[index], self.bias


def mlm_loss(outputs, _labels):
    logits, targets = outputs
    return F.cross_entropy(logits.float(), targets)


def build_pipeline_module(config, num_stages, emd=True, activation_checkpointing=False, seed=None):
    if config.num_hidden_layers < 2:
        raise ValueError("pipeline mode needs at least 2 encoder layers (the first carries the conv, the last the EMD)")
    specs = [TiedLayerSpec("word_embeddings", WordEmbedding, config, tied_weight_attr=["weight"]),
             LayerSpec(EmbeddingTail, config),
             LayerSpec(FirstBlock, config)]
    specs += [LayerSpec(Block, config) for _ in range(config.num_hidden_layers - 2)]
    specs += [LayerSpec(LastBlock, config, emd_steps=2 if emd else 0),
              TiedLayerSpec("word_embeddings", WordEmbedding, config, tied_weight_attr=["weight"])]
    return PipelineModule(layers=specs, num_stages=num_stages, loss_fn=mlm_loss,
                          partition_method="type:Block",
                          activation_checkpoint_interval=1 if activation_checkpointing else 0,
                          checkpointable_layers=["Block", "FirstBlock", "LastBlock"],
                          seed_layers=True, seed_fn=seed_layer, base_seed=seed if seed is not None else 1234)


def seed_layer(seed):
    """Each layer is built from seed base+index, so every partitioning builds the same weights. (DeepSpeed's
    own seeding passes a numpy integer to random.seed, which Python 3.11 refuses.)"""
    from deepspeed.runtime.utils import set_random_seed
    set_random_seed(int(seed))


# ------------------------------------------------------------ release keys of each pipe layer
def layer_key_map(config):
    """{pipe layer index: {key inside that layer's state dict: release key}}: how a pipeline checkpoint's
    `layer_XX-model_states.pt` files map onto the release layout (used by the converter)."""
    L = config.num_hidden_layers
    maps = {0: {"weight": "deberta.embeddings.word_embeddings.weight"}}
    with torch.device("meta"):
        embedding_keys = Embeddings(config, word_table=False).state_dict().keys()
    tail = {f"embeddings.{k}": f"deberta.embeddings.{k}" for k in embedding_keys}
    tail.update({"rel_embeddings.weight": "deberta.encoder.rel_embeddings.weight",
                 "rel_LayerNorm.weight": "deberta.encoder.LayerNorm.weight",
                 "rel_LayerNorm.bias": "deberta.encoder.LayerNorm.bias"})
    maps[1] = tail
    for i in range(L):
        layer = {f"layer.{name}": f"deberta.encoder.layer.{i}.{name}" for name in _layer_param_names(config)}
        if i == 0:
            layer.update({f"conv.{n}": f"deberta.encoder.conv.{n}" for n in
                          ("conv.weight", "conv.bias", "LayerNorm.weight", "LayerNorm.bias")})
        if i == L - 1:
            layer.update({"position_embeddings.weight": "deberta.embeddings.position_embeddings.weight",
                          "dense.weight": "lm_predictions.lm_head.dense.weight",
                          "dense.bias": "lm_predictions.lm_head.dense.bias",
                          "LayerNorm.weight": "lm_predictions.lm_head.LayerNorm.weight",
                          "LayerNorm.bias": "lm_predictions.lm_head.LayerNorm.bias",
                          "bias": "lm_predictions.lm_head.bias"})
        maps[2 + i] = layer
    # the tied decoder: the same tensor as layer 0's (its file holds a copy; the converter checks they agree)
    maps[L + 2] = {"weight": "deberta.embeddings.word_embeddings.weight"}
    return maps


def _layer_param_names(config):
    with torch.device("meta"):
        return list(Layer(config).state_dict().keys())


def release_key(pipe_key, config, maps=None):
    """A PipelineModule state-dict key ("tied_modules.word_embeddings.weight", "5.layer.output.dense.bias")
    -> its release key, or None for a duplicate (the tied decoder)."""
    maps = maps or layer_key_map(config)
    if pipe_key.startswith("tied_modules.word_embeddings."):
        return "deberta.embeddings.word_embeddings.weight"
    index, _, inner = pipe_key.partition(".")
    return maps[int(index)].get(inner)


def load_release_into_pipe(module, path, config):
    """Copy a release's weights into this stage's layers: each stage reads only the tensors it holds, one
    at a time (the release's headers give the keys and shapes)."""
    from model.release import check_legacy_tie, index_tensors, materialise, normalise_keys
    refs = index_tensors(path)
    state = normalise_keys(refs, source=path, check_tie=False)
    check_legacy_tie(refs.get("cls.predictions.decoder.weight"),
                     state.get("deberta.embeddings.word_embeddings.weight"), path)
    maps = layer_key_map(config)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            name = release_key(key, config, maps)
            if name is None:
                continue
            if name not in state:
                raise ValueError(f"{path}: release lacks {name} (pipeline layer key {key})")
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)} in the release but "
                                 f"{tuple(tensor.shape)} in the model")
            tensor.copy_(materialise(state[name]).to(tensor.dtype))


def pipeline_batches(batches):
    """The pipeline engine's micro-batch format: (inputs for the first stage, labels for the loss). The
    labels also travel inside the inputs: the last block selects the masked positions with them."""
    for batch in batches:
        yield (batch["input_ids"], batch["attention_mask"], batch["labels"]), batch["labels"]
