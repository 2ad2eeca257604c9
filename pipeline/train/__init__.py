"""Pretraining (MLM + EMD, or DeBERTa-v3's replaced token detection): the run config, the engine modes behind
one Stepper interface (zero3, pipeline), checkpoints,
held-out evaluation, monitoring, the checks before a start, `deberta-ds pretrain` and `deberta-ds plan`."""
