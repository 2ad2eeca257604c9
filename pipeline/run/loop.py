"""The one training loop: pretraining and fine-tuning are steppers (stepper.py) it drives.

Each step: the stepper's optimizer step; the monitor's records (every step's loss in metrics.jsonl, a log line
and TensorBoard scalars every log_interval steps); the non-finite rule; the trainer's hooks (held-out
evaluation, fine-tuning's epoch end and best release); a checkpoint when due or when the ranks agree that a
signal came (SIGTERM/SIGUSR1), then exit 75 so the same command continues the run.

The non-finite rule, the same for both trainers: in fp32 and bf16 the first non-finite loss stops the run
with exit 3 and no checkpoint is written after it (the last one is from before the fault); in fp16 DeepSpeed
skips a step whose loss or gradients overflowed and lowers the loss scale, so the run stops only after
`max_nonfinite_steps` skipped steps in a row.
"""
import math
from dataclasses import dataclass

from pipeline.run.lifecycle import EXIT_NONFINITE, EXIT_OK, EXIT_REQUEUE, StopFlag, any_rank, inject_fault


@dataclass
class LoopSettings:
    total_steps: int
    log_interval: int
    precision: str = "fp32"         # of the DeepSpeed config: decides the non-finite rule
    max_nonfinite_steps: int = 20   # fp16: skipped steps in a row before the run stops
    lower_lr_hint: str = "Resume from the last checkpoint with a lower lr (--set lr=...; applied from there)."


class NonFiniteRule:
    def __init__(self, precision, max_nonfinite_steps):
        self.precision, self.limit, self.in_a_row = precision, max_nonfinite_steps, 0

    def stops(self, loss, skipped):
        """Whether the run stops after a step with this loss (skipped: DeepSpeed skipped the step, fp16)."""
        self.in_a_row = self.in_a_row + 1 if (not math.isfinite(loss) or skipped) else 0
        return bool(self.in_a_row) and (self.precision != "fp16" or self.in_a_row >= self.limit)


class Hook:
    """Work the loop runs after a step when `due(step)` says so (evaluation, an epoch's end). The loop reads the
    steps' pending values first, so a hook never acts on a model that a non-finite step already broke."""

    def __init__(self, due, run):
        self.due, self.run = due, run


def train(stepper, checkpointer, monitor, start_step, settings, hooks=(), client_state=lambda step: {}):
    """Run steps start_step+1 .. settings.total_steps; returns the exit code (0, 3 or 75).

    hooks: Hooks run in order after each step's records. client_state(step): what the trainer keeps in a
    checkpoint beyond the stepper's own state.

    No host sync inside a step: the stepper's values stay on the device, and the loop reads the pending steps'
    values together (one transfer) at a log line, before a hook or a checkpoint, and at the end. The
    non-finite rule is applied to each pending step in order at that read, so the first bad step is the one
    named, and no checkpoint or hook ever follows it. Signals are agreed every step on the host only."""
    rank = checkpointer.rank
    stop = StopFlag()
    nonfinite = NonFiniteRule(settings.precision, settings.max_nonfinite_steps)
    pending = []  # (step, {name: 0-d tensor or number}, skipped) not yet read

    def read_pending():
        """Every pending step's values on the host, its loss recorded; False when the non-finite rule stops."""
        if not pending:
            return True
        names = sorted({k for _, values, _ in pending for k, v in values.items() if v is not None})
        table = _to_host([[values.get(k) for k in names] for _, values, _ in pending])
        steps = [(step, dict(zip(names, row)), skipped) for (step, _, skipped), row in zip(pending, table)]
        pending.clear()
        for step, values, skipped in steps:
            monitor.step(step, values)
            if nonfinite.stops(values["loss"], skipped):
                monitor.say(f"error: {nonfinite.in_a_row} non-finite or skipped step(s) in a row at step {step} "
                            f"({settings.precision}); stopping without saving. {settings.lower_lr_hint}")
                return False
        return steps[-1][1]

    step = start_step
    while step < settings.total_steps:
        skipped_before = stepper.skipped_steps
        values = stepper.train_step()
        step += 1
        pending.append((step, values, stepper.skipped_steps > skipped_before))
        last = step == settings.total_steps
        logged = step % settings.log_interval == 0 or last
        inject_fault(step, rank, kinds=("signal",))
        signalled = any_rank(stop.raised is not None)
        due_hooks = [hook for hook in hooks if hook.due(step)]
        saving = checkpointer.due(step, settings.total_steps) or signalled
        if logged or due_hooks or saving:
            read = read_pending()
            if read is False:
                return EXIT_NONFINITE
            if logged:
                monitor.log(step, dict(read, lr=stepper.lr, grad_norm=stepper.grad_norm,
                                       loss_scale=stepper.loss_scale, skipped_steps=stepper.skipped_steps))
        for hook in due_hooks:
            hook.run(step)
        if saving:
            saved = checkpointer.save(stepper, step, dict(stepper.state(step), **client_state(step)))
            monitor.say(f"saved checkpoint {saved}")
        inject_fault(step, rank)
        if signalled:
            monitor.say(f"stopping on {stop.raised or 'a signal on another rank'} after step {step}: checkpoint "
                        f"saved; exit {EXIT_REQUEUE} (run again to resume)")
            return EXIT_REQUEUE
    return EXIT_OK if read_pending() is not False else EXIT_NONFINITE


def _to_host(rows):
    """Rows of 0-d tensors and numbers as Python numbers, with one device-to-host transfer for the tensors."""
    import torch
    tensors = [v for row in rows for v in row if torch.is_tensor(v)]
    if tensors:
        host = iter(torch.stack([t.detach().to(torch.float64).reshape(()) for t in tensors]).tolist())
    return [[next(host) if torch.is_tensor(v) else v for v in row] for row in rows]
