"""Dropout masks that are cheap to draw and to apply, and the random-generator state that lets backward
draw the same mask again instead of storing it.

Each entry takes 16 random bits (four entries share one 64-bit draw) and is kept when they are below
2t - 2^15 as an int16, t = round((1 - p) · 2^15): probability t / 2^15 (within 1.6e-5 of 1 - p); kept
entries are scaled by 2^15 / t, so that E[keep · scale] = 1 exactly. On the CPU the mask is made and applied
with int16 arithmetic (bool tensors are several times slower to make and to multiply by there, their loads
not vectorised); elsewhere it is bool, which CUDA kernels cast as they multiply.
"""
import math

import torch


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
    -1 / 0 (keep_as turns it into 1.0 / 0.0 of a float dtype with one bitwise and); elsewhere bool."""
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
