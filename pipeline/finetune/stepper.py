"""Fine-tuning as a stepper of the run loop (pipeline/run/loop.py): DeepSpeed's engine plus the task's loss
(and SiFT's adversarial term, pipeline/finetune/sift.py).

The run is counted in optimizer steps: step s (1-based) is the ((s-1) % steps_per_epoch + 1)-th step of epoch
(s-1) // steps_per_epoch + 1, so the loop's step alone says where the run is, and a checkpoint needs only the
epoch's loss sums beside it. Each epoch's micro-batches are a function of (seed, epoch)
(pipeline/finetune/batches.py), the same on any number of ranks.
"""
import torch

from pipeline.finetune.batches import epoch_micro_batches, feature_length, padding_fraction
from pipeline.finetune.features import collate
from pipeline.finetune.inference import to_device
from pipeline.run.lifecycle import reduce_mean
from pipeline.run.optim import build_engine
from pipeline.run.stepper import EngineStepper

LOGGED = ("loss", "task_loss", "adv_loss")


class FinetuneStepper(EngineStepper):
    def __init__(self, model, ds, settings, features, sift_options, rank, world_size):
        import math
        from pipeline.finetune.sift import SiFT
        self.settings, self.features, self.rank, self.world_size = settings, features, rank, world_size
        self.lengths = [feature_length(f) for f in features]
        self.accumulation = ds["gradient_accumulation_steps"]
        self.steps_per_epoch = math.ceil(len(features) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.engine = build_engine(model, ds, settings.lr, settings.adam_betas, settings.adam_eps,
                                   settings.weight_decay, settings.warmup_steps, self.total_steps)
        self.sift = SiFT(self.engine.module, **sift_options)
        self.epoch, self.micro_batches, self.padding = None, [], 0.0
        self.sums = None                   # this rank's loss sums over the epoch's micro-batches so far
        self.position = 0                  # the next micro-batch of the epoch

    def epoch_of(self, step):
        """The epoch (1-based) that optimizer step `step` (1-based) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def start_epoch(self, epoch, position=0, sums=None):
        self.engine.train()  # a release loads in eval mode, and the epoch before ended with an evaluation
        self.epoch, self.position = epoch, position
        self.micro_batches, _, every_rank = epoch_micro_batches(self.lengths, self.settings, epoch, self.rank,
                                                                self.world_size)
        self.padding = padding_fraction([[self.features[i] for i in piece] for piece in every_rank])
        self.sums = torch.tensor(sums if sums is not None else [0.0] * len(LOGGED), dtype=torch.float64,
                                 device=self.device)

    def train_step(self):
        """`accumulation` micro-batches of the current epoch, DeepSpeed stepping at the boundary; the values are
        the means over the step's micro-batches and the ranks, left on the device (0-d tensors)."""
        if self.position >= len(self.micro_batches):
            self.start_epoch(self.epoch + 1)
        step_sums = torch.zeros(len(LOGGED), dtype=torch.float64, device=self.device)
        for _ in range(self.accumulation):
            batch = to_device(collate([self.features[i] for i in self.micro_batches[self.position]]), self.device)
            out = self.sift.loss(batch, forward=self.engine)
            self.engine.backward(out.loss)
            self.engine.step()
            adv = torch.zeros_like(out.task_loss) if out.adv_loss is None else out.adv_loss
            values = torch.stack([out.loss.detach(), out.task_loss.detach(), adv.detach()]).to(torch.float64)
            self.sums += values
            step_sums += values
            self.position += 1
        return dict(zip(LOGGED, reduce_mean(step_sums / self.accumulation)))

    def epoch_losses(self):
        """(train, task, adversarial) loss of the epoch: the mean over its micro-batches and the ranks."""
        return reduce_mean(self.sums / max(len(self.micro_batches), 1)).tolist()

    def state(self, step):
        """Every rank's loss sums of the epoch in flight (DeepSpeed keeps rank 0's client state only)."""
        import torch.distributed as dist
        sums = [None] * self.world_size
        dist.all_gather_object(sums, self.sums.tolist())  # read at a checkpoint only
        return {"epoch": self.epoch, "batch": self.position, "sums": sums}

    def restore(self, state, step):
        epoch = self.epoch_of(step + 1)
        if state.get("epoch") == epoch:  # stopped inside this epoch: its micro-batches so far and their losses
            self.start_epoch(epoch, state["batch"], state["sums"][self.rank])
        else:
            self.start_epoch(epoch)
