"""The building blocks every module uses: Linear and Embedding layers that initialise themselves, the
dropout, and the activations.

Linear and Embedding draw their weights (normal(0, std), zero bias) inside their own constructor. Under
DeepSpeed's zero.Init a parameter is partitioned as soon as the module that owns it is built, so initialising
afterwards from a parent (`model.apply(init_fn)`) would write into empty shards. Initialising in
`reset_parameters` keeps a ZeRO-3 build bitwise equal to a plain one.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.fast.dropout import dropout_keep_mask
from model.fast.memory import ActivationThenLinear, AutocastLinear, autocast_dtype_for

ACTIVATIONS = {"gelu": F.gelu, "tanh": torch.tanh, "relu": F.relu}  # the names model/config.py accepts


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Linear(nn.Linear):
    """nn.Linear (same parameters, same keys) initialised by itself; under autocast it keeps its weight
    rather than the weight's low-precision copy for backward (model/fast/memory.py, AutocastLinear)."""

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


class Dropout(nn.Dropout):
    """nn.Dropout (same module, same isinstance) with a cheaper mask (model/fast/dropout.py); keeps the
    bool mask for backward, as nn.Dropout does."""

    def forward(self, x):
        if not self.training or self.p == 0 or self.p >= 1 or self.inplace:
            return super().forward(x)
        keep, scale = dropout_keep_mask(x.shape, self.p, x.device)
        return torch.mul(x, keep).mul_(scale)


class ActivatedLinear(Linear):
    """A Linear applied to act(x), with the activation recomputed in backward (ActivationThenLinear).
    The parameters are the Linear's own (the same keys), and it is a module of its own so that ZeRO-3
    gathers them around its forward and backward as for any Linear."""

    def __init__(self, in_features, out_features, act, std):
        super().__init__(in_features, out_features, std=std)
        self.act = act

    def forward(self, pre):
        return ActivationThenLinear.apply(pre, self.weight, self.bias, self.act)
