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


def dropout_keep_mask(shape, p, device=None):
    """A bool keep-mask for inverted dropout, and its scale: each entry kept independently with
    probability t / 2^16, t = round((1 - p) · 2^16) (within 8e-6 of 1 - p), scale = 2^16 / t, so that
    E[keep · scale] = 1 exactly. Drawn as 16 random bits per entry (four from one 64-bit draw) and one
    comparison: less than half the time of bernoulli_ on the CPU, which draws 32 bits per entry.
    Uses torch's default generator, so torch.manual_seed reproduces it."""
    threshold = round((1 - p) * 65536)
    numel = math.prod(shape)
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    keep = bits.view(torch.int16)[:numel].view(shape) < threshold - 32768
    return keep, 65536 / threshold


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's entries as bits, eight per byte (uint8 [ceil(numel / 8)]): an eighth of the memory.
    Each group of 8 bools is read as one int64 whose bytes are 0 or 1; multiplying by 0x0102040810204080
    moves byte k's bit to bit 56 + k with no carries (no two byte/bit pairs land on one bit), so the top
    byte holds the group (the multiplication wraps modulo 2^64, as int64 arithmetic does in torch)."""
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return ((flat.view(torch.int64) * 0x0102040810204080) >> 56).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    """pack_mask's inverse: each byte repeated into the 8 bytes of an int64, byte k keeping bit k."""
    spread = (packed.to(torch.int64) * 0x0101010101010101) & (0x8040201008040201 - 2 ** 64)
    return (spread.view(torch.uint8) != 0)[: math.prod(shape)].view(shape)


class Dropout(nn.Dropout):
    """nn.Dropout (same module, same isinstance) with dropout_keep_mask's mask; keeps the bool mask
    for backward, as nn.Dropout does."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.p >= 1 or self.inplace:
            return super().forward(x)
        keep, scale = dropout_keep_mask(x.shape, self.p, x.device)
        return torch.mul(x, keep).mul_(scale)
