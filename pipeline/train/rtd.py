"""Objective rtd (DeBERTa-v3) in mode zero3, joint training (`rtd_training: joint`): the generator and the
discriminator (model/rtd.py) as one module under one DeepSpeedEngine, any ZeRO stage. The default, decoupled
training with an engine each, is pipeline/train/rtd_decoupled.py, which builds the model with build_rtd_model too.

- Each network has its own AdamW parameter groups (decayed weights / biases and LayerNorms), the generator's at
  `lr`, the discriminator's at `discriminator_lr` (or `lr`), on the one warmup/decay schedule; one step applies
  L_MLM + rtd_lambda · L_RTD (the official `decoupled_training=False` step). Adam's update is per parameter, so
  the groups behave as two optimizers; what decoupled training does differently is clip each network's
  gradients by its own norm (here one norm over both) and let the discriminator read the generator's table
  after that step's generator update (here before it).
- Under ZeRO-3 the discriminator reads the generator's word table through the generator's own embedding module
  (RTDModel.shared_rows), so ZeRO-3 gathers it there, as the shared relative table is read; the MLM decoder's
  use of it is registered as an external parameter, as in mode zero3 for MLM. Every encoder layer that a
  forward runs once is a leaf module: the generator's but its last (the EMD runs it twice), all of the
  discriminator's.
- Checkpoints, resume (also on another number of ranks) and the release are those of mode zero3; the
  converter writes the v3 layout (pipeline/release/rtd.py).
"""
import deepspeed
import torch

from model.fast import convert
from model.rtd import RTDModel
from pipeline.run.ds_config import zero_stage
from pipeline.run.lifecycle import reduce_mean
from pipeline.run.optim import param_groups
from pipeline.train.zero3 import Zero3Stepper, leaf_layers, prepare_for_engine, split_sequences

LOGGED = ("loss", "mlm_loss", "mlm_accuracy", "rtd_loss", "rtd_accuracy", "replaced_rate", "generator_correct")


def build_rtd_model(run, ds, model_config, rank):
    stage = zero_stage(ds)
    import torch._dynamo  # noqa: F401  (before zero.Init patches module construction)
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        model = RTDModel(model_config, run.generator_config(), run.embedding_sharing, run.rtd_lambda, emd=run.emd)
    # as build_zero3_model: ZeRO-3 gathers each weight only around its own module's forward
    convert.apply(model, model_config.attention_impl, fuse_qkv=stage != 3, autocast_linear=stage != 3)
    split_sequences(run, model)
    generator, discriminator = model.generator, model.discriminator
    prepare_for_engine(run, stage, generator, leaf_layers(generator) + list(discriminator.deberta.encoder.layer),
                       [generator.deberta.encoder, discriminator.deberta.encoder])
    if run.init_from_release:
        from pipeline.release.rtd import load_rtd_release_into
        load_rtd_release_into(model, run.init_from_release, stage, rank)
    return model


class RTDStepper(Zero3Stepper):
    mode, objective = "zero3", "rtd"

    @staticmethod
    def build_module(run, ds, model_config, rank):
        return build_rtd_model(run, ds, model_config, rank)

    def optimizer_groups(self, run):
        """Each network its own groups: the generator at lr, the discriminator at discriminator_lr (default lr)."""
        d_lr = run.lr if run.discriminator_lr is None else run.discriminator_lr
        return (param_groups(self.module.generator, run.weight_decay, run.lr)
                + param_groups(self.module.discriminator, run.weight_decay, d_lr))

    def describe(self):
        from deepspeed.utils import get_z3_leaf_modules
        leaves = len(get_z3_leaf_modules(self.module))
        layers = self.module.config.num_hidden_layers + self.module.generator_config.num_hidden_layers
        return (f", rtd: generator {self.module.generator_config.num_hidden_layers} layers, "
                f"{self.run.embedding_sharing}" + (f" ({leaves} of {layers} encoder layers gathered whole)" if leaves else ""))

    def _sums(self, batches, micro_batches, train):
        """The means of LOGGED over the micro-batches and ranks, as 0-d tensors on the device (no host read)."""
        sums = torch.zeros(len(LOGGED), dtype=torch.float64, device=self.device)
        for _ in range(micro_batches):
            out = self.engine(**next(batches))
            if train:
                self.engine.backward(out.loss)
                self.engine.step()
            sums += torch.stack([out[key].detach().to(torch.float64) for key in LOGGED])
        return dict(zip(LOGGED, reduce_mean(sums / micro_batches)))

    def train_step(self):
        """`accumulation` micro-batches: the generator's MLM and the discriminator's RTD loss in one backward each.
        The values are means over the micro-batches and ranks."""
        return self._sums(self.train_batches, self.accumulation, train=True)

    def eval_loss(self, batches, steps):
        """The held-out losses. The generator's samples are drawn from each sample's own seed (the loader's), so
        every evaluation sees the same replacements and training's random state is not touched."""
        self.engine.eval()
        with torch.no_grad():
            values = self._sums(batches, steps * self.accumulation, train=False)
        self.engine.train()
        return {f"val_{key}": value.item() for key, value in values.items()}
