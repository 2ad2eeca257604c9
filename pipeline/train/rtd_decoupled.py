"""Objective rtd (DeBERTa-v3) in mode zero3 with decoupled training, the official default (`--decoupled_training
True`, DeBERTa/apps/tasks/rtd_task.py `get_decoupled_loss_fn`): the generator G and the discriminator D each have
their own DeepSpeedEngine: their own AdamW, gradient clipping, loss scale and warmup/decay schedule (D's at
`discriminator_lr`, else `lr`), any ZeRO stage of the DeepSpeed config.

One step, in the official order:
  1. G, over the step's micro-batches: forward on L_MLM, backward, and (at the last) its engine's step. Each
     micro-batch's corrupted copy is sampled from G's logits in that forward, before G's update.
  2. D, over those corrupted micro-batches: forward on the corrupted ids, backward on rtd_lambda · L_RTD, and
     its engine's step. D's input rows come from G's word table as it is after G's update (the official
     forward pre-hook reads E_G when D runs, which is after G's step).

GDES (E_D = sg(E_G) + E_Δ): D reads E_G through G's engine without making it one of D's parameters: under
ZeRO-3 the table is gathered from G's partitions around the read (GatheredParameters, read-only) and the rows
are taken under no_grad, so D's backward sends no gradient to E_G and E_G changes by G's step only. `none`
shares nothing; `es` (one table for both losses) needs joint training (RunConfig.validate says so).

Checkpoints hold both engines, each DeepSpeed checkpoint in its own subdirectory of the tag:
global_stepN/generator/ and global_stepN/discriminator/ (the run's RNG states and meta file stay at the tag's
top); the universal conversion converts each (pipeline/run/checkpointer.py ensure_universal) and the converter
reads both into the RTD model's keys (pipeline/release/master_weights.py).
"""
import copy
import os

import deepspeed
import torch
import torch.nn.functional as F

from model.rtd import discriminator_values, generator_values
from pipeline.run.checkpointer import ENGINE_DIRS, load_engine, write_through_python
from pipeline.run.lifecycle import reduce_mean
from pipeline.run.optim import build_engine, param_groups
from pipeline.train.rtd import LOGGED, build_rtd_model
from pipeline.train.zero3 import Zero3Stepper, data_parallel_position



def generator_rows(generator, ids):
    """G's word vectors of `ids`, detached: read from G's table without a gradient path to it, the table gathered
    from its ZeRO-3 partitions for the read (every rank calls this the same number of times) and released."""
    table = generator.deberta.embeddings.word_embeddings.weight
    with torch.no_grad(), deepspeed.zero.GatheredParameters([table], enabled=hasattr(table, "ds_id")):
        return F.embedding(ids, table)


class DecoupledRTDStepper(Zero3Stepper):
    """Two engines: `engine` (G's; the lr, grad norm, loss scale and skipped steps the loop logs are G's) and
    `d_engine` (D's; its lr, grad norm and skipped steps are logged as discriminator_lr, discriminator_grad_norm
    and discriminator_skipped_steps)."""
    mode, objective = "zero3", "rtd"

    def __init__(self, run, ds, model_config, rank):
        self.run, self.accumulation = run, ds["gradient_accumulation_steps"]
        self.module = build_rtd_model(run, ds, model_config, rank)  # the RTD model holding both networks
        d_lr = run.lr if run.discriminator_lr is None else run.discriminator_lr
        self.engine, self.d_engine = (
            build_engine(network, copy.deepcopy(ds), lr, run.adam_betas, run.adam_eps, run.weight_decay,
                         run.warmup_steps, run.max_steps, run.optimizer,
                         groups=param_groups(network, run.weight_decay, lr))
            for network, lr in ((self.module.generator, run.lr), (self.module.discriminator, d_lr)))
        self.engines = (self.engine, self.d_engine)
        self.dp_rank, self.dp_size = data_parallel_position(run)

    def describe(self):
        from deepspeed.utils import get_z3_leaf_modules
        leaves = len(get_z3_leaf_modules(self.module))
        layers = self.module.config.num_hidden_layers + self.module.generator_config.num_hidden_layers
        return (f", rtd decoupled: generator {self.module.generator_config.num_hidden_layers} layers, "
                f"{self.run.embedding_sharing}, two engines"
                + (f" ({leaves} of {layers} encoder layers gathered whole)" if leaves else ""))

    # ------------------------------------------------------------------ the two phases of a step
    def generator_phase(self, batches, micro_batches, train):
        """G over `micro_batches` micro-batches (its step at the last when training): [(corrupted micro-batch
        for D, G's logged values)]. The corrupted ids are sampled from G's logits before its update."""
        corrupted = []
        for _ in range(micro_batches):
            batch = next(batches)
            generated = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"])
            corruption = self.module.corrupt(batch["input_ids"], batch["labels"], generated.logits,
                                             sample_seeds=batch.get("sample_seeds"))
            corrupted.append((corruption, batch["attention_mask"], generator_values(generated, corruption)))
            if train:
                self.engine.backward(generated.loss)
                self.engine.step()
        return corrupted

    def discriminator_phase(self, corrupted, train):
        """D over the corrupted micro-batches, reading E_G as it is now (after G's step); D's step at the last
        when training. Returns D's logged values per micro-batch."""
        values = []
        for corruption, mask, _ in corrupted:
            gdes = self.run.embedding_sharing == "gdes"
            rows = generator_rows(self.module.generator, corruption.ids) if gdes else None
            judged = self.d_engine(input_ids=corruption.ids, attention_mask=mask, labels=corruption.replaced,
                                   shared_rows=rows)
            if train:
                self.d_engine.backward(self.run.rtd_lambda * judged.loss)
                self.d_engine.step()
            values.append(discriminator_values(judged, corruption, mask))
        return values

    def _means(self, batches, micro_batches, train):
        """The means of LOGGED over the micro-batches and ranks, as 0-d tensors on the device (no host read)."""
        corrupted = self.generator_phase(batches, micro_batches, train)
        judged = self.discriminator_phase(corrupted, train)
        sums = torch.zeros(len(LOGGED), dtype=torch.float64, device=self.device)
        for (_, _, g_values), d_values in zip(corrupted, judged):
            values = dict(g_values, **d_values)
            values["loss"] = values["mlm_loss"] + self.run.rtd_lambda * values["rtd_loss"]
            sums += torch.stack([values[key].to(torch.float64) for key in LOGGED])
        return dict(zip(LOGGED, reduce_mean(sums / micro_batches)))

    def train_step(self):
        """`accumulation` micro-batches through G and its step, then through D and its step. "loss" is
        L_MLM + rtd_lambda · L_RTD (the two losses the engines stepped on), comparable with joint training."""
        values = self._means(self.train_batches, self.accumulation, train=True)
        # D's own: its rate, its norm, and its skipped (non-finite, fp16) steps, which the loop's rule, reading
        # G's, would not see
        values["discriminator_lr"] = self.d_engine.get_lr()[0]
        values["discriminator_skipped_steps"] = getattr(self.d_engine, "skipped_steps", 0)
        norm = self.d_engine.get_global_grad_norm()
        if norm is not None:  # a float or a 0-d tensor, read with the other values at the log line
            values["discriminator_grad_norm"] = norm
        return values

    def eval_loss(self, batches, steps):
        """The held-out losses (as RTDStepper's: each sample's own seed draws its replacements)."""
        for engine in self.engines:
            engine.eval()
        with torch.no_grad():
            values = self._means(batches, steps * self.accumulation, train=False)
        for engine in self.engines:
            engine.train()
        return {f"val_{key}": value.item() for key, value in values.items()}

    # ------------------------------------------------------------------ checkpoints: one subdirectory per engine
    def save(self, ckpt_dir, tag, client_state):
        for name, engine in zip(ENGINE_DIRS, self.engines):
            write_through_python(engine)
            engine.save_checkpoint(os.path.join(ckpt_dir, tag), tag=name, client_state=client_state,
                                   save_latest=False)

    def load(self, ckpt_dir, tag):
        tag_dir = os.path.join(ckpt_dir, tag)
        states = [load_engine(engine, tag_dir, name) for name, engine in zip(ENGINE_DIRS, self.engines)]
        return states[0]  # the same client state was saved with both
