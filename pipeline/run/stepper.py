"""The interface the run loop (loop.py) drives: a Stepper is one trainer's way of taking an optimizer step.

Pretraining's modes (pipeline/train/modes.py: ZeRO, pipe, rtd) and fine-tuning's task stepper
(pipeline/finetune/stepper.py) implement it; the loop never asks which one runs.

  train_step()                 one optimizer step over a global batch -> {"loss": ..., other values}, the same on
                               every rank (means over the data-parallel ranks); values may be floats or 0-d tensors
  state(step)                  what the stepper adds to a checkpoint's client state at `step` (its data position)
  restore(state, step)         take that state back after a checkpoint was loaded (or start: {}, step 0)
  save(dir, tag, state) / load(dir, tag)     the engine(s)' own checkpoint files, with `state` as client state
  lr, grad_norm, loss_scale, skipped_steps, device, describe()
"""
import abc


class Stepper(abc.ABC):
    device = "cpu"

    @abc.abstractmethod
    def train_step(self):
        """One optimizer step; returns the logged values ("loss" at least)."""

    @abc.abstractmethod
    def save(self, ckpt_dir, tag, client_state):
        """Write the engine(s)' checkpoint files of `tag` into ckpt_dir."""

    @abc.abstractmethod
    def load(self, ckpt_dir, tag):
        """Load the engine(s) from `tag`; returns the client state saved with it."""

    def state(self, step):
        return {}

    def restore(self, state, step):
        """Take back what state() saved, at the checkpoint's step (a fresh run: state {} and step 0)."""

    def describe(self):
        """What the start banner says about this engine beyond mode, precision and ZeRO stage."""
        return ""

    @property
    def lr(self):
        return None

    @property
    def grad_norm(self):
        return None

    @property
    def loss_scale(self):
        return None

    @property
    def skipped_steps(self):
        return 0


class EngineStepper(Stepper, abc.ABC):
    """A stepper over one DeepSpeed engine (`self.engine`): its checkpoint and its optimizer's numbers."""

    engine = None

    @property
    def device(self):
        return self.engine.device

    def save(self, ckpt_dir, tag, client_state):
        from pipeline.run.checkpointer import write_through_python
        write_through_python(self.engine)
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)

    def load(self, ckpt_dir, tag):
        from pipeline.run.checkpointer import load_engine
        return load_engine(self.engine, ckpt_dir, tag)

    @property
    def lr(self):
        return self.engine.get_lr()[0]

    @property
    def skipped_steps(self):
        return getattr(self.engine, "skipped_steps", 0)

    @property
    def grad_norm(self):
        norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        return _as_float(norm)

    @property
    def loss_scale(self):
        optimizer = getattr(self.engine, "optimizer", None)
        return _as_float(getattr(optimizer, "cur_scale", None) or getattr(optimizer, "loss_scale", None))


def _as_float(value):
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
