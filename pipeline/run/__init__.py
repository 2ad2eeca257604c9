"""What every trainer shares: the run loop and what it drives.

  loop.py          the one training loop: steps, the non-finite rule, logging, hooks, checkpoints, signals
  stepper.py       the interface a trainer implements (one optimizer step, its state, its engine's numbers)
  checkpointer.py  checkpoints: DeepSpeed's files, every rank's RNG, the manifest, fallback, interval, keep_last
  monitor.py       TensorBoard, metrics.jsonl, the progress bar and the rank-0 log lines
  lifecycle.py     exit codes, signals, the run lock, agreeing across ranks, seeding, the deliberate exit
  ds_config.py     the DeepSpeed config: read, overridden, checked and completed by one rule
  optim.py         one parameter-group rule, AdamW, one warmup/decay schedule, the engine built from them

Pretraining (pipeline/train/) and fine-tuning (pipeline/finetune/) are steppers this package drives; it imports
neither of them.
"""
