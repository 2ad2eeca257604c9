"""Sequence parallelism (DeepSpeed Ulysses), applied from outside to a plain model of model/, as convert.py
applies the fast pieces: `apply(model, group)` changes the classes of the encoders, their attention modules and
(rtd) the RTD model to the subclasses below. The run setting is `sequence_parallel_size` (SP): consecutive
ranks form a group of SP that holds the same sequences (data-parallel ranks = world / SP).

In each group of SP ranks, for a sequence of N tokens:
- every rank computes the embeddings of the whole sequence (cheap) and the shared attention inputs (the mask,
  the relative index and table), then keeps its own N/SP tokens: rank r holds tokens [r·N/SP, (r+1)·N/SP) in
  every per-token part of each encoder layer (projections, FFN, LayerNorms: activations divide by SP);
- attention runs through DeepSpeed's DistributedAttention: an all-to-all gives every rank all N tokens of H/SP
  heads, so c2p and p2c read whole rows of the relative index as without SP (the rank's heads of the projected
  relative table), and a second all-to-all returns each rank's tokens with all heads;
- the nGiE convolution, the only step that reads neighbouring tokens, runs over the whole embedding output,
  which every rank has, and each rank keeps its own tokens of it;
- the encoder's last output is gathered, so the EMD, the MLM and RTD heads and the loss see whole sequences,
  on every rank of the group, as without SP (they are a small part of a step: the EMD and the MLM head run at
  the masked positions only).

Gradients. Every rank of a group computes the same loss L from the gathered output. The gather's backward
sums the group's gradients of the whole output and keeps the rank's own tokens, and the slice that keeps a
rank's tokens of the embeddings passes its gradient back into those tokens only: summed over the group, every
parameter's gradient is then SP·dL/dθ (the heads' from SP copies of L, the encoder's and embeddings' from SP
token slices of SP·dL/dh). DeepSpeed treats every rank as a data-parallel replica and averages gradients over
all world ranks, dp·SP of them, which gives the mean over the dp groups of dL/dθ: exactly the gradient of the
same data without SP. Its batch check counts SP times the sequences (`deepspeed_batch_fields`).

Dropout draws differ between the ranks of a group (each has its own RNG stream); the one place where that
would make the ranks disagree is the RTD generator's samples, which the discriminator reads on every rank:
they are taken from the group's first rank (SequenceParallelRTD.corrupt).
"""
import torch
import torch.distributed as dist

from model.attention import DisentangledSelfAttention
from model.encoder import Encoder
from model.fast.convert import swap_class
from model.rtd import RTDModel


class SequenceGroup:
    """This rank's group of SP consecutive ranks: its torch process group, the rank's place in it, and the
    global rank of the group's first member."""

    def __init__(self, size):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.size, self.index, self.first = size, rank % size, rank - rank % size
        self.group = None
        for first in range(0, world, size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(first, first + size)))
            if first == self.first:
                self.group = group

    def tokens(self, n):
        """The slice of n tokens this rank keeps."""
        if n % self.size:
            raise ValueError(f"a sequence of {n} tokens does not split over {self.size} ranks")
        chunk = n // self.size
        return slice(self.index * chunk, (self.index + 1) * chunk)



def deepspeed_batch_fields(fields, sequence_parallel_size):
    """DeepSpeed's batch fields for a run whose data-parallel size excludes SP: DeepSpeed counts every rank as a
    replica (see the module docstring), so its train_batch_size is SP times the run's global batch."""
    return dict(fields, train_batch_size=fields["train_batch_size"] * sequence_parallel_size)


class KeepTokens(torch.autograd.Function):
    """x [B, N, ...] (the same on every rank of the group) -> this rank's tokens; backward: their gradient in
    place, zeros elsewhere (the other ranks send theirs for their own tokens)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.shape, ctx.tokens = x.shape, group.tokens(x.shape[1])
        return x[:, ctx.tokens].contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[:, ctx.tokens] = grad
        return full, None


class GatherTokens(torch.autograd.Function):
    """Each rank's tokens [B, N/SP, ...] -> the whole sequence [B, N, ...] on every rank of the group; backward:
    the group's gradients of the whole sequence summed, this rank's tokens of the sum."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size)]
        dist.all_gather(parts, x.contiguous(), group=group.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place: a copy of autograd's buffer
        dist.all_reduce(grad, group=ctx.group.group)
        return grad[:, ctx.group.tokens(grad.shape[1])], None


class SequenceParallelEncoder(Encoder):
    """The encoder over this rank's tokens (module docstring). Set by `apply`: `sequence_group`. Returns the states
    as Encoder.forward does, the last one gathered to the whole sequence (the others: this rank's tokens)."""

    def forward(self, embeddings, input_mask, shared=None, num_layers=None):
        group = self.sequence_group
        shared = shared or self.attention_inputs(input_mask, embeddings.shape[1])
        hidden = KeepTokens.apply(embeddings, group)
        states = [embeddings]
        for i, layer in enumerate(self.layer[:num_layers]):
            hidden = self.run_layer(layer, hidden, shared)
            if i == 0 and hasattr(self, "conv"):
                own = group.tokens(embeddings.shape[1])
                hidden = self.conv.merge(KeepTokens.apply(self.conv.convolve(embeddings), group), hidden,
                                         input_mask[:, own])
            states.append(hidden)
        if len(states) > 1:  # no layer ran (a one-layer generator's EMD runs its only layer): nothing was split
            states[-1] = GatherTokens.apply(states[-1], group)
        return states


class SequenceParallelAttention:
    """Mixed into an attention module's class by `apply`: self-attention over this rank's tokens runs through
    DeepSpeed's DistributedAttention; attention with separate query states (the EMD, over the gathered
    sequence) runs as before. Set by `apply`: `sequence_group`, and `ulysses` (kept out of the module tree)."""

    def forward(self, hidden_states, mask4d, rel_index=None, rel_embeddings=None, query_states=None):
        self.sharded = query_states is None
        return super().forward(hidden_states, mask4d, rel_index, rel_embeddings, query_states)

    def attend(self, q, k, v, mask4d, rel_index, rel_embeddings):
        if not self.sharded:
            return super().attend(q, k, v, mask4d, rel_index, rel_embeddings)
        # DistributedAttention's layout is [B, N, H, d] (batch_dim_idx 0): heads scattered, tokens gathered
        out = self.ulysses(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None,
                           mask4d, rel_index, rel_embeddings)
        return out.transpose(1, 2)

    def attend_heads(self, q, k, v, mask4d, rel_index, rel_embeddings):
        """The attention of this rank's H/SP heads over all N tokens ([B, N, H/SP, d] in and out)."""
        self.head_slice = True
        try:
            return super().attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask4d, rel_index,
                                  rel_embeddings).transpose(1, 2)
        finally:
            self.head_slice = False

    def position_keys(self, rel_embeddings, which):
        keys = super().position_keys(rel_embeddings, which)  # [H, 2k, d]
        if not getattr(self, "head_slice", False):
            return keys
        per_rank = self.num_heads // self.sequence_group.size
        start = self.sequence_group.index * per_rank
        return keys[start:start + per_rank]


class SequenceParallelRTD(RTDModel):
    """The RTD model whose generator samples are the group's first rank's (module docstring)."""

    def corrupt(self, input_ids, labels, logits, sampled=None, sample_seeds=None, sample_generator=None):
        corruption = super().corrupt(input_ids, labels, logits, sampled, sample_seeds, sample_generator)
        group = self.sequence_group
        for tensor in (corruption.ids, corruption.replaced, corruption.sampled):
            dist.broadcast(tensor, group.first, group=group.group)
        return corruption


_mixed_classes = {}


def sequence_parallel_class(cls):
    """The class of `cls` with SequenceParallelAttention mixed in (one per class, so instances share it)."""
    if cls not in _mixed_classes:
        _mixed_classes[cls] = type(f"SequenceParallel{cls.__name__}", (SequenceParallelAttention, cls), {})
    return _mixed_classes[cls]


def apply(model, group: SequenceGroup):
    """Make `model` (an MLM, RTD or encoder model of model/, after convert.apply) run its encoders over this
    rank's tokens of each sequence (module docstring). In place; returns the model."""
    from deepspeed.sequence.layer import DistributedAttention
    for module in list(model.modules()):
        if type(module) is Encoder:
            swap_class(module, SequenceParallelEncoder)
            module.sequence_group = group
        elif isinstance(module, DisentangledSelfAttention) and not isinstance(module, SequenceParallelAttention):
            if module.num_heads % group.size:
                raise ValueError(f"{module.num_heads} attention heads do not split over {group.size} ranks")
            swap_class(module, sequence_parallel_class(type(module)))
            module.sequence_group = group
            module.sharded = module.head_slice = False
            # in the instance's __dict__, not as a submodule: DistributedAttention would hold the module itself
            module.__dict__["ulysses"] = DistributedAttention(module.attend_heads, group.group, scatter_idx=2,
                                                              gather_idx=1)
        elif type(module) is RTDModel:
            swap_class(module, SequenceParallelRTD)
            module.sequence_group = group
    return model
