"""The DeBERTa-v2 encoder, top to bottom: embeddings, the transformer layer, the nGiE convolution,
the stack of layers sharing one normalised relative-embedding table, and the base model.

Module and parameter names are transformers' (`embeddings.word_embeddings`, `encoder.layer.N.attention.
self.query_proj`, `encoder.rel_embeddings`, `encoder.LayerNorm`, `encoder.conv.conv`, ...), so a release
state dict loads with no key mapping.
"""
from typing import NamedTuple, Optional

import torch
from torch import nn

from model.attention import DisentangledSelfAttention, attention_mask_4d, relative_position_index
from model.layers import Embedding, Linear, activation


class Output(dict):
    """What every model returns: a dict with attribute access (like transformers' ModelOutput).
    A dict, not a dataclass, because ZeRO-3's module hooks look for tensors inside dicts and tuples.
    Fields: last_hidden_state, hidden_states, logits, loss, labels (MLM: the labels of the logits' rows);
    a field that a model does not compute reads None."""
    FIELDS = ("last_hidden_state", "hidden_states", "logits", "loss", "labels")

    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in Output.FIELDS:
            return None
        raise AttributeError(name)


class Embeddings(nn.Module):
    """word (+ absolute position if position_biased_input) (+ token type) -> embed_proj -> LN -> mask -> dropout.

    The absolute position table also exists when `position_table=True`: the Enhanced Mask Decoder
    adds it just before the MLM head, while v2 never adds it to the input. `word_table=False` leaves the
    word table out (pipeline mode keeps it in a layer of its own, tied to the decoder; a v3 discriminator
    sharing the generator's); forward then takes the word vectors as `inputs_embeds`. `word_std`: the word
    table's initialisation (0: zeros, a GDES discriminator's delta)."""

    def __init__(self, config, position_table=False, word_table=True, word_std=None):
        super().__init__()
        std = config.initializer_range
        if word_table:
            self.word_embeddings = Embedding(config.vocab_size, config.embed_size, config.pad_token_id,
                                             std=std if word_std is None else word_std)
        self.position_biased_input = config.position_biased_input
        if config.position_biased_input or position_table:
            self.position_embeddings = Embedding(config.max_position_embeddings, config.embed_size, std=std)
        if config.type_vocab_size > 0:
            self.token_type_embeddings = Embedding(config.type_vocab_size, config.embed_size, std=std)
        if config.embed_size != config.hidden_size:
            self.embed_proj = Linear(config.embed_size, config.hidden_size, bias=False, std=std)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, input_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                added_embeds=None):
        """added_embeds: vectors added to the word vectors (a v3 discriminator's shared generator rows, GDES)."""
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if added_embeds is not None:
            x = x + added_embeds
        if self.position_biased_input:
            if position_ids is None:
                position_ids = torch.arange(x.shape[1], device=x.device)[None]
            x = x + self.position_embeddings(position_ids)
        if hasattr(self, "token_type_embeddings"):
            if token_type_ids is None:
                token_type_ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            x = x + self.token_type_embeddings(token_type_ids)
        if hasattr(self, "embed_proj"):
            x = self.embed_proj(x)
        x = self.LayerNorm(x)  # SiFT perturbs the input of this LayerNorm (a forward pre-hook)
        if input_mask is not None:
            x = x * input_mask.unsqueeze(-1).to(x.dtype)
        return self.dropout(x)


class SelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): the post-LN residual block around attention and FFN."""

    def __init__(self, in_size, out_size, config):
        super().__init__()
        self.dense = Linear(in_size, out_size, std=config.initializer_range)
        self.LayerNorm = nn.LayerNorm(out_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = DisentangledSelfAttention(config)
        inner = config.num_attention_heads * config.head_size
        self.output = SelfOutput(inner, config.hidden_size, config)

    def forward(self, hidden_states, mask4d, rel_index, rel_embeddings, query_states=None):
        context = self.self(hidden_states, mask4d, rel_index, rel_embeddings, query_states)
        # the residual is the query input: the EMD's query, or the layer input
        return self.output(context, hidden_states if query_states is None else query_states)


class Intermediate(nn.Module):
    """The FFN's first projection and its activation: act(dense(x))."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size, std=config.initializer_range)
        self.act = activation(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class FeedForwardOutput(SelfOutput):
    """The FFN's second projection: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, config):
        super().__init__(config.intermediate_size, config.hidden_size, config)


class Layer(nn.Module):
    """One post-LN transformer block with disentangled attention."""

    def __init__(self, config):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = FeedForwardOutput(config)

    def forward(self, hidden_states, mask4d, rel_index, rel_embeddings, query_states=None):
        a = self.attention(hidden_states, mask4d, rel_index, rel_embeddings, query_states)
        return self.output(self.intermediate(a), a)


class ConvLayer(nn.Module):
    """nGiE: a 1-D convolution over the embedding output, added to layer 0's output (paper §A.1, spec §2.2)."""

    def __init__(self, config):
        super().__init__()
        k = config.conv_kernel_size
        self.conv = nn.Conv1d(config.hidden_size, config.hidden_size, k, padding=(k - 1) // 2, groups=config.conv_groups)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = activation(config.conv_act)

    def forward(self, embeddings, layer0_output, input_mask):
        return self.merge(self.convolve(embeddings), layer0_output, input_mask)

    def convolve(self, embeddings):
        """The convolution over the sequence [B, N, D] (the one step that reads neighbouring tokens)."""
        return self.conv(embeddings.transpose(1, 2)).transpose(1, 2)

    def merge(self, c, layer0_output, input_mask):
        """The convolution's output c added to layer 0's output, token by token."""
        c = c.masked_fill(~input_mask.bool().unsqueeze(-1), 0)
        c = self.act(self.dropout(c))
        return self.LayerNorm(layer0_output + c) * input_mask.unsqueeze(-1).to(c.dtype)


class AttentionInputs(NamedTuple):
    """What every layer of one forward shares: computed once per forward, not once per layer.
    A NamedTuple so that a runtime's module hooks (ZeRO-3's) see the tensors inside."""
    mask4d: Optional[torch.Tensor]  # bool [B, 1, N, N]; None: no padding, every pair allowed
    rel_index: Optional[torch.Tensor]  # long [N, N]
    rel_embeddings: Optional[torch.Tensor]  # [2k, D], normalised


def relative_table(embedding, layer_norm=None):
    """All rows of the relative-embedding table, read through the Embedding's own forward (so ZeRO-3
    gathers it there), layer-normalised when the config says so."""
    rows = embedding(torch.arange(embedding.num_embeddings, device=embedding.weight.device))
    return layer_norm(rows) if layer_norm is not None else rows


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        if config.relative_attention:
            self.rel_embeddings = Embedding(2 * config.att_span, config.hidden_size, std=config.initializer_range)
            if config.norm_rel_ebd == "layer_norm":
                self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.conv_kernel_size > 0:
            self.conv = ConvLayer(config)
        # Set from outside to recompute layers in backward (e.g. torch.utils.checkpoint.checkpoint or
        # a runtime's own checkpoint function); the model itself knows no parallelism.
        self.checkpoint_fn = None

    def relative_embeddings(self):
        """LN(rel_embeddings), once per forward and shared by all layers. The table is read through the
        Embedding's own forward, so under ZeRO-3 it is gathered once here instead of per layer."""
        return relative_table(self.rel_embeddings, getattr(self, "LayerNorm", None))

    def attention_inputs(self, input_mask, seq_len) -> AttentionInputs:
        if not self.config.relative_attention:
            return AttentionInputs(attention_mask_4d(input_mask), None, None)
        rel_index = relative_position_index(seq_len, seq_len, self.config, device=input_mask.device)
        return AttentionInputs(attention_mask_4d(input_mask), rel_index, self.relative_embeddings())

    def run_layer(self, layer, hidden, shared: AttentionInputs, query_states=None):
        args = (hidden, shared.mask4d, shared.rel_index, shared.rel_embeddings, query_states)
        if self.checkpoint_fn is not None and self.training:
            return self.checkpoint_fn(layer, *args)
        return layer(*args)

    def forward(self, embeddings, input_mask, shared: Optional[AttentionInputs] = None, num_layers=None):
        """Returns the list [embeddings, layer 0 output (+conv), ..., output of layer num_layers-1]."""
        shared = shared or self.attention_inputs(input_mask, embeddings.shape[1])
        states = [embeddings]
        for i, layer in enumerate(self.layer[:num_layers]):
            h = self.run_layer(layer, states[-1], shared)
            if i == 0 and hasattr(self, "conv"):
                h = self.conv(embeddings, h, input_mask)
            states.append(h)
        return states


def token_mask(input_ids, attention_mask, inputs_embeds=None):
    """The [B, N] token mask; a [B, N, N] pair mask gives a token mask of rows with any allowed key."""
    if attention_mask is None:
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        return torch.ones(shape, dtype=torch.long, device=device)
    if attention_mask.dim() == 3:
        return (attention_mask.sum(-2) > 0).long()
    return attention_mask.long()


class DebertaModel(nn.Module):
    """The encoder without a head: `last_hidden_state` [B, N, D]."""

    def __init__(self, config, position_table=False, word_table=True, word_std=None):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config, position_table=position_table, word_table=word_table, word_std=word_std)
        self.encoder = Encoder(config)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, output_hidden_states=False, num_layers=None, added_embeds=None):
        input_mask = token_mask(input_ids, attention_mask, inputs_embeds)
        emb = self.embeddings(input_ids, input_mask, token_type_ids, position_ids, inputs_embeds, added_embeds)
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 3 else input_mask
        shared = self.encoder.attention_inputs(mask, emb.shape[1])
        states = self.encoder(emb, input_mask, shared, num_layers=num_layers)
        return Output(last_hidden_state=states[-1], hidden_states=states if output_hidden_states else None)
