"""Task heads on the DeBERTa encoder: MLM with the Enhanced Mask Decoder, sequence classification /
regression, multiple choice, entity scoring (ReCoRD).

Enhanced Mask Decoder (paper §3.2 and A.8, spec §3): absolute positions enter only here, just before
the MLM softmax. With H = the input of the last encoder layer (the output of layer L-1) and Z the
absolute position table,

    q = Z[pos] + H
    q = last_layer(keys/values = H, query = q)      # twice: n = 2, the last layer's weights both times
    logits = LMHead(q) = LN(GELU(dense(q))) · word_embeddingsᵀ + bias

The usual output of the last layer is not needed for the MLM loss, so with the EMD on we run the
encoder up to layer L-1 only.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.encoder import AttentionInputs, DebertaModel, Output, token_mask
from model.layers import Linear, activation

IGNORE_INDEX = -100  # labels at positions that are not predicted (transformers' convention)


class LMHead(nn.Module):
    """`lm_predictions.lm_head`: dense -> act -> LayerNorm (the transform), then the tied word embeddings and a
    bias (the decoder)."""

    def __init__(self, config):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.embed_size, std=config.initializer_range)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.embed_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden, word_embeddings_weight):
        return self.decode(lm_transform(self, hidden), word_embeddings_weight)

    def decode(self, h, word_embeddings_weight):
        """The tied decoder: h · word_embeddingsᵀ + bias."""
        return decode_logits(h, word_embeddings_weight, self.bias)


def lm_transform(head, hidden):
    """LayerNorm(act(dense(hidden))) of a module with LMHead's dense, act and LayerNorm (pipeline mode's last
    stage has them under the same names)."""
    return head.LayerNorm(head.act(head.dense(hidden)))


def decode_logits(h, word_embeddings_weight, bias):
    """The tied decoder: h · word_embeddingsᵀ + bias."""
    return torch.matmul(h, word_embeddings_weight.t()) + bias


def mean_cross_entropy(logits, targets):
    """The MLM loss: mean cross-entropy over the rows of logits [M, V], computed in fp32."""
    return F.cross_entropy(logits.float(), targets)


class MLMPredictions(nn.Module):
    """Only a namespace, so that the keys read `lm_predictions.lm_head.*` as in the official checkpoints."""

    def __init__(self, config):
        super().__init__()
        self.lm_head = LMHead(config)


def masked_positions(labels):
    """Positions to predict, as flat indices into [B*N], and their labels."""
    flat = labels.reshape(-1)
    index = torch.nonzero(flat != IGNORE_INDEX, as_tuple=True)[0]
    return index, flat[index]


def enhanced_mask_decoder(run_last_layer, position_embeddings, hidden_prev, shared, position_ids, positions, steps):
    """The Enhanced Mask Decoder: query = Z[pos] + H, then `steps` times query = last_layer(H, query), with
    run_last_layer(hidden, attention inputs, query) running the last encoder layer and position_embeddings
    the absolute table Z. Returns [B, N, D], or with `positions` (flat indices into B*N) only those rows,
    [len(positions), D]. That is exact, not an approximation: keys and values come from hidden_prev, and
    each query row's output depends on its own query only."""
    B, N = hidden_prev.shape[:2]
    if position_ids is None:
        position_ids = torch.arange(N, device=hidden_prev.device)[None]
    if positions is None:
        query = position_embeddings(position_ids) + hidden_prev
        for _ in range(steps):
            query = run_last_layer(hidden_prev, shared, query)
        return query
    # The selected rows of each sequence, left-aligned and padded to the longest: rows [B, M]; slot is
    # each position's column there. Padding slots read row 0 and their outputs are dropped.
    batch_of, row_of = positions // N, positions % N
    counts = torch.bincount(batch_of, minlength=B)
    M = max(int(counts.max()), 1)
    slot = torch.arange(len(positions), device=positions.device) - (torch.cumsum(counts, 0) - counts)[batch_of]
    rows = torch.zeros(B, M, dtype=torch.long, device=positions.device)
    rows[batch_of, slot] = row_of
    batch = torch.arange(B, device=positions.device)[:, None]
    query = position_embeddings(position_ids.expand(B, N)[batch, rows]) + hidden_prev[batch, rows]
    rel_index = shared.rel_index
    selected = AttentionInputs(None if shared.mask4d is None else shared.mask4d[batch, 0, rows][:, None],  # [B, 1, M, N]
                               None if rel_index is None else rel_index[rows] if rel_index.dim() == 2
                               else rel_index[batch, rows],
                               shared.rel_embeddings)
    for _ in range(steps):
        query = run_last_layer(hidden_prev, selected, query)
    return query[batch_of, slot]


class DebertaForMaskedLM(nn.Module):
    """MLM pretraining model. `emd=True` (default) uses the Enhanced Mask Decoder as the official
    pretraining did; `emd=False` applies the head to the last layer as transformers' DebertaV2ForMaskedLM.

    With labels, logits are computed only at positions whose label is not -100 (the head and its
    [*, vocab] matmul are most of the cost otherwise) and returned flat: logits [M, V], labels [M];
    the EMD then also runs its query rows at those positions only (exact: see enhanced_mask_decoder)."""

    def __init__(self, config, emd=True, emd_steps=2):
        super().__init__()
        self.config = config
        # absolute positions already in the input make the EMD unnecessary (the official code skips it then)
        self.emd_steps = emd_steps if emd and not config.position_biased_input else 0
        self.deberta = DebertaModel(config, position_table=self.emd_steps > 0)
        self.lm_predictions = MLMPredictions(config)
        self.loss_function = mean_cross_entropy  # (logits [M, V], targets [M]) -> the mean loss

    def enhanced_mask_decoder(self, hidden_prev, shared, position_ids, positions=None):
        """The EMD's output [B, N, D]; with `positions` (flat indices into B*N, as masked_positions gives)
        only at those positions, [len(positions), D] (see the function enhanced_mask_decoder above)."""
        encoder = self.deberta.encoder
        last_layer = encoder.layer[-1]

        def run_last_layer(hidden, inputs, query):
            return encoder.run_layer(last_layer, hidden, inputs, query_states=query)
        return enhanced_mask_decoder(run_last_layer, self.deberta.embeddings.position_embeddings, hidden_prev, shared,
                                     position_ids, positions, self.emd_steps)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
               positions=None):
        """The hidden states the MLM head reads: the EMD output, or the last layer's output; [B, N, D],
        or [len(positions), D] at `positions` (flat indices into B*N) when given."""
        deberta = self.deberta
        input_mask = token_mask(input_ids, attention_mask, inputs_embeds)
        emb = deberta.embeddings(input_ids, input_mask, token_type_ids, position_ids, inputs_embeds)
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 3 else input_mask
        shared = deberta.encoder.attention_inputs(mask, emb.shape[1])
        if self.emd_steps == 0:
            hidden = deberta.encoder(emb, input_mask, shared)[-1]
            return hidden if positions is None else hidden.reshape(-1, hidden.shape[-1])[positions]
        num_layers = self.config.num_hidden_layers - 1
        hidden_prev = deberta.encoder(emb, input_mask, shared, num_layers=num_layers)[-1]
        return self.enhanced_mask_decoder(hidden_prev, shared, position_ids, positions)

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None):
        word_weight = self.deberta.embeddings.word_embeddings.weight
        head = self.lm_predictions.lm_head
        if labels is None:
            hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
            return Output(logits=head(hidden, word_weight))
        index, targets = masked_positions(labels)
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, positions=index)
        logits = head(hidden, word_weight)
        return Output(logits=logits, loss=self.loss_function(logits, targets), labels=targets)


class ContextPooler(nn.Module):
    """[CLS] -> dropout(pooler_dropout) -> dense -> act (transformers' and the official ContextPooler)."""

    def __init__(self, config):
        super().__init__()
        size = config.pooler_hidden_size or config.hidden_size
        self.dense = Linear(size, size, std=config.initializer_range)
        self.dropout = nn.Dropout(config.pooler_dropout)
        self.act = activation(config.pooler_hidden_act)

    def forward(self, hidden):
        return self.act(self.dense(self.dropout(hidden[:, 0])))


def classification_loss(logits, labels, num_labels):
    """MSE for one output (regression), cross-entropy on labels >= 0, soft-label CE for 2-D labels."""
    if num_labels == 1:
        return F.mse_loss(logits.view(-1).float(), labels.view(-1).float())
    if labels.dim() == 2 and labels.shape[-1] == num_labels:
        return -(F.log_softmax(logits.float(), -1) * labels).sum(-1).mean()
    labels = labels.view(-1).long()
    keep = labels >= 0
    if not keep.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[keep].float(), labels[keep])


class DebertaForSequenceClassification(nn.Module):
    def __init__(self, config, num_labels=2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.deberta = DebertaModel(config)
        self.pooler = ContextPooler(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = Linear(config.pooler_hidden_size or config.hidden_size, num_labels,
                                 std=config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None):
        hidden = self.deberta(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds).last_hidden_state
        logits = self.classifier(self.dropout(self.pooler(hidden)))
        loss = None if labels is None else classification_loss(logits, labels, self.num_labels)
        return Output(logits=logits, loss=loss, last_hidden_state=hidden)


class DebertaForMultipleChoice(nn.Module):
    """input_ids [B, C, N]: each choice encoded separately, one score each, softmax over the C choices."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config)
        self.pooler = ContextPooler(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = Linear(config.pooler_hidden_size or config.hidden_size, 1, std=config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, position_ids=None):
        num_choices = input_ids.shape[1]
        flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
        hidden = self.deberta(flat(input_ids), flat(attention_mask), flat(token_type_ids), flat(position_ids)).last_hidden_state
        logits = self.classifier(self.dropout(self.pooler(hidden))).view(-1, num_choices)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.view(-1).long())
        return Output(logits=logits, loss=loss)


def pool_entities(hidden, entity_tokens):
    """Each entity's state, pooled over its tokens by attention with the [CLS] state as the query (the
    official ReCoRD head): w_s = softmax_s(h_s · h_[CLS] / √D) over the entity's token positions s, then
    Σ_s w_s h_s. hidden [B, N, D]; entity_tokens [B, E, S] positions, 0 = padding ([CLS] is never an
    entity token). Returns [B, E, D] and the mask of real positions [B, E, S]."""
    real = entity_tokens > 0
    batch = torch.arange(hidden.shape[0], device=hidden.device)[:, None, None]
    states = hidden[batch, entity_tokens]                                           # [B, E, S, D]
    affinity = torch.einsum("bnd,bd->bn", hidden, hidden[:, 0]) / hidden.shape[-1] ** 0.5
    scores = affinity[batch, entity_tokens].masked_fill(~real, -10000.0)           # [B, E, S]
    weights = torch.softmax(scores.float(), dim=-1).to(hidden.dtype)
    return torch.einsum("bes,besd->bed", weights, states), real


def entity_loss(logits, labels, present):
    """Binary cross-entropy per entity, over the entities that are there and labelled (labels >= 0)."""
    keep = present & (labels >= 0)
    if not keep.any():
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[keep].float(), labels[keep].float())


class DebertaForEntityScoring(nn.Module):
    """ReCoRD (official `ReCoRDQAModel`): one pass over [CLS] passage [SEP] query [SEP], one logit per
    candidate entity: pool_entities, then proj (D -> D), GELU, dropout, classifier (D -> 1).

    entity_tokens [B, E, S]: the token positions of each candidate's mentions (0 = padding); logits [B, E],
    -10000 where an entity row is padding; labels [B, E] with 1 / 0 per entity, < 0 to ignore."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.deberta = DebertaModel(config)
        self.proj = Linear(config.hidden_size, config.hidden_size, std=config.initializer_range)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = Linear(config.hidden_size, 1, std=config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, entity_tokens=None, labels=None, token_type_ids=None,
                position_ids=None):
        hidden = self.deberta(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state
        pooled, real = pool_entities(hidden, entity_tokens)
        logits = self.classifier(self.dropout(self.act(self.proj(pooled)))).squeeze(-1).float()
        present = real.any(-1)
        logits = logits.masked_fill(~present, -10000.0)
        loss = None if labels is None else entity_loss(logits, labels, present)
        return Output(logits=logits, loss=loss)
