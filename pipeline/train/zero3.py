"""Mode zero3: the plain `DebertaForMaskedLM` under a DeepSpeedEngine, any ZeRO stage of the DeepSpeed config.

Under ZeRO-3 the model is built inside `deepspeed.zero.Init`, so no rank ever holds all of it, and:
- the MLM decoder reads the word embedding outside the embedding's forward: it is registered as an external
  parameter of the head, so ZeRO-3 gathers it for the head's forward (DeepSpeed issue #1961); the shared
  relative table is read through its own module's forward, once per step (model/encoder.py);
- each encoder layer a forward runs once is a DeepSpeed leaf module (`zero3_leaf_layers`): its parameters
  are gathered and released as one group, and no hooks run inside its 17 modules.
"""
import deepspeed
import torch
import torch.distributed as dist

from model.fast import convert
from model.heads import DebertaForMaskedLM
from pipeline.run.ds_config import zero_stage
from pipeline.errors import ReleaseError
from pipeline.run.lifecycle import raise_where_read, reduce_mean, reduce_sum, say
from pipeline.release.read import Release, check_grown, copy_weight
from pipeline.run.optim import build_engine
from pipeline.run.stepper import EngineStepper


def torch_checkpoint(function, *args):
    # non-reentrant: works with integer inputs and with ZeRO-3's parameter hooks
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def build_zero3_model(run, ds, model_config, rank):
    stage = zero_stage(ds)
    # transformers/dynamo must be imported before zero.Init patches module construction
    import torch._dynamo  # noqa: F401
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = DebertaForMaskedLM(model_config, emd=run.emd)
    # the fast pieces; ZeRO-3 gathers each weight only around its own module's forward (fuse_qkv, autocast_linear)
    convert.apply(model, model_config.attention_impl, fuse_qkv=stage != 3, autocast_linear=stage != 3)
    split_sequences(run, model)
    prepare_for_engine(run, stage, model, leaf_layers(model), [model.deberta.encoder])
    if run.init_from_release:
        load_release_into(model, run.init_from_release, stage, rank)
    return model


def split_sequences(run, model):
    """With sequence_parallel_size > 1, the model's encoders over this rank's share of each sequence
    (pipeline/train/sequence_parallel.py)."""
    if run.sequence_parallel_size > 1:
        from pipeline.train import sequence_parallel
        sequence_parallel.apply(model, sequence_parallel.SequenceGroup(run.sequence_parallel_size))


def data_parallel_position(run):
    """(data-parallel rank, size) of this rank: the ranks of a sequence group read the same micro-batches."""
    sp = run.sequence_parallel_size
    return dist.get_rank() // sp, dist.get_world_size() // sp


def prepare_for_engine(run, stage, mlm_model, leaves, encoders):
    """What a model built for mode zero3 needs before DeepSpeed wraps it: under ZeRO-3 the MLM decoder's read of
    the tied word table registered as an external parameter and `leaves` made leaf modules (zero3_leaf_layers);
    with activation_checkpointing, each of `encoders` recomputing its layers."""
    if stage == 3:
        deepspeed.zero.register_external_parameter(mlm_model.lm_predictions.lm_head,
                                                   mlm_model.deberta.embeddings.word_embeddings.weight)
        if run.zero3_leaf_layers:
            for layer in leaves:
                deepspeed.utils.set_z3_leaf_module(layer, True)
    if run.activation_checkpointing:
        for encoder in encoders:
            encoder.checkpoint_fn = torch_checkpoint


def leaf_layers(model):
    """The encoder layers ZeRO-3 may treat as leaf modules: those a forward runs exactly once.

    A leaf's parameters are gathered when it starts and released when it ends, as one group, and no hooks
    are installed inside its 17 modules: in bench/zero_overhead.py's 48-layer model ZeRO-3's parameter
    fetches per step fall from 2,825 to 287. A layer run twice in one forward cannot be a leaf: DeepSpeed
    reduces a leaf's gradients at each of its backward calls (stage3.py, reduce_leaf_module_grads) and
    asserts on the second. With the EMD the encoder runs all layers but the last once, and the EMD runs
    the last one emd_steps times."""
    layers = list(model.deberta.encoder.layer)
    return layers[:-1] if model.emd_steps > 1 else layers


def load_release_into(model, path, stage, rank):
    """Copy a release's weights into a (possibly ZeRO-3 partitioned) model, one tensor at a time.

    The release's headers give every rank the keys and shapes to check; the tensors themselves are read
    one by one, right before their copy, so no rank holds the release as a whole. Under ZeRO-3 only rank 0
    reads them: GatheredParameters(modifier_rank=0) broadcasts rank 0's values to all ranks when the block
    exits and then re-partitions (deepspeed/runtime/zero/partition_parameters.py, GatheredParameters._exit).
    """
    release = Release(path)
    reads_tensors = stage != 3 or rank == 0
    error = None
    if reads_tensors:
        try:
            release.check_tie()
        except ReleaseError as e:
            error = e
    raise_where_read(error, stage == 3)  # every rank must stop on a bad release, not only the one that read it
    own = dict(model.named_parameters())
    shapes = {name: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for name, p in own.items()}
    grown = release.grown(shapes)
    release.check_fits(shapes, "pretraining model", unexpected_ok=lambda key: True, grown_ok=grown)
    notice = check_grown(path, release.config, model.config, grown)
    if notice:
        say(rank, notice)
    for name, param in own.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=stage == 3):
            if reads_tensors:
                source = release.read(name)
                copy_weight(param.data, source)
                del source  # one release tensor in memory at a time


class Zero3Stepper(EngineStepper):
    """Mode zero3: one DeepSpeedEngine over the whole model, any ZeRO stage. Pretraining's steppers read their
    micro-batches from `train_batches` (set by `feed`)."""
    mode = "zero3"
    train_batches = None

    @staticmethod
    def prepare_ds_config(run, ds, source):
        """What this mode adds to or refuses in a completed DeepSpeed config (before DeepSpeed starts)."""
        return ds

    def __init__(self, run, ds, model_config, rank):
        self.run, self.accumulation = run, ds["gradient_accumulation_steps"]
        self.module = self.build_module(run, ds, model_config, rank)
        self.engine = build_engine(self.module, ds, run.lr, run.adam_betas, run.adam_eps, run.weight_decay,
                                   run.warmup_steps, run.max_steps, run.optimizer, groups=self.optimizer_groups(run))
        self.dp_rank, self.dp_size = data_parallel_position(run)

    def feed(self, loader):
        self.train_batches = self.batches(loader)

    @staticmethod
    def build_module(run, ds, model_config, rank):
        return build_zero3_model(run, ds, model_config, rank)

    def optimizer_groups(self, run):
        """The optimizer's parameter groups; None: the one rule of pipeline/run/optim.py over the whole module."""
        return None

    def describe(self):
        from deepspeed.utils import get_z3_leaf_modules
        leaves = len(get_z3_leaf_modules(self.module))
        layers = self.module.config.num_hidden_layers
        return f" ({leaves} of {layers} encoder layers gathered whole)" if leaves else ""

    def batches(self, loader):
        for batch in loader:
            yield {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self):
        """`accumulation` micro-batches, each forward, backward and (at the boundary) DeepSpeed's step. The loss
        is the mean over the micro-batches and ranks, the MLM accuracy over all ranks' masked tokens; both stay on
        the device (0-d tensors), so the step never waits for the accelerator."""
        losses, counts = [], torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.accumulation):
            out = self.engine(**next(self.train_batches))
            self.engine.backward(out.loss)
            self.engine.step()
            losses.append(out.loss.detach().to(torch.float64))
            counts += torch.stack([(out.logits.argmax(-1) == out.labels).sum(), torch.tensor(out.labels.numel(),
                                                                                            device=self.device)])
        loss = reduce_mean(torch.stack(losses).sum() / len(losses))
        correct, predicted = reduce_sum(counts)
        return {"loss": loss, "mlm_accuracy": correct / predicted.clamp(min=1)}

    def eval_loss(self, batches, steps):
        # every rank runs the same number of forwards: under ZeRO-3 each one gathers parameters collectively
        micro_batches = steps * self.accumulation
        self.engine.eval()
        loss_sum, correct, predicted = 0.0, 0, 0
        with torch.no_grad():
            for _ in range(micro_batches):
                out = self.engine(**next(batches))
                loss_sum += out.loss.item()
                correct += (out.logits.argmax(-1) == out.labels).sum().item()
                predicted += out.labels.numel()
        self.engine.train()
        totals = torch.tensor([loss_sum / micro_batches, correct, predicted], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return {"val_loss": totals[0].item() / dist.get_world_size(),
                "val_mlm_accuracy": totals[1].item() / max(totals[2].item(), 1)}
