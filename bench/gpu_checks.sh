#!/usr/bin/env bash
# Every check that needs a GPU, in one go (about 6 minutes on one H200 before parts 0 and 2 took the fused
# attention; each part has its own time limit), from the repository root:
#   bash bench/gpu_checks.sh            -> reports in $OUT (or ./gpu_out)
#   PARTS="0 2" bash bench/gpu_checks.sh   only those parts
#  0. the Triton kernels on CUDA (bench/gpu_kernels_check.py): the relative bias against the torch path,
#     the fused attention against torch (fp32) and against sdpa at one 1.5B layer (bf16), with timings
#  1. the full 1.5B forward, ours vs transformers, fp32 on the GPU (bench/parity_1p5b.py)
#  2. where a 1.5B training step spends its time: attention alone, whole steps, kernel tables (bench/gpu_profile.py)
#  3. training and inference steps vs transformers, 1.5B, bf16, batch 16 (bench/train_step.py)
#  4. pretraining the 1.5B preset under DeepSpeed ZeRO-3, bf16, one GPU, a few steps (tokens/s, MFU)
#  5. fp16 with DeepSpeed's dynamic loss scaling (the CPU accelerator has no fp16)
#  6. the 1.5B step by ZeRO stage on one GPU: no DeepSpeed, ZeRO-2, ZeRO-3, ZeRO-3 with leaf layers
#     (bench/zero_overhead.py, micro-batch 8, activation checkpointing as in part 4)
#  7. fine-tuning the 1.5B: `deberta-ds finetune` against transformers.Trainer, ZeRO-2 bf16, and ReCoRD's cost
#     (bench/finetune_gpu.sh; not in the default PARTS: about 15 minutes, an estimate, never run yet)
#  8. `--deepspeed auto` with the 1.5B recipe on one GPU: the planner's line (choice and estimated GiB) against the
#     run's memory_gb (max_memory_allocated in GB of 1e9), bf16 chosen by the device, a few steps
# Data for 4-5 and 8: shards of the demo corpus in $GPU_DATA (512- and 128-token). ATTENTION_IMPL (part 3): auto,
# math, eager, sdpa (the default) or fused ("reference", the eager path's old name, is taken as eager).
# DeepSpeed, pytest (part 0 imports tests/unit/test_fused_attention.py) and what they need beyond the
# machine's image come as wheels in .whl/ when the machine has no network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
PARTS="${PARTS:-0 1 2 3 4 5 6 8}"
mkdir -p "$OUT"
GPU_DATA="${GPU_DATA:-.gpu_data}"
ATTENTION_IMPL="${ATTENTION_IMPL:-sdpa}"
[ "$ATTENTION_IMPL" = reference ] && ATTENTION_IMPL=eager
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
part() { [[ " $PARTS " == *" $1 "* ]]; }

if part 0; then
    echo "== 0. Triton kernels: relative bias vs the torch path, fused attention vs torch and vs sdpa"
    timeout 150 python3 bench/gpu_kernels_check.py 2>&1 | tail -20 | tee "$OUT/kernels.txt"
fi

if part 1; then
    echo "== 1. 1.5B parity (fp32, cuda)"
    timeout 80 python3 bench/parity_1p5b.py --device cuda --batch 2 --seq 512 --pad-from 400 2>&1 | tail -5 | tee "$OUT/parity.txt"
fi

if part 2; then
    echo "== 2. profile: attention alone, whole steps (fused and sdpa), kernel tables"
    timeout 180 python3 bench/gpu_profile.py --skip-flex --step-impls fused,sdpa --out "$OUT/profile.txt" \
        > "$OUT/profile.log" 2>&1
    grep -E "^(theirs|eager|sdpa|fused|==|--)" "$OUT/profile.txt"
fi

if part 3; then
    echo "== 3. training and inference vs transformers, batch 16, attention $ATTENTION_IMPL"
    timeout 150 python3 bench/train_step.py --device cuda --preset xxlarge --dtype bf16 --batch 16 --warmup 2 \
        --steps 3 --rounds 2 --attention-impl "$ATTENTION_IMPL" 2>&1 | tail -20 | tee "$OUT/train_step.txt"
fi

if part 4; then
    echo "== 4. pretraining the 1.5B preset, ZeRO-3 bf16, 1 GPU"
    rm -rf /tmp/run_xxl
    timeout 120 python3 -m torch.distributed.run --nproc_per_node 1 -m pipeline.cli pretrain \
        --config xxlarge --deepspeed zero3_bf16 \
        --data-dir "$GPU_DATA/shards512" --output-dir /tmp/run_xxl \
        --set global_batch_size=8 --set micro_batch_size=8 --set max_steps=16 --set log_interval=4 \
        --set save_interval=1000 --set warmup_steps=4 2>&1 | grep -v "^\[20" | tail -15 | tee "$OUT/pretrain_xxlarge.txt"
fi

if part 5; then
    echo "== 5. fp16 with dynamic loss scaling (tiny model, 2 modes)"
    for mode in zero3 pipeline; do
        rm -rf /tmp/run_fp16_$mode
        ds=cpu_zero3_fp32; [ $mode = pipeline ] && ds=cpu_pipeline_fp32
        timeout 45 python3 -m torch.distributed.run --nproc_per_node 1 -m pipeline.cli pretrain \
            --config tiny_cpu --deepspeed $ds --data-dir "$GPU_DATA/shards128" \
            --output-dir /tmp/run_fp16_$mode --set mode=$mode --set max_steps=30 --set log_interval=10 \
            --ds fp16.enabled=true --ds fp16.initial_scale_power=16 2>&1 | grep -v "^\[20" | tail -6 \
            | tee "$OUT/fp16_$mode.txt"
    done
fi
if part 6; then
    echo "== 6. the 1.5B step by ZeRO stage, bf16, 1 GPU, micro-batch 8"
    timeout 300 python3 bench/zero_overhead.py --device cuda --hidden 0 --batch 8 --seq 512 \
        --variants bare,z2,z3,z3_leaf --warmup 2 --steps 3 2>&1 | tail -8 | tee "$OUT/zero_overhead.txt"
fi
if part 7; then
    echo "== 7. fine-tuning the 1.5B against transformers.Trainer (bench/finetune_gpu.sh)"
    OUT="$OUT" bash bench/finetune_gpu.sh
fi
if part 8; then
    echo "== 8. --deepspeed auto, the 1.5B recipe (micro-batch up to 16), 1 GPU"
    rm -rf /tmp/run_auto
    timeout 180 python3 -m torch.distributed.run --nproc_per_node 1 -m pipeline.cli pretrain \
        --config xxlarge --deepspeed auto --data-dir "$GPU_DATA/shards512" --output-dir /tmp/run_auto \
        --set global_batch_size=16 --set max_steps=4 --set log_interval=2 --set warmup_steps=2 \
        2>&1 | grep -v "^\[20" | grep -E "^(deepspeed auto|pretrain:|step|error)" | tee "$OUT/pretrain_auto.txt"
    rm -rf /tmp/run_auto
fi
ls -la "$OUT"
