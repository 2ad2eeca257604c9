#!/usr/bin/env bash
# Everything that needs a GPU, from the repository root, ending with ONE summary table (bench/gpu_summary.py):
#   bash bench/gpu_checks.sh                    the default parts: under 8 minutes on one H200 (their time limits
#                                               below add up to 475 s), reports in $OUT (or ./gpu_out)
#   PARTS="tests attention_512" bash bench/gpu_checks.sh    only those parts
# Default parts, each with its own time limit (a part that runs out shows as "time limit" in the table):
#   data            shards of the demo corpus for pretrain and fp16, in $GPU_DATA (only when missing)
#   tests           the GPU tests (pytest -m gpu tests/gpu): `fused` attention on CUDA against `math` in fp32
#                   (1e-4) and against `sdpa` in bf16, the relative-bias kernels, the attention dropout, the 1.5B
#                   forward against transformers
#   step            ours' training step of the 1.5B, bf16, batch 16 x 512: tokens/s and MFU (bench/train_step.py)
#   pretrain        `deberta-ds pretrain` of the 1.5B preset, --deepspeed auto (the planner's stage and micro-batch),
#                   bf16, one GPU, seq 512: tokens/s and MFU
#   attention_512   one 1.5B attention layer, forward + backward, L=512: `fused` against `sdpa` (bench/attention.py)
#   attention_long  the same at L=2048, 4096, 8192: `fused` against PyPI's flashdeberta and disentangled-flash
# More parts, by name (not in the default, so not timed into the 8 minutes):
#   profile         where a 1.5B step spends its time: kernel tables (bench/gpu_profile.py)
#   vs_transformers training and inference steps against transformers, 1.5B, bf16, batch 16 (bench/train_step.py)
#   fp16            fp16 with DeepSpeed's dynamic loss scaling (the CPU accelerator has no fp16), both modes
#   zero            the 1.5B step by ZeRO stage (bench/zero_overhead.py, micro-batch 8)
#   finetune        fine-tuning the 1.5B against transformers.Trainer, and ReCoRD (bench/finetune_gpu.sh)
# ATTENTION_IMPL (step, vs_transformers): auto, math, eager, sdpa (the default) or fused.
# DeepSpeed, pytest, flashdeberta, disentangled-flash and what they need beyond the machine's image come as
# wheels in .whl/ when the machine has no network (on one with: pip download -d .whl flashdeberta
# disentangled-flash, and the like); they are installed into /tmp/site when one of them does not import.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
PARTS="${PARTS:-data tests step pretrain attention_512 attention_long}"
GPU_DATA="${GPU_DATA:-.gpu_data}"
ATTENTION_IMPL="${ATTENTION_IMPL:-sdpa}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
: > "$OUT/parts.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import deepspeed, pytest, flashdeberta, disentangled_flash" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
part() { [[ " $PARTS " == *" $1 "* ]]; }

# run_part NAME LIMIT COMMAND...: the command's output in $OUT/NAME.txt (its end shown here), and a line
# "NAME exit-code seconds" in $OUT/parts.tsv for the summary
run_part() {
    local name=$1 limit=$2 start=$SECONDS code
    shift 2
    echo "== $name (at most $limit s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    code=$?
    grep -v "^\[20" "$OUT/$name.txt" | tail -12
    printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" >> "$OUT/parts.tsv"
}

# the demo corpus, a 1000-piece tokenizer and 512- and 128-token shards (pretrain and fp16 read them)
make_data() {
    [ -f "$GPU_DATA/shards512/spm.model" ] && [ -f "$GPU_DATA/shards128/spm.model" ] && return 0
    "$PY" -m pipeline.cli corpus --output "$GPU_DATA/corpus" --max-bytes 2000000 &&
    "$PY" -m pipeline.cli tokenizer train --input "$GPU_DATA/corpus/*" --output "$GPU_DATA/spm" --vocab-size 1000 &&
    for len in 512 128; do
        "$PY" -m pipeline.cli preprocess --input "$GPU_DATA/corpus/*" --tokenizer "$GPU_DATA/spm.model" \
            --output-dir "$GPU_DATA/shards$len" --max-seq-len $len --workers 8 --no-progress || return 1
    done
}

# `deberta-ds pretrain` of the 1.5B on one GPU; its metrics.jsonl is kept in $OUT (the checkpoint is not)
pretrain_xxlarge() {
    rm -rf /tmp/run_xxl "$OUT/pretrain_xxlarge"
    "$PY" -m torch.distributed.run --nproc_per_node 1 -m pipeline.cli pretrain --config xxlarge \
        --deepspeed auto --data-dir "$GPU_DATA/shards512" --output-dir /tmp/run_xxl \
        --set global_batch_size=16 --set max_steps=16 --set log_interval=4 \
        --set save_interval=1000 --set warmup_steps=4
    local code=$?
    mkdir -p "$OUT/pretrain_xxlarge" && cp /tmp/run_xxl/metrics.jsonl "$OUT/pretrain_xxlarge/" 2>/dev/null
    return $code
}

fp16_modes() {
    local mode ds code=0
    for mode in zero3 pipeline; do
        rm -rf /tmp/run_fp16_$mode
        ds=cpu_zero3_fp32; [ $mode = pipeline ] && ds=cpu_pipeline_fp32
        "$PY" -m torch.distributed.run --nproc_per_node 1 -m pipeline.cli pretrain --config tiny_cpu \
            --deepspeed $ds --data-dir "$GPU_DATA/shards128" --output-dir /tmp/run_fp16_$mode --set mode=$mode \
            --set max_steps=30 --set log_interval=10 --ds fp16.enabled=true --ds fp16.initial_scale_power=16 || code=1
    done
    return $code
}

export OUT GPU_DATA PY
export -f make_data pretrain_xxlarge fp16_modes  # timeout runs programs: these through bash -c
part data && run_part data 40 bash -c make_data
part tests && run_part tests 150 "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
part step && run_part step 60 "$PY" -m bench.train_step --device cuda --preset xxlarge --dtype bf16 --mode train \
    --variants ours_emd --batch 16 --warmup 2 --steps 3 --rounds 2 --attention-impl "$ATTENTION_IMPL" \
    --json "$OUT/train_step.json"
part pretrain && run_part pretrain 120 bash -c pretrain_xxlarge
part attention_512 && run_part attention_512 45 "$PY" -m bench.attention --lengths 512 --paths sdpa,fused \
    --json "$OUT/attention_512.json"
part attention_long && run_part attention_long 60 "$PY" -m bench.attention --lengths 2048,4096,8192 \
    --paths fused,flashdeberta,disentangled-flash --json "$OUT/attention_long.json"

part profile && run_part profile 180 "$PY" -m bench.gpu_profile --skip-flex --step-impls fused,sdpa \
    --out "$OUT/profile_report.txt"
part vs_transformers && run_part vs_transformers 150 "$PY" -m bench.train_step --device cuda --preset xxlarge \
    --dtype bf16 --batch 16 --warmup 2 --steps 3 --rounds 2 --attention-impl "$ATTENTION_IMPL"
part fp16 && run_part fp16 90 bash -c fp16_modes
part zero && run_part zero 300 "$PY" -m bench.zero_overhead --device cuda --hidden 0 --batch 8 --seq 512 \
    --variants bare,z2,z3,z3_leaf --warmup 2 --steps 3
part finetune && run_part finetune 2500 env OUT="$OUT" bash bench/finetune_gpu.sh

echo
"$PY" -m bench.gpu_summary "$OUT" | tee "$OUT/summary.md"
