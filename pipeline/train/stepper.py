"""The interface of pretraining's engine modes (the modes are built by engine.py): `pretrain` and the held-out evaluation call a Stepper
and never ask which mode runs.

  zero3     Zero3Stepper (zero3.py): the plain `DebertaForMaskedLM` under a DeepSpeedEngine; ZeRO stage from
            the DeepSpeed config (3 for the 1.5B preset: built under `deepspeed.zero.Init`, so no rank ever
            holds the full model). Objective rtd: RTDStepper (rtd.py), generator and discriminator as one
            module under one engine
  pipeline  PipelineStepper (pipeline_parallel.py): the same blocks as a PipelineModule with ZeRO-0/1
            (DeepSpeed's pipeline engine refuses ZeRO-2/3: the two modes are alternatives)

A Stepper is built from the run config, the completed DeepSpeed config and the model config, and gives
  dp_rank, dp_size          this rank's place among the data-parallel replicas (the loader's slice)
  batches(loader)           the loader's micro-batches in the form its engine reads
  train_step(batches)       one optimizer step over a global batch -> {"loss", "mlm_accuracy"} (rtd also
                            the generator's and discriminator's losses and accuracies, the replaced share),
                            the same on every rank (the mean over the data-parallel ranks)
  eval_loss(batches, n)     the held-out loss over n global batches, no gradients -> {"val_loss", ...}
  save(dir, tag, state) / load(dir, tag)   DeepSpeed's checkpoint with our client state
  lr, grad_norm, loss_scale, skipped_steps, describe()
"""
from pipeline.train.checkpoint import SingleEngine


class Stepper(SingleEngine):
    mode = None

    @staticmethod
    def prepare_ds_config(run, ds, source):
        """What this mode adds to or refuses in a completed DeepSpeed config (before DeepSpeed starts)."""
        return ds

    def describe(self):
        """What the start banner says about this engine beyond mode, precision and ZeRO stage."""
        return ""

    # the optimizer's state, for the log
    @property
    def lr(self):
        return self.engine.get_lr()[0]

    @property
    def skipped_steps(self):
        return getattr(self.engine, "skipped_steps", 0)

    @property
    def grad_norm(self):
        norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        try:
            return float(norm) if norm is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def loss_scale(self):
        optimizer = getattr(self.engine, "optimizer", None)
        scale = getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None)
        try:
            return float(scale) if scale is not None else None
        except (TypeError, ValueError):
            return None

