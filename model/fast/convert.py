"""The model converter: applies the fast pieces of model/fast/ to a plain model of model/, from outside, as
torchtitan's model converters do. Every place that builds a model to train or run calls `apply` once, after
building it and before any runtime wraps it.

Each swap changes the class of an existing module to a fast subclass (modules.py), the way
torch.nn.utils.parametrize does: the module objects stay, and with them their Parameter objects (never
copied: a model built partitioned, as under ZeRO-3, is partitioned already when this runs), their hooks and
any attribute a runtime set on them. The state-dict keys do not change, and neither does any function of the
inputs: each fast piece is tested against the plain module it replaces.

What a caller chooses (all on by default):
  attention_impl        model/config.py ATTENTION_IMPLS: "math" keeps the formula (model/attention.py);
                        "eager", "sdpa", "fused", "blockwise", "auto" (sdpa where CUDA is; on the CPU eager for
                        short sequences, blockwise for long ones): attention_paths.py
  fuse_qkv              q, k and v from one matmul on the concatenated weights
  autocast_linear       Linears and the tied MLM decoder keep their fp32 weight, not its autocast copy, for backward
  recompute_activation  the FFN's activation recomputed in backward instead of kept
  cheap_dropout         dropout masks drawn as 16-bit integers (the attention probabilities' dropout belongs to
                        the attention path: math keeps nn.Dropout there)
  float_cross_entropy   the MLM loss in fp32 without [M, V] fp32 copies of the logits
fuse_qkv and autocast_linear read a weight outside its own module's forward, or keep it past it: pass False
for both where parameters are gathered around each module's forward and freed after it (ZeRO-3).
"""
from torch import nn

from model.attention import DisentangledSelfAttention, math_attention
from model.config import ATTENTION_ALIASES, ATTENTION_IMPLS
from model.encoder import Intermediate, Layer
from model.fast import modules as fast
from model.fast.attention_paths import fast_path
from model.fast.memory import float_cross_entropy as fp32_cross_entropy
from model.heads import DebertaForMaskedLM, LMHead
from model.layers import Linear


def apply(model: nn.Module, attention_impl="auto", *, fuse_qkv=True, autocast_linear=True,
          recompute_activation=True, cheap_dropout=True, float_cross_entropy=True) -> nn.Module:
    """Swap the fast pieces into `model` (in place; returned for convenience). See the module docstring."""
    attention_impl = ATTENTION_ALIASES.get(attention_impl, attention_impl)
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {attention_impl!r} is not one of {ATTENTION_IMPLS}")
    modules = list(model.modules())
    attentions = [m for m in modules if isinstance(m, DisentangledSelfAttention)]
    # before the Linear swap: the FFN output's Linear becomes an ActivatedLinear, not an AutocastKeepLinear
    if recompute_activation:
        for layer in (m for m in modules if isinstance(m, Layer)):
            recompute_ffn_activation(layer)
    if attention_impl != "math" or fuse_qkv:
        for attention in attentions:
            convert_attention(attention, attention_impl, fuse_qkv)
    if autocast_linear:
        swap_exact(modules, Linear, fast.AutocastKeepLinear)
        swap_exact(modules, LMHead, fast.FastLMHead)
    if cheap_dropout:
        probabilities = {id(attention.dropout) for attention in attentions}
        swap_exact([m for m in modules if id(m) not in probabilities], nn.Dropout, fast.CheapDropout)
    if float_cross_entropy:
        for mlm in (m for m in modules if isinstance(m, DebertaForMaskedLM)):
            mlm.loss_function = fp32_cross_entropy
    return model


def swap_class(module: nn.Module, fast_class: type) -> None:
    """Make `module` an instance of `fast_class`, a subclass of its class: the same object, parameters,
    buffers, hooks and attributes; only its methods change."""
    if not issubclass(fast_class, type(module)):
        raise TypeError(f"{fast_class.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = fast_class


def swap_exact(modules, plain_class, fast_class):
    """Swap every module whose class is exactly `plain_class` (a subclass may compute something else)."""
    for module in modules:
        if type(module) is plain_class:
            swap_class(module, fast_class)


def convert_attention(attention, attention_impl, fuse_qkv):
    swap_class(attention, fast.FastAttention)
    attention.path = math_attention if attention_impl == "math" else fast_path(attention_impl)
    attention.fuse_qkv = fuse_qkv


def recompute_ffn_activation(layer):
    """act(dense(x)) of the intermediate moves into the FFN output's Linear (ActivatedLinear), which keeps only
    the pre-activation for backward and computes the activation again there."""
    if type(layer.intermediate) is not Intermediate or type(layer.output.dense) is not Linear:
        return  # converted already
    act = layer.intermediate.act
    swap_class(layer.intermediate, fast.PreActivationIntermediate)
    swap_class(layer.output.dense, fast.ActivatedLinear)
    layer.output.dense.act_fn = act.forward
