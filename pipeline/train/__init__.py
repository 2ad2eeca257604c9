"""Pretraining: the run config, the engine modes behind one Stepper interface (zero3, pipeline), checkpoints,
held-out evaluation, monitoring, the checks before a start, `deberta-ds pretrain` and `deberta-ds plan`."""
