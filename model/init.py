"""Linear and Embedding layers that initialise themselves (normal(0, std), zero bias) inside their own
constructor. Under DeepSpeed's zero.Init a parameter is partitioned as soon as the module that owns it
is built, so initialising afterwards from a parent (`model.apply(init_fn)`) would write into empty
shards. Initialising in `reset_parameters` keeps a ZeRO-3 build bitwise equal to a plain one."""
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
