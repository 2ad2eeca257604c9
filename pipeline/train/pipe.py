"""Pipeline mode: the same DeBERTa blocks as a `deepspeed.pipe.PipelineModule`.

The sequence of layers (one LayerSpec per DeBERTa layer):

    0        TiedLayerSpec "word_embeddings": token ids -> word vectors
    1        EmbeddingTail: (+positions/types) -> embed_proj -> LayerNorm -> mask -> dropout, and the
             normalised relative-embedding table P (computed once, then carried to every stage)
    2        FirstBlock: encoder layer 0 and the nGiE convolution (which reads the embedding output)
    3..L     Block: encoder layers 1 .. L-2
    L+1      LastBlock: encoder layer L-1 run as the Enhanced Mask Decoder (twice, query = absolute
             positions + its input) and the LM head's dense/LayerNorm, at the masked positions only
    L+2      TiedLayerSpec "word_embeddings": the tied decoder, logits = h · Wᵀ + bias

Only tensors cross stage boundaries: (hidden, mask, labels, P), and the embedding output until the
conv (after layer 0) has read it. P's gradient flows back
through the pipe like any activation, so the relative table needs no tie; the word embedding is used
on the first and the last stage and is tied (DeepSpeed all-reduces its gradient between them).
Partitioning balances the encoder blocks ("type:Block"): the embedding and head layers ride along.

DeepSpeed's pipeline engine refuses ZeRO-2/3: this mode runs with ZeRO-0/1 (PipeStepper.prepare_ds_config).
The layer files' keys map onto the release layout in model/state_dict_adapter.py (pipeline_layer_keys).
"""
import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from model import state_dict_adapter as keys
from model.attention import attention_mask_4d, relative_position_index
from model.encoder import AttentionInputs, ConvLayer, Embeddings, Layer, relative_table
from model.fast import convert
from model.fast.memory import FloatCrossEntropy, decode_logits
from model.heads import enhanced_mask_decoder, lm_transform, masked_positions
from model.layers import Embedding, Linear, activation
from pipeline.run.ds_config import zero_stage
from pipeline.errors import ConfigError
from pipeline.release.read import Release, check_grown, copy_weight
from pipeline.run.lifecycle import say
from pipeline.run.optim import build_engine
from pipeline.run.stepper import EngineStepper


class WordEmbedding(nn.Module):
    """The word table, used at the input (lookup) and at the output (tied decoder)."""

    def __init__(self, config):
        super().__init__()
        self.weight = Embedding(config.vocab_size, config.embed_size, config.pad_token_id,
                                std=config.initializer_range).weight
        self.padding_idx = config.pad_token_id

    def forward(self, inputs):
        """One module at both ends of the pipe, with no forward_fn: DeepSpeed then saves it in the layer files
        (layer_00 and the last layer's); a TiedLayerSpec with a forward_fn is a plain function to its
        save_state_dict and the word table would be in no layer file. Token ids come in at the input,
        float hidden states at the output."""
        if inputs[0].is_floating_point():
            return decode_forward(self, inputs)
        return embed_forward(self, inputs)


def embed_forward(module, inputs):
    input_ids, attention_mask, labels = inputs
    vectors = F.embedding(input_ids, module.weight, module.padding_idx)
    return vectors, attention_mask, labels


def decode_forward(module, inputs):
    hidden, targets, bias = inputs
    return decode_logits(hidden, module.weight, bias), targets


class EmbeddingTail(nn.Module):
    """The model's own Embeddings after the word lookup (the word table is layer 0), plus the shared
    normalised relative table."""

    def __init__(self, config):
        super().__init__()
        self.embeddings = Embeddings(config, word_table=False)
        if config.relative_attention:
            self.rel_embeddings = Embedding(2 * config.att_span, config.hidden_size, std=config.initializer_range)
            if config.norm_rel_ebd == "layer_norm":
                self.rel_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, inputs):
        vectors, attention_mask, labels = inputs
        x = self.embeddings(input_mask=attention_mask, inputs_embeds=vectors)
        if hasattr(self, "rel_embeddings"):
            rel = relative_table(self.rel_embeddings, getattr(self, "rel_LayerNorm", None))
        else:
            # a placeholder (only tensors travel between stages); integer, so no gradient is expected for it
            rel = torch.zeros(1, dtype=torch.long, device=x.device)
        return x, x, attention_mask, labels, rel


class Block(nn.Module):
    """One encoder layer; the attention mask and relative indices are rebuilt from the token mask on
    each stage (cheap) instead of being sent."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layer = Layer(config)

    def attention_inputs(self, attention_mask, rel):
        n = attention_mask.shape[1]
        rel_index = relative_position_index(n, n, self.config, attention_mask.device) \
            if self.config.relative_attention else None
        return AttentionInputs(attention_mask_4d(attention_mask), rel_index,
                               rel if self.config.relative_attention else None)

    def forward(self, inputs):
        hidden, attention_mask, labels, rel = inputs
        return self.layer(hidden, *self.attention_inputs(attention_mask, rel)), attention_mask, labels, rel


class FirstBlock(Block):
    def __init__(self, config):
        super().__init__(config)
        if config.conv_kernel_size > 0:
            self.conv = ConvLayer(config)

    def forward(self, inputs):
        """(embeddings, embeddings, mask, labels, P) -> (hidden, mask, labels, P): the conv is the last reader
        of the embedding output, so it stops travelling here (DeepSpeed expects a gradient for every
        floating tensor a stage receives)."""
        embeddings, _, attention_mask, labels, rel = inputs
        hidden, attention_mask, labels, rel = super().forward((embeddings, attention_mask, labels, rel))
        if hasattr(self, "conv"):
            hidden = self.conv(embeddings, hidden, attention_mask)
        return hidden, attention_mask, labels, rel


class LastBlock(Block):
    """The last encoder layer as the model's own Enhanced Mask Decoder (model/heads.py), then the LM head's
    transform, both at the masked positions only, as in mode zero3. Outputs (transformed hidden [M, E],
    targets [M], decoder bias). The parameters keep LMHead's names (dense, LayerNorm, bias)."""

    def __init__(self, config, emd_steps=2):
        super().__init__(config)
        std = config.initializer_range
        self.emd_steps = emd_steps if not config.position_biased_input else 0
        if self.emd_steps:
            self.position_embeddings = Embedding(config.max_position_embeddings, config.embed_size, std=std)
        self.dense = Linear(config.hidden_size, config.embed_size, std=std)
        self.act = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.embed_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, inputs):
        hidden, attention_mask, labels, rel = inputs
        shared = self.attention_inputs(attention_mask, rel)
        index, targets = masked_positions(labels)
        if self.emd_steps:
            def run_last_layer(keys_values, inputs, query):
                return self.layer(keys_values, *inputs, query_states=query)
            selected = enhanced_mask_decoder(run_last_layer, self.position_embeddings, hidden, shared, None, index,
                                             self.emd_steps)
        else:
            out = self.layer(hidden, *shared)
            selected = out.reshape(-1, out.shape[-1])[index]
        return lm_transform(self, selected), targets, self.bias


def mlm_loss(outputs, _labels):
    """The MLM loss of mode zero3 (DebertaForMaskedLM's): mean cross-entropy in fp32 at the masked positions."""
    logits, targets = outputs
    return FloatCrossEntropy.apply(logits, targets)


def build_pipeline_module(config, num_stages, emd=True, activation_checkpointing=False, seed=None):
    if config.num_hidden_layers < 2:
        raise ValueError("pipeline mode needs at least 2 encoder layers (the first carries the conv, the last the EMD)")
    specs = [TiedLayerSpec("word_embeddings", WordEmbedding, config, tied_weight_attr=["weight"]),
             LayerSpec(EmbeddingTail, config),
             LayerSpec(FirstBlock, config)]
    specs += [LayerSpec(Block, config) for _ in range(config.num_hidden_layers - 2)]
    specs += [LayerSpec(LastBlock, config, emd_steps=2 if emd else 0),
              TiedLayerSpec("word_embeddings", WordEmbedding, config, tied_weight_attr=["weight"])]
    return PipelineModule(layers=specs, num_stages=num_stages, loss_fn=mlm_loss,
                          partition_method="type:Block",
                          activation_checkpoint_interval=1 if activation_checkpointing else 0,
                          checkpointable_layers=["Block", "FirstBlock", "LastBlock"],
                          seed_layers=True, seed_fn=seed_layer, base_seed=seed if seed is not None else 1234)


def seed_layer(seed):
    """Each layer is built from seed base+index, so every partitioning builds the same weights. (DeepSpeed's
    own seeding passes a numpy integer to random.seed, which Python 3.11 refuses.)"""
    from deepspeed.runtime.utils import set_random_seed
    set_random_seed(int(seed))


# ------------------------------------------------------------ starting from a release
def load_release_into_pipe(module, path, config, announce=True):
    """Copy a release's weights into this stage's layers: each stage reads only the tensors it holds, one at a
    time (the release's headers give the keys and shapes). announce: say here when the position table grows
    (the last stage holds it; one of its ranks says it)."""
    release = Release(path)
    release.check_tie()
    maps = keys.pipeline_layer_keys(config)
    own = {name: key for name in module.state_dict() if (key := keys.from_pipeline(name, maps)) is not None}
    shapes = {key: tuple(module.state_dict()[name].shape) for name, key in own.items()}
    grown = release.grown(shapes)
    release.check_fits(shapes, "pipeline stage", unexpected_ok=lambda key: True, grown_ok=grown)
    notice = check_grown(path, release.config, config, grown)
    if notice and announce:
        say(0, notice)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name in own:
                copy_weight(tensor, release.read(own[name]))


def pipeline_batches(batches):
    """The pipeline engine's micro-batch format: (inputs for the first stage, labels for the loss). The
    labels also travel inside the inputs: the last block selects the masked positions with them."""
    for batch in batches:
        yield (batch["input_ids"], batch["attention_mask"], batch["labels"]), batch["labels"]


class PipeStepper(EngineStepper):
    """Mode pipeline: DeepSpeed's PipelineEngine over the blocks above, ZeRO-0/1."""
    mode = "pipeline"
    train_batches = None

    @staticmethod
    def prepare_ds_config(run, ds, source):
        stage = zero_stage(ds)
        if stage >= 2:
            raise ConfigError(f"{source}: ZeRO stage {stage} with mode 'pipeline': DeepSpeed's pipeline engine refuses "
                              "ZeRO-2 and ZeRO-3 (they are incompatible with pipeline parallelism). Use mode 'zero3' "
                              "for ZeRO-2/3, or a ZeRO-0/1 config (pipeline_zero1_bf16) for pipeline mode.")
        pipe = ds.setdefault("pipeline", {})
        if pipe.get("activation_checkpoint_interval", 0) and not run.activation_checkpointing:
            raise ConfigError(f"{source}: activation checkpointing is a run-config setting "
                              "(activation_checkpointing: true); remove pipeline.activation_checkpoint_interval")
        # stage inputs carry integer tensors (mask, labels): only the non-reentrant checkpoint accepts them
        pipe["use_reentrant"] = False
        return ds

    def __init__(self, run, ds, model_config, rank):
        self.module = build_pipeline_module(model_config, run.pipeline_stages, emd=run.emd,
                                            activation_checkpointing=run.activation_checkpointing, seed=run.seed)
        convert.apply(self.module, model_config.attention_impl)  # ZeRO-0/1: every weight whole on every rank
        if run.init_from_release:
            # the last rank is on the last stage (DeepSpeed's pipe-major rank order), where the EMD's table is
            last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
            load_release_into_pipe(self.module, run.init_from_release, model_config, announce=last)
        self.engine = build_engine(self.module, ds, run.lr, run.adam_betas, run.adam_eps, run.weight_decay,
                                   run.warmup_steps, run.max_steps, run.optimizer)
        self.dp_rank, self.dp_size = self.engine.grid.get_data_parallel_id(), self.engine.grid.get_data_parallel_world_size()

    def batches(self, loader):
        return pipeline_batches(iter(loader))

    def feed(self, loader):
        self.train_batches = self.batches(loader)

    def train_step(self):
        # train_batch runs the global batch's micro-batches through the pipe (1F1B) and returns the mean loss,
        # averaged over the data-parallel ranks and broadcast from the last stage to every stage
        return {"loss": self.engine.train_batch(data_iter=self.train_batches), "mlm_accuracy": None}

    def eval_loss(self, batches, steps):
        losses = [self.engine.eval_batch(data_iter=batches).item() for _ in range(steps)]
        return {"val_loss": sum(losses) / len(losses), "val_mlm_accuracy": None}
