# common.sh - shared pieces of the slurm/*.sbatch scripts. Sourced, not run:
#
#   . "$WORKDIR/slurm/common.sh"     (after the script checked it runs inside an allocation)
#
# sbatch copies a batch script into slurmd's spool directory before running it, so a script cannot
# find this file next to itself: each script locates the checkout first (DEBERTA_DS_WORKDIR, else
# the directory sbatch was called in) and sources it from there.
#
# Provides: log, die (exit 2: refused before anything started), setup_python (PY, PYTHONPATH,
# runtime defaults), need_file/need_dir, and run_step (run a job step in the background, forward
# SIGUSR1/SIGTERM to it as SIGUSR1, return its exit status; see there).

log() { echo "[$SCRIPT $(date +%T)] $*"; }
# Validation failures: one clear line on stderr, exit 2, nothing started.
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }

need_file() { # need_file VAR_NAME WHAT: $VAR_NAME must name an existing file
  local name=$1 what=$2 value=${!1:-}
  [ -n "$value" ] || die "$name is not set ($what)"
  [ -f "$value" ] || die "$name=$value: no such file ($what)"
}

need_dir() { # need_dir VAR_NAME WHAT: $VAR_NAME must name an existing directory
  local name=$1 what=$2 value=${!1:-}
  [ -n "$value" ] || die "$name is not set ($what)"
  [ -d "$value" ] || die "$name=$value: no such directory ($what)"
}

need_set() { # need_set VAR_NAME WHAT
  [ -n "${!1:-}" ] || die "$1 is not set ($2)"
}

setup_python() {
  # The venv's python by absolute path works without activating the venv on the compute nodes.
  PY=${DEBERTA_DS_PYTHON:-${PYTHON:-python3}}
  command -v "$PY" >/dev/null 2>&1 || die "python '$PY' not found (set DEBERTA_DS_PYTHON or PYTHON)"
  [ -f "$WORKDIR/pipeline/cli.py" ] || die "$WORKDIR is not a DeBERTa-DS checkout (set DEBERTA_DS_WORKDIR)"
  cd "$WORKDIR"
  # The checkout, importable without installing it; a pip-installed package works the same.
  export PYTHONPATH=$WORKDIR${PYTHONPATH:+:$PYTHONPATH}
  # Logs of several ranks and of this shell interleave in one file: no block buffering.
  export PYTHONUNBUFFERED=1
  # DeepSpeed JIT-compiles its ops (shm_comm, fused_adam, cpu_adam) on first use: where TORCH_EXTENSIONS_DIR
  # is unset, `deberta-ds` builds them into a cache of this Python environment in the (shared) home directory,
  # once per cluster and environment, not once per job, node or launch.
  # NCCL: a failed or timed-out collective aborts the rank, so the job ends (and can be requeued)
  # instead of hanging until its time limit. pipeline/launch/ sets it too; set here for any step.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # OMP_NUM_THREADS is left to pipeline/launch/: SLURM_CPUS_PER_TASK divided by the ranks that share
  # the task. Cluster-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG=INFO)
  # belong in the submitting environment: sbatch passes it on.
}

# run_step CMD...: run CMD (normally an srun) in the background and wait for it, forwarding
# signals. Sets STEP_RC to its exit status and STOP_SIGNAL to the signal that asked us to stop
# ("" if none).
#
# Why in the background: bash runs a trap only after the foreground command returns, so a trap
# around a foreground srun would fire after training ended. `wait` is interrupted by a trapped
# signal instead; we then wait again for the real exit status.
#
# What is forwarded: SIGUSR1 (the time-limit warning, `#SBATCH --signal=B:USR1@SECS`, or
# `scancel --signal=USR1 --batch JOB`) and SIGTERM (preemption, scancel) reach the batch shell; we
# send SIGUSR1 to every task of the job's steps (`scancel --signal=USR1 JOB` signals the steps,
# not the batch shell), and `deberta-ds pretrain` finishes its step, saves a checkpoint and exits 75.
STOP_SIGNAL=""
_forward_stop() {
  local sig=$1
  if [ -n "$STOP_SIGNAL" ]; then
    log "got SIG$sig again; already stopping"
    return
  fi
  STOP_SIGNAL=$sig
  log "got SIG$sig: asking the job step to checkpoint and exit (SIGUSR1 to its tasks)"
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$STEP_PID" 2>/dev/null || true
}

run_step() {
  trap '_forward_stop USR1' USR1
  trap '_forward_stop TERM' TERM
  "$@" &
  STEP_PID=$!
  while true; do
    # (`|| ...`: a non-zero status must not trip the caller's `set -e`)
    STEP_RC=0
    wait "$STEP_PID" || STEP_RC=$?
    # wait returned because a trap ran (status > 128) while the step still runs: wait again.
    kill -0 "$STEP_PID" 2>/dev/null || break
  done
  trap - USR1 TERM
}

# requeue_or_exit RC: training said "checkpointed, run me again" (75), or stopped on our signal:
# put the job back in the queue. The next run resumes from the newest checkpoint by itself.
# MAX_RESTARTS bounds the loop (a job that never gets anywhere must not requeue forever).
requeue_or_exit() {
  local rc=$1 restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_RESTARTS:-20}
  if [ "$restarts" -ge "$max" ]; then
    log "not requeuing: already restarted $restarts times (MAX_RESTARTS=$max); resubmit to resume"
    exit 75
  fi
  log "step ended with exit $rc${STOP_SIGNAL:+ after SIG$STOP_SIGNAL}: requeuing job $SLURM_JOB_ID (restart $((restarts + 1)))"
  if scontrol requeue "$SLURM_JOB_ID"; then
    # slurmctld ends this run of the job now; the next one starts when resources allow.
    exit 0
  fi
  log "scontrol requeue failed (job submitted with --no-requeue, or being preempted: then Slurm requeues it)"
  exit 75
}
