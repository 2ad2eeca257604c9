"""Linear and Embedding layers that initialise themselves (normal(0, std), zero bias) inside their own
constructor. Under DeepSpeed's zero.Init a parameter is partitioned as soon as the module that owns it
is built, so initialising afterwards from a parent (`model.apply(init_fn)`) would write into empty
shards. Initialising in `reset_parameters` keeps a ZeRO-3 build bitwise equal to a plain one.

Also the dropout every module uses: nn.Dropout with a cheaper mask (dropout_keep_mask)."""
import math

import torch
from torch import nn


class Linear(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, std=0.02):
        self.init_std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


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


class Dropout(nn.Dropout):
    """nn.Dropout (same module, same isinstance) with dropout_keep_mask's mask; keeps the bool mask
    for backward, as nn.Dropout does."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.p >= 1 or self.inplace:
            return super().forward(x)
        keep, scale = dropout_keep_mask(x.shape, self.p, x.device)
        return torch.mul(x, keep).mul_(scale)
