"""The optimization policy of both trainers: one rule for the parameter groups, one optimizer, one schedule.

- AdamW with weight decay on the weight matrices only: no decay on biases and LayerNorm weights, as the
  official code (the paper's Table 8: β 0.9/0.999, ε 1e-6, weight decay 0.01).
- The learning rate rises linearly to its peak over the warmup and falls linearly to zero:
      factor(s) = (s + 1) / warmup                 for s < warmup
                = (total - s) / (total - warmup)   for s >= warmup
  where s counts the optimizer steps taken before this one (DeepSpeed steps the schedule after each).
  Update n = s + 1 reaches the peak at n = warmup, as in the official DeBERTa optimizer (xadam's
  warmup_linear over step / total), and every update has a positive rate: the official decay reaches 0 at
  the last update and transformers' schedule starts at 0, each spending one update on nothing.
"""
import torch


def no_decay(name):
    return name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name.lower()


def param_groups(module, weight_decay, lr=None):
    """[decayed weights, the rest without weight decay] of the trainable parameters (with `lr` when given)."""
    decay, plain = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (plain if no_decay(name) else decay).append(param)
    extra = {} if lr is None else {"lr": lr}
    return [dict(params=decay, weight_decay=weight_decay, **extra), dict(params=plain, weight_decay=0.0, **extra)]


def build_optimizer(module, lr, betas, eps, weight_decay, kind="adamw", groups=None):
    """AdamW over param_groups (or the `groups` given: each its own learning rate): torch's (fused on CUDA), or
    "cpu_adam" (DeepSpeedCPUAdam, for optimizer offload to the CPU)."""
    groups = groups if groups is not None else param_groups(module, weight_decay)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adamw_mode=True)
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def warmup_linear_decay(warmup_steps, total_steps):
    """The LR factor of the module docstring, as a function of the steps taken."""
    warmup, total = max(int(warmup_steps), 0), int(total_steps)

    def factor(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def lr_schedule(optimizer, warmup_steps, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(warmup_steps, total_steps))


def build_engine(module, ds, lr, betas, eps, weight_decay, warmup_steps, total_steps, kind="adamw", groups=None):
    """The DeepSpeed engine of a trainer: AdamW over the parameter groups (build_optimizer) on the warmup/decay
    schedule, under the completed DeepSpeed config `ds`."""
    import deepspeed
    optimizer = build_optimizer(module, lr, betas, eps, weight_decay, kind, groups=groups)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds,
                                           lr_scheduler=lr_schedule(optimizer, warmup_steps, total_steps))
    return engine


def follow_new_peak_rates(engine, peak_rates):
    """After a checkpoint load, which restores the schedule's own peak rates: this run's instead (one per
    parameter group, the rates the optimizer was built with), the schedule's factor unchanged."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = list(peak_rates)
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(engine.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates
