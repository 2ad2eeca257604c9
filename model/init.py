"""Linear and Embedding layers that initialise themselves (normal(0, std), zero bias) inside their own
constructor. Under DeepSpeed's zero.Init a parameter is partitioned as soon as the module that owns it
is built, so initialising afterwards from a parent (`model.apply(init_fn)`) would write into empty
shards. Initialising in `reset_parameters` keeps a ZeRO-3 build bitwise equal to a plain one.

Also the dropout every module uses: nn.Dropout with a cheaper mask (dropout_keep_mask)."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def linear_param_grads(grad, x, weight, bias):
    """The gradients of F.linear's weight and bias from its output's gradient and its input x (both
    [..., features]), in the parameters' dtypes: for the autograd functions that do a Linear's backward."""
    flat_grad = grad.reshape(-1, grad.shape[-1])
    grad_weight = (flat_grad.t() @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
    return grad_weight, None if bias is None else flat_grad.sum(0).to(bias.dtype)


class AutocastLinear(torch.autograd.Function):
    """F.linear(x, weight, bias) computed in `dtype` (autocast's), keeping for backward the weight itself
    rather than its `dtype` copy, which backward makes again. Under autocast, autograd keeps each
    weight's low-precision copy from forward until that layer's backward: 7M parameters per layer of
    the base model, and the 32k x 768 MLM decoder, all held at the training step's peak memory. The
    copy costs one cast per weight in backward. Only for autocast with weights in another dtype, and
    not for ZeRO-3's partitioned parameters (whose data DeepSpeed frees between forward and backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x = x.to(dtype)
        ctx.save_for_backward(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_weight, grad_bias = linear_param_grads(grad, x, weight, bias)
        return grad @ weight.to(x.dtype), grad_weight, grad_bias, None


def autocast_dtype_for(weight: torch.Tensor, x: torch.Tensor):
    """The dtype AutocastLinear should compute in, or None where plain F.linear is as lean."""
    device = x.device.type
    if not (torch.is_grad_enabled() and weight.requires_grad and torch.is_autocast_enabled(device)):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if weight.dtype != dtype and not hasattr(weight, "ds_id") else None


class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, std=0.02):
        self.init_std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        dtype = autocast_dtype_for(self.weight, x)
        if dtype is None:
            return super().forward(x)
        return AutocastLinear.apply(x, self.weight, self.bias, dtype)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, std=0.02):
        self.init_std = std
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()


# Dropout draws 16 random bits per entry (four entries share one 64-bit draw) and keeps the entry when
# they are below 2t - 2^15 as an int16, t = round((1 - p) · 2^15): probability t / 2^15 (within 1.6e-5
# of 1 - p); kept entries are scaled by 2^15 / t, so that E[keep · scale] = 1 exactly.


def dropout_scale(p):
    """(t, scale) for dropout probability p: keep probability t / 2^15, scale 2^15 / t."""
    t = min(max(round((1 - p) * 2 ** 15), 1), 2 ** 15 - 1)
    return t, 2 ** 15 / t


def keep_from_bits(bits: torch.Tensor, p, as_int16: bool) -> torch.Tensor:
    """The keep mask of int16 random bits: bool (bits < 2t - 2^15), or as_int16 the same entries as
    -1 (all bits set: kept) and 0, by int16 arithmetic only: bits >> 1 < t - 2^14 is the same test, and
    its difference cannot overflow, so the difference's sign (an arithmetic shift by 15) is the mask.
    as_int16 overwrites `bits`."""
    t = dropout_scale(p)[0]
    if not as_int16:
        return bits < 2 * t - 2 ** 15
    # in place: the random bits are a temporary of draw_keep's (no [B, H, N, N] copies)
    bits >>= 1
    bits -= t - 2 ** 14
    bits >>= 15
    return bits


def draw_keep(shape, p, device=None, generator=None) -> torch.Tensor:
    """A keep mask for inverted dropout, in the form the device multiplies by fastest: on the CPU int16
    -1 / 0 (keep_as turns it into 1.0 / 0.0 of a float dtype with one bitwise and: bool tensors are
    several times slower to make and to multiply by there, their loads not vectorised); elsewhere bool,
    which CUDA kernels cast as they multiply."""
    numel = math.prod(shape)
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None, generator=generator)
    bits = bits.view(torch.int16)[:numel].view(shape)
    return keep_from_bits(bits, p, as_int16=bits.device.type == "cpu")


ONE_BITS = {torch.bfloat16: (torch.int16, 0x3F80), torch.float16: (torch.int16, 0x3C00),
            torch.float32: (torch.int32, 0x3F800000), torch.float64: (torch.int64, 0x3FF0000000000000)}


def keep_as(keep: torch.Tensor, dtype) -> torch.Tensor:
    """draw_keep's mask as a multiplier for `dtype`: a bool mask as it is; an int16 one as 1.0 / 0.0 in
    `dtype`, built from the bit pattern of 1.0 (no conversion; in place for 2-byte dtypes)."""
    if keep.dtype == torch.bool:
        return keep
    if dtype not in ONE_BITS:
        return keep.ne(0).to(dtype)
    int_type, one = ONE_BITS[dtype]
    if int_type == keep.dtype:  # in place: keep is draw_keep's own tensor
        return keep.bitwise_and_(one).view(dtype)
    return (keep.to(int_type) & one).view(dtype)


def dropout_keep_mask(shape, p, device=None, generator=None):
    """A bool keep-mask for inverted dropout (draw_keep's), and its scale."""
    keep = draw_keep(shape, p, device, generator)
    return keep if keep.dtype == torch.bool else keep.ne(0), dropout_scale(p)[1]


def generator_state(device):
    """The state of the default generator of `device`: drawing again from a generator set to it repeats
    the draws that follow (repeat_draws)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.default_generator.get_state()
    module = torch.get_device_module(device.type)
    return module.default_generators[module.current_device() if device.index is None else device.index].get_state()


def repeat_draws(device, state):
    """A new generator on `device` at `state` (generator_state's), leaving the default one alone."""
    generator = torch.Generator(device=device)
    generator.set_state(state)
    return generator


class Dropout(nn.Dropout):
    """nn.Dropout (same module, same isinstance) with dropout_keep_mask's mask; keeps the bool mask
    for backward, as nn.Dropout does."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.p >= 1 or self.inplace:
            return super().forward(x)
        keep, scale = dropout_keep_mask(x.shape, self.p, x.device)
        return torch.mul(x, keep).mul_(scale)
