"""Benchmarks: speed and memory, each measured against its reference in the same run, never asserted. Run from
the repository root as `python -m bench.NAME` (`--help` says what each measures and takes); figures and
their commands are in docs/benchmarks.md. Correctness checks that need a GPU are tests, not benches
(tests/gpu, `pytest -m gpu`); bench/gpu_checks.sh runs them with the GPU benches.

  train_step       training and inference steps against transformers (`make bench`)
  preprocess       preprocessing and the loader against raw sentencepiece
  zero_overhead    DeepSpeed's cost per step by ZeRO stage
  pipeline_step    pipeline mode's step, 2 CPU ranks          (shared: runs.py)
  rtd_step         an RTD step against an MLM + EMD step       (shared: runs.py)
  objectives       MLM + EMD against RTD + GDES for the same time, then fine-tuned
  finetune_compare `deberta-ds finetune` against transformers.Trainer  (shared: finetune_common.py)
  finetune_record  ReCoRD's rows per query and epoch time against another tree
  padding          padding with and without length grouping
  attention        one layer's attention, forward + backward, against sdpa and the PyPI kernels (CUDA)
  gpu_profile      where a 1.5B step spends its GPU time (CUDA)
  gpu_summary      the one table that ends bench/gpu_checks.sh

Commands start through the launch harness (tests/helpers/launch.py); synthetic SuperGLUE data come from
tests/helpers/superglue.py.
"""
