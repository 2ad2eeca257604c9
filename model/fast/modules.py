"""The fast modules that convert.py swaps in, each a subclass of a plain module of model/ with the same
parameters and keys, computing the same function of its inputs with less memory or time:

  FastAttention            DisentangledSelfAttention with q, k, v from one matmul (fuse_qkv) and an attention
                           path of attention_paths.py (eager, sdpa, fused, blockwise) in place of math_attention
  AutocastKeepLinear       a Linear that under autocast keeps its weight, not the weight's low-precision copy,
                           for backward (memory.py AutocastLinear)
  ActivatedLinear          the FFN's output Linear applied to act(x), the activation recomputed in backward
                           (memory.py ActivationThenLinear); with PreActivationIntermediate, whose output is
                           the FFN's first projection before its activation
  CheapDropout             nn.Dropout with masks that are cheaper to draw and apply (dropout.py)
  FastLMHead               the MLM head whose tied decoder keeps no autocast copy of the word table

They are never constructed: convert.py changes the class of an existing module (as torch.nn.utils.parametrize
does), so its Parameter objects, and any hook or attribute set on it, stay as they are.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.attention import DisentangledSelfAttention
from model.encoder import Intermediate
from model.fast.dropout import dropout_keep_mask
from model.fast.memory import ActivationThenLinear, autocast_linear, decode_logits
from model.heads import LMHead
from model.layers import Linear


class FastAttention(DisentangledSelfAttention):
    """Set by convert.py: `path` (attention_paths.py's function of (module, q, k, v, mask4d, rel_index,
    rel_embeddings), or math_attention) and `fuse_qkv`."""

    @property
    def dropout_p(self):
        """The attention probabilities' dropout, which each path draws itself."""
        return self.dropout.p

    def project(self, hidden_states, query_states):
        """q, k, v as [B, H, N, d]; with fuse_qkv one matmul on the concatenated weights where the inputs are
        shared (the parameters stay three modules, as the release format names them). That reads each weight
        outside its own module's forward: not for parameters gathered per module (ZeRO-3), fuse_qkv=False."""
        if not self.fuse_qkv:
            return super().project(hidden_states, query_states)
        projs = (self.query_proj, self.key_proj, self.value_proj)
        fused = projs if query_states is None else projs[1:]
        out = F.linear(hidden_states, torch.cat([p.weight for p in fused]), torch.cat([p.bias for p in fused]))
        parts = [self.heads(t) for t in out.chunk(len(fused), dim=-1)]
        if query_states is not None:
            parts.insert(0, self.heads(self.query_proj(query_states)))
        return tuple(parts)

    def attend(self, q, k, v, mask4d, rel_index, rel_embeddings):
        return self.path(self, q, k, v, mask4d, rel_index, rel_embeddings)


class AutocastKeepLinear(Linear):
    """Linear whose autocast forward keeps the weight itself for backward (memory.py AutocastLinear); without
    autocast, nn.Linear's forward."""

    def forward(self, x):
        return autocast_linear(x, self.weight, self.bias)


class ActivatedLinear(Linear):
    """A Linear applied to act(x), with the activation recomputed in backward (ActivationThenLinear). Set by
    convert.py: `act_fn`, the activation's function (the FFN intermediate's activation module's forward, called
    directly: a module's hooks would run inside backward). The parameters are the Linear's own (the same keys),
    and it stays a module of its own, so a runtime that gathers parameters per module gathers them around its
    forward and backward as for any Linear."""

    def forward(self, pre):
        return ActivationThenLinear.apply(pre, self.weight, self.bias, self.act_fn)


class PreActivationIntermediate(Intermediate):
    """The FFN's first projection without its activation, which the FFN output's ActivatedLinear applies."""

    def forward(self, x):
        return self.dense(x)


class CheapDropout(nn.Dropout):
    """nn.Dropout (same module, same isinstance) with a cheaper mask (dropout.py); keeps the bool mask for
    backward, as nn.Dropout does."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.p >= 1 or self.inplace:
            return super().forward(x)
        keep, scale = dropout_keep_mask(x.shape, self.p, x.device)
        return torch.mul(x, keep).mul_(scale)


class FastLMHead(LMHead):
    """The MLM head whose tied decoder keeps, under autocast, the word table itself for backward rather than
    its low-precision copy (memory.py decode_logits)."""

    def decode(self, h, word_embeddings_weight):
        return decode_logits(h, word_embeddings_weight, self.bias)
