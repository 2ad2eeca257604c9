"""The building blocks every module uses: Linear and Embedding layers that initialise themselves, and the
activations.

Linear and Embedding draw their weights (normal(0, std), zero bias) inside their own constructor. Under
ZeRO-3's partitioned construction a parameter is partitioned as soon as the module that owns it is built, so
initialising afterwards from a parent (`model.apply(init_fn)`) would write into empty shards. Initialising in
`reset_parameters` keeps such a build bitwise equal to a plain one.

Dropout is torch's nn.Dropout and the activations are torch's modules: the faster replacements are applied
from outside (model/fast/convert.py).
"""
import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}  # the names model/config.py accepts


def activation(name) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Linear(nn.Linear):
    """nn.Linear (same parameters, same keys, same forward) initialised by itself: normal(0, std), zero bias."""

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
