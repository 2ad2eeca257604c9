#!/bin/bash
# chain.sh - submit the whole pipeline as Slurm jobs chained with --dependency=afterok:
#   preprocess (job array) -> pretrain (multi-node, requeues itself) -> convert -> finetune (optional)
# Each job starts only when the one before it completed successfully; if one fails, the rest are
# cancelled (--kill-on-invalid-dep=yes) instead of waiting forever. Run it on a login node (not in
# a job); it returns as soon as everything is submitted.
#
#   WORK=/runs/xxl INPUT='/data/corpus/*.txt' TOKENIZER=/data/spm.model \
#   RUN_CONFIG=configs/pretrain_xxlarge.json DS_CONFIG=ds_configs/zero1_bf16.json \
#   PRETRAIN_SBATCH="--nodes=8 --ntasks-per-node=8 --gpus-per-node=8" slurm/chain.sh
#
# Settings (environment):
#   WORK                root of this chain's outputs (required): WORK/shards, WORK/run,
#                       WORK/release, WORK/finetune-TASK
#   INPUT, TOKENIZER    preprocessing inputs (see preprocess.sbatch); or DATA_DIR=existing shards
#                       to skip preprocessing
#   ARRAY               preprocessing array range (default 0-3)
#   RUN_CONFIG, DS_CONFIG, LAUNCHER   pretraining (see pretrain.sbatch)
#   PREPROCESS_ARGS, PRETRAIN_ARGS, CONVERT_ARGS, FINETUNE_ARGS
#                       extra arguments of each command (each job's EXTRA_ARGS)
#   FINETUNE_TASK, FINETUNE_DATA   set both to add a fine-tuning job (e.g. CB, /data/superglue)
#   FINETUNE_DS_CONFIG  DeepSpeed config of the fine-tuning job (default: finetune's own)
#   SBATCH_ARGS         sbatch options for every job (e.g. "--partition=gpu --account=proj")
#   PREPROCESS_SBATCH, PRETRAIN_SBATCH, CONVERT_SBATCH, FINETUNE_SBATCH   sbatch options per job
#   DEBERTA_DS_PYTHON   python for the jobs (default: python3 on the compute nodes)
#   DEBERTA_DS_WORKDIR  the checkout the jobs run from (default: the one this script is in)
# Output: one line "CHAIN preprocess=ID pretrain=ID convert=ID [finetune=ID]" (preprocess=- when
# skipped), then squeue's view of them. Exit 2 on bad settings, before anything is submitted.
set -euo pipefail
SCRIPT=chain.sh
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

if [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "$SCRIPT: note: running inside job $SLURM_JOB_ID; the jobs are submitted independently of it" >&2
fi
command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
export DEBERTA_DS_WORKDIR=${DEBERTA_DS_WORKDIR:-$HERE}
# The jobs run in DEBERTA_DS_WORKDIR: make every path absolute relative to where we are now.
abs() { realpath -m -- "$1"; }

[ -n "${WORK:-}" ] || die "WORK is not set (root directory of this chain's outputs)"
WORK=$(abs "$WORK")
for v in RUN_CONFIG DS_CONFIG; do
  [ -n "${!v:-}" ] || die "$v is not set"
  [ "$v" = DS_CONFIG ] && [ "${!v}" = auto ] && continue  # planned by pretrain (--deepspeed auto)
  [ -f "${!v}" ] || die "$v=${!v}: no such file"
  printf -v "$v" '%s' "$(abs "${!v}")"
done
if [ -n "${DATA_DIR:-}" ]; then
  [ -d "$DATA_DIR" ] || die "DATA_DIR=$DATA_DIR: no such directory"
  SHARDS=$(abs "$DATA_DIR")
else
  SHARDS=$WORK/shards
  [ -n "${TOKENIZER:-}" ] && [ -f "$TOKENIZER" ] || die "TOKENIZER=${TOKENIZER:-} is not a file (spm.model), or set DATA_DIR"
  [ -n "${INPUT:-}" ] || die "INPUT is not set (a quoted glob of corpus files), or set DATA_DIR"
  compgen -G "$INPUT" >/dev/null || die "INPUT=$INPUT matches no file"
  TOKENIZER=$(abs "$TOKENIZER")
  case "$INPUT" in /*) ;; *) INPUT=$PWD/$INPUT ;; esac
fi
if [ -n "${FINETUNE_TASK:-}" ] || [ -n "${FINETUNE_DATA:-}" ]; then
  [ -n "${FINETUNE_TASK:-}" ] && [ -n "${FINETUNE_DATA:-}" ] || die "set both FINETUNE_TASK and FINETUNE_DATA"
  [ -d "$FINETUNE_DATA" ] || die "FINETUNE_DATA=$FINETUNE_DATA: no such directory"
  FINETUNE_DATA=$(abs "$FINETUNE_DATA")
  if [ -n "${FINETUNE_DS_CONFIG:-}" ]; then
    [ -f "$FINETUNE_DS_CONFIG" ] || die "FINETUNE_DS_CONFIG=$FINETUNE_DS_CONFIG: no such file"
    FINETUNE_DS_CONFIG=$(abs "$FINETUNE_DS_CONFIG")
  fi
fi
mkdir -p "$WORK/logs"

# submit VAR=VALUE... -- SBATCH-OPTIONS... SCRIPT: prints the job id. The settings travel as
# environment (sbatch exports the submitting environment to the job).
submit() {
  local -a envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  # shellcheck disable=SC2086  # option strings are split at spaces on purpose
  env "${envs[@]}" sbatch --parsable --kill-on-invalid-dep=yes ${SBATCH_ARGS:-} "$@" | cut -d';' -f1
}

dep=()
PRE=-
if [ -z "${DATA_DIR:-}" ]; then
  # shellcheck disable=SC2086
  PRE=$(submit INPUT="$INPUT" TOKENIZER="$TOKENIZER" OUTPUT_DIR="$SHARDS" EXTRA_ARGS="${PREPROCESS_ARGS:-}" -- \
    --array="${ARRAY:-0-3}" --output="$WORK/logs/preprocess-%A_%a.out" ${PREPROCESS_SBATCH:-} \
    "$HERE/slurm/preprocess.sbatch")
  dep=(--dependency="afterok:$PRE")
fi
# shellcheck disable=SC2086
PRETRAIN=$(submit RUN_CONFIG="$RUN_CONFIG" DS_CONFIG="$DS_CONFIG" DATA_DIR="$SHARDS" OUTPUT_DIR="$WORK/run" \
  LAUNCHER="${LAUNCHER:-srun}" EXTRA_ARGS="${PRETRAIN_ARGS:-}" -- \
  "${dep[@]}" --output="$WORK/logs/pretrain-%j.out" ${PRETRAIN_SBATCH:-} "$HERE/slurm/pretrain.sbatch")
# shellcheck disable=SC2086
CONVERT=$(submit CHECKPOINT="$WORK/run/checkpoints" RELEASE_DIR="$WORK/release" EXTRA_ARGS="${CONVERT_ARGS:-}" -- \
  --dependency="afterok:$PRETRAIN" --output="$WORK/logs/convert-%j.out" ${CONVERT_SBATCH:-} \
  "$HERE/slurm/convert.sbatch")
line="CHAIN preprocess=$PRE pretrain=$PRETRAIN convert=$CONVERT"
if [ -n "${FINETUNE_TASK:-}" ]; then
  # shellcheck disable=SC2086
  FT=$(submit TASK="$FINETUNE_TASK" RELEASE_DIR="$WORK/release" DATA_DIR="$FINETUNE_DATA" \
    OUTPUT_DIR="$WORK/finetune-$FINETUNE_TASK" EXTRA_ARGS="${FINETUNE_ARGS:-}" DS_CONFIG="${FINETUNE_DS_CONFIG:-}" -- \
    --dependency="afterok:$CONVERT" --output="$WORK/logs/finetune-%j.out" ${FINETUNE_SBATCH:-} \
    "$HERE/slurm/finetune.sbatch")
  line+=" finetune=$FT"
fi
echo "$line"
squeue -h -o '%.12i %.10P %.20j %.8T %R' -u "$(id -un)" 2>/dev/null || true
