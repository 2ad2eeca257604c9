"""DeBERTa-v3 pretraining: replaced token detection (RTD) with gradient-disentangled embedding sharing (GDES)
(DeBERTaV3, He, Gao and Chen 2023; the official DeBERTa/apps/tasks/rtd_task.py and
models/replaced_token_detection_model.py; spec §11).

A generator G (the MLM model with its Enhanced Mask Decoder, as deep as a fraction of the discriminator)
predicts the masked tokens; one token per masked position is sampled from softmax(logits) with no gradient
through the sampling; the discriminator D (the encoder with the RTD head) tells, for every valid token of the
corrupted sequence, whether it was replaced:

    L = L_MLM(G) + rtd_lambda · mean over valid tokens of BCE(D(corrupted)_i, replaced_i)
    replaced_i = position i was masked and the sampled token differs from the original
                 (a sample equal to the original counts as original)

Embedding sharing (D's word vectors E_D):
    gdes  E_D = sg(E_G) + E_Δ: E_Δ is D's own table, initialised to zeros; E_G gets gradient from the MLM loss
          only (the stop-gradient), E_Δ from the RTD loss only. The released discriminator's table is E_G + E_Δ.
    es    E_D = E_G: one table, both losses update it
    none  D has a table of its own
D has no absolute position table (v3 configs have no absolute positions in the input, and D no EMD).

RTDModel.forward computes both losses in one forward, for one backward and one step (joint training, the
official `decoupled_training=False` step: pipeline/train/rtd.py). Its pieces (corrupt, generator_values,
discriminator_values) serve decoupled training too, where G and D are trained by engines of their own
(pipeline/train/rtd_decoupled.py).
"""
import collections

import torch
import torch.nn.functional as F
from torch import nn

from model import state_dict_adapter as keys
from model.encoder import DebertaModel, Output
from model.heads import DebertaForMaskedLM, masked_positions
from model.layers import Linear, activation

SHARING = ("gdes", "es", "none")


class RTDHead(nn.Module):
    """`mask_predictions`: s_i = LayerNorm(h_[CLS] + h_i), then dense, activation and a classifier to one logit
    per token. The keys are those of the published v3 checkpoints (`mask_predictions.{dense,LayerNorm,
    classifier}.*`, the official LMMaskPredictionHead's); releases written with the misspelt `classifer` of an
    earlier official revision still load (pipeline/release/rtd.py)."""

    def __init__(self, config):
        super().__init__()
        std = config.initializer_range
        self.dense = Linear(config.hidden_size, config.hidden_size, std=std)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = Linear(config.hidden_size, 1, std=std)
        # a state dict saved before the rename (a training checkpoint, a release) loads as it is
        self.register_load_state_dict_pre_hook(rename_old_classifier)

    def forward(self, hidden):
        states = self.LayerNorm(hidden[:, :1] + hidden)
        return self.classifier(self.act(self.dense(states))).squeeze(-1)  # [B, N]


def rename_old_classifier(module, state_dict, prefix, *_):
    """load_state_dict's pre-hook of RTDHead (`mask_predictions`): its classifier's old key read as the new one."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if (new := keys.renamed_rtd_classifier(key)) != key:
            state_dict[new] = state_dict.pop(key)


def rtd_loss(logits, labels, attention_mask):
    """Mean binary cross-entropy over the valid (non-padding) tokens, in fp32."""
    valid = attention_mask.reshape(-1).bool()
    return F.binary_cross_entropy_with_logits(logits.reshape(-1)[valid].float(), labels.reshape(-1)[valid].float())


class DebertaForRTD(nn.Module):
    """The discriminator: the encoder with the RTD head. `sharing` shapes its word table (module docstring):
    gdes keeps a zero-initialised delta there and adds the generator's rows (`shared_rows`) to it; es has no
    table and reads the generator's rows as its word vectors; none has its own table."""

    def __init__(self, config, sharing="gdes"):
        super().__init__()
        if sharing not in SHARING:
            raise ValueError(f"embedding sharing {sharing!r} is not one of {SHARING}")
        self.config, self.sharing = config, sharing
        self.deberta = DebertaModel(config, word_table=sharing != "es", word_std=0.0 if sharing == "gdes" else None)
        self.mask_predictions = RTDHead(config)

    def forward(self, input_ids=None, attention_mask=None, labels=None, shared_rows=None):
        """shared_rows [B, N, E]: the generator's word vectors of input_ids (detached for gdes), for gdes and es."""
        if self.sharing == "es":
            hidden = self.deberta(input_ids, attention_mask, inputs_embeds=shared_rows).last_hidden_state
        else:
            hidden = self.deberta(input_ids, attention_mask, added_embeds=shared_rows).last_hidden_state
        logits = self.mask_predictions(hidden)
        if labels is None:
            return Output(logits=logits)
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return Output(logits=logits, loss=rtd_loss(logits, labels, mask), labels=labels)


def replace_masked(input_ids, index, targets, sampled):
    """(corrupted ids, replaced labels): the sampled tokens at the masked positions (flat `index` into B*N,
    original tokens `targets` there), and 1 where a sample differs from the original."""
    corrupted = input_ids.reshape(-1).clone()
    corrupted[index] = sampled
    replaced = torch.zeros_like(corrupted)
    replaced[index] = (sampled != targets).long()
    return corrupted.view_as(input_ids), replaced.view_as(input_ids)


def sample_tokens(logits, generator=None, rows_of=None, seeds=None):
    """One token per row of logits [M, V] from softmax(logits) (temperature 1), without gradient. With `seeds`
    (one per sequence) and `rows_of` (each row's sequence), each sequence's draws come from a generator of its
    own seed: they do not depend on how sequences are split into micro-batches or ranks."""
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=-1)
        if seeds is None:
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        sampled = torch.empty(len(probs), dtype=torch.long, device=probs.device)
        own = torch.Generator(device=probs.device)
        for sequence, seed in enumerate(seeds.tolist()):
            rows = (rows_of == sequence).nonzero(as_tuple=True)[0]
            if len(rows):
                own.manual_seed(seed)
                sampled[rows] = torch.multinomial(probs[rows], 1, generator=own).squeeze(-1)
        return sampled


Corruption = collections.namedtuple("Corruption", "ids replaced sampled targets")


def corrupt(input_ids, labels, logits, sampled=None, sample_seeds=None, sample_generator=None):
    """The discriminator's input from the generator's logits at the masked positions (`labels` not ignored):
    Corruption(ids with a token sampled at each masked position, replaced labels, the samples, the original
    tokens there). `sampled` given: those tokens; else drawn as sample_tokens does."""
    index, targets = masked_positions(labels)
    if sampled is None:
        sampled = sample_tokens(logits, sample_generator, index // input_ids.shape[1], sample_seeds)
    corrupted, replaced = replace_masked(input_ids, index, targets, sampled)
    return Corruption(corrupted, replaced, sampled, targets)


def generator_values(generated, corruption):
    """The generator's logged numbers (no gradient): its MLM loss and accuracy, and the share of its samples
    that are the original token."""
    with torch.no_grad():
        return {"mlm_loss": generated.loss.detach(),
                "mlm_accuracy": (generated.logits.argmax(-1) == corruption.targets).float().mean(),
                "generator_correct": (corruption.sampled == corruption.targets).float().mean()}


def discriminator_values(judged, corruption, mask):
    """The discriminator's logged numbers over the valid tokens (no gradient): its loss, its accuracy and the
    share of replaced tokens (the accuracy of always answering "original" is 1 minus that share)."""
    with torch.no_grad():
        valid = mask.bool()
        return {"rtd_loss": judged.loss.detach(),
                "rtd_accuracy": ((judged.logits > 0).long() == corruption.replaced)[valid].float().mean(),
                "replaced_rate": corruption.replaced[valid].float().mean()}


class RTDModel(nn.Module):
    """Generator and discriminator as one module (module docstring); forward on an MLM batch (input_ids with
    [MASK], labels = the original tokens at the masked positions) returns the total loss and the numbers a run
    logs: mlm_loss, mlm_accuracy, rtd_loss, rtd_accuracy, replaced_rate (of the valid tokens) and
    generator_correct (the share of masked positions whose sample is the original)."""

    def __init__(self, config, generator_config, sharing="gdes", rtd_lambda=10.0, emd=True):
        super().__init__()
        self.sharing, self.rtd_lambda = sharing, float(rtd_lambda)
        self.config, self.generator_config = config, generator_config
        self.generator = DebertaForMaskedLM(generator_config, emd=emd)
        self.discriminator = DebertaForRTD(config, sharing)

    def shared_rows(self, input_ids):
        """The generator's word vectors of input_ids for the discriminator: read through the generator's own
        embedding module (so that ZeRO-3 gathers its table there), detached for gdes; None for none."""
        if self.sharing == "none":
            return None
        rows = self.generator.deberta.embeddings.word_embeddings(input_ids)
        return rows.detach() if self.sharing == "gdes" else rows

    def forward(self, input_ids=None, attention_mask=None, labels=None, sampled=None, sample_seeds=None,
                sample_generator=None):
        """sampled: the tokens to put at the masked positions; else drawn from the generator's softmax, per
        sequence from `sample_seeds` [B] when given (the loader's: a function of the sample), else from
        sample_generator or torch's default generator."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        generated = self.generator(input_ids=input_ids, attention_mask=mask, labels=labels)
        corruption = self.corrupt(input_ids, labels, generated.logits, sampled, sample_seeds, sample_generator)
        judged = self.discriminator(corruption.ids, mask, corruption.replaced, self.shared_rows(corruption.ids))
        loss = generated.loss + self.rtd_lambda * judged.loss
        values = dict(generator_values(generated, corruption), **discriminator_values(judged, corruption, mask))
        return Output(loss=loss, logits=generated.logits, labels=corruption.targets, rtd_logits=judged.logits,
                      corrupted=corruption.ids, replaced=corruption.replaced, **values)

    def corrupt(self, input_ids, labels, logits, sampled=None, sample_seeds=None, sample_generator=None):
        """The discriminator's input: `corrupt` of this module (a method, so that a runtime that splits a
        sequence over ranks can make every rank's copy the same)."""
        return corrupt(input_ids, labels, logits, sampled, sample_seeds, sample_generator)

    def discriminator_word_table(self):
        """The table the discriminator reads, as the release holds it: E_G + E_Δ (gdes), E_G (es), its own (none)."""
        own = self.discriminator.deberta.embeddings
        shared = self.generator.deberta.embeddings.word_embeddings.weight
        if self.sharing == "es":
            return shared
        if self.sharing == "gdes":
            return shared + own.word_embeddings.weight
        return own.word_embeddings.weight


def generator_config_of(config, layers=0):
    """The generator of a discriminator config: the same width, `layers` deep (0: half the discriminator)."""
    depth = layers or max(config.num_hidden_layers // 2, 1)
    if depth > config.num_hidden_layers:
        raise ValueError(f"generator of {depth} layers is deeper than the discriminator's {config.num_hidden_layers}")
    return config.replace(num_hidden_layers=depth)
