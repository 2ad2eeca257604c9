#!/usr/bin/env bash
# The fine-tuning benches (python -m bench.finetune_compare, bench.finetune_record) on one GPU with the 1.5B preset (xxlarge: 48 layers, hidden 1536, vocab 128100):
# `deberta-ds finetune` against transformers.Trainer + DebertaV2ForSequenceClassification, both under
# ds_configs/finetune_zero2_bf16.json (ZeRO-2, bf16; the Trainer gets bf16=True to match the config), on
# shorter synthetic data than the CPU default. From the repository root:
#   bash bench/finetune_gpu.sh                 -> tables on stdout, JSON and logs in $OUT (or ./gpu_out)
#   TASKS=RTE bash bench/finetune_gpu.sh       fewer tasks (default BoolQ,RTE,CB)
#   BEFORE_TREE=/path/to/d199d30 bash ...      also the ReCoRD part against that checkout's code
# How long: not run yet (written on a machine without a GPU). Estimated on one H200: about 2 minutes of setup
# (building the 1.5B model on the GPU and writing three ~6 GB releases), then about 1 minute per run (loading
# the release and starting DeepSpeed dominate; 256 examples x 1 epoch is 16 optimizer steps), 4 variants x
# 3 tasks: about 15 minutes in all; the ReCoRD part (64 queries at max_seq_len 512, one epoch per tree) a
# few minutes more per tree. Each part has its own time limit below.
# What it prints: for compare, the header (model, parameters, settings, tokens per task), one line per run,
# then a markdown table per task and variant: training seconds, examples/s, tokens/s, the ratios to the
# Trainer without and with length grouping, padding, peak host RSS, the first and last epoch's training
# loss; then SiFT's cost (ours_sift over ours) and the peak GPU memory of every run (nvidia-smi, MiB).
# For record: rows per query and epoch time of the current tree and of BEFORE_TREE.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
TASKS="${TASKS:-BoolQ,RTE,CB}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PYTHON="${PYTHON_VENV:-.venv/bin/python}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
COMMON=(--model xxlarge --deepspeed finetune_zero2_bf16 --batch-size 16 --lr 1e-5 --warmup-steps 4 --seed 42)

echo "== 1. fine-tuning: ours vs transformers.Trainer, 1.5B, ZeRO-2 bf16, one GPU"
timeout 1500 "$PYTHON" -m bench.finetune_compare "${COMMON[@]}" --tasks "$TASKS" --train-examples 256 \
    --val-examples 16 --epochs 1 --rounds 1 --max-seq-len 256 --work-dir "$OUT/finetune_work" \
    --json "$OUT/finetune.json" 2>&1 | tee "$OUT/finetune.txt"

echo "== 2. ReCoRD: rows per query and one epoch, 1.5B"
BEFORE=()
[ -n "${BEFORE_TREE:-}" ] && BEFORE=(--before-tree "$BEFORE_TREE")
timeout 900 "$PYTHON" -m bench.finetune_record "${COMMON[@]}" "${BEFORE[@]}" --train-examples 64 --val-examples 8 \
    --max-seq-len 512 --work-dir "$OUT/record_work" --json "$OUT/record.json" 2>&1 | tee "$OUT/record.txt"
# the releases (~6 GB each) are not results
rm -rf "$OUT"/finetune_work/release_* "$OUT"/record_work/release_*
