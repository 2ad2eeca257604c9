#!/usr/bin/env bash
# slurm-cluster.sh - a throw-away Slurm cluster on this machine, for tests and for trying the
# Slurm scripts in slurm/ without a real cluster.
#
#   scripts/slurm-cluster.sh start  [DIR]   start (or keep) munged + slurmctld + slurmd node1..nodeN
#   scripts/slurm-cluster.sh stop   [DIR]   cancel jobs, stop those daemons by pid, undo /etc/hosts
#   scripts/slurm-cluster.sh status [DIR]   say which of our daemons run, and show sinfo
#
# Everything of one cluster lives under DIR (argument, or $SLURM_CLUSTER_DIR, default
# /tmp/deberta-ds-slurm): its own slurm.conf, munge key and socket, state, spool, logs and pid files.
# Nothing under /etc/slurm or /run/munge is used, so it neither needs nor disturbs a system Slurm.
# Clients find the cluster through SLURM_CONF: after `start`, run `. DIR/env.sh` (or
# `export SLURM_CONF=DIR/etc/slurm.conf`); sbatch passes it on to the jobs.
#
# Environment knobs (read by `start`):
#   SLURM_CLUSTER_NODES  emulated nodes, named node1..nodeN, all on 127.0.0.1 (default 2)
#   SLURM_CLUSTER_CPUS   CPUs each node advertises (default: nproc). Every node claims the whole
#                        machine, so the machine is oversubscribed N times; that is what lets
#                        "1 task per node, 1-2 CPUs per task" run on a 2-core box.
#   SLURM_CLUSTER_PORT   slurmctld port; slurmd of nodeK listens on PORT+K (default 6817)
#   SLURM_CLUSTER_GRACE  seconds a preempted job gets between SIGTERM and SIGKILL (default 15)
#   SLURM_CLUSTER_CLEAN  1: forget the jobs of a previous run of this DIR (default 0)
#
# Needs root (slurmd and /etc/hosts) and the packages of scripts/system-deps.sh.
# Runs as root throughout (SlurmUser=root): DIR may then sit in a private temp directory.
set -euo pipefail

ACTION=${1:-}
DIR=${2:-${SLURM_CLUSTER_DIR:-/tmp/deberta-ds-slurm}}
NNODES=${SLURM_CLUSTER_NODES:-2}
NCPU=${SLURM_CLUSTER_CPUS:-$(nproc)}
PORT=${SLURM_CLUSTER_PORT:-6817}
GRACE=${SLURM_CLUSTER_GRACE:-15}

log() { echo "[slurm-cluster $(date +%T)] $*"; }
die() { echo "slurm-cluster: $*" >&2; exit 1; }

case "$ACTION" in start|stop|status) ;; *)
  echo "usage: $0 start|stop|status [DIR]   (DIR default: \$SLURM_CLUSTER_DIR or /tmp/deberta-ds-slurm)" >&2
  exit 2 ;;
esac
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd -P)          # absolute: it ends up in slurm.conf and pid markers
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
# Tag of our /etc/hosts line: one per cluster dir, so stopping one cluster leaves others' lines.
HOSTS_TAG="# deberta-ds-slurm $DIR"
export SLURM_CONF=$CONF             # for our own sinfo/squeue/scancel calls below

# pid_alive PIDFILE BINARY: the pid file names a live process that runs BINARY. Checking the
# binary guards against a recycled pid: we must never signal someone else's process.
pid_alive() {
  local p; [ -s "$1" ] || return 1; p=$(cat "$1")
  [ -d "/proc/$p" ] && [ "$(readlink -f "/proc/$p/exe" 2>/dev/null)" = "$(readlink -f "$2")" ]
}

# stop_pids BINARY PIDFILE...: SIGTERM all of them at once, wait up to 15 s for all, then SIGKILL
# the ones left (a slurmd can hang on TERM). Each daemon takes about 2 s to exit: in parallel,
# stopping the cluster takes that once, not once per daemon.
stop_pids() {
  local bin=$1 f p pids=(); shift
  for f in "$@"; do
    [ -s "$f" ] || continue
    if pid_alive "$f" "$bin"; then
      p=$(cat "$f"); pids+=("$p")
      log "stopping $(basename "$f" .pid) pid $p"
      kill -TERM "$p" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  for _ in $(seq 150); do
    local left=0
    for p in "${pids[@]}"; do [ -d "/proc/$p" ] && left=1; done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  for p in "${pids[@]}"; do
    # Same check as pid_alive, on the pid we signalled: never KILL a recycled pid.
    if [ "$(readlink -f "/proc/$p/exe" 2>/dev/null)" = "$(readlink -f "$bin")" ]; then
      log "pid $p ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "$p" 2>/dev/null || true
    fi
  done
}

node_names() { local k; for k in $(seq 1 "$NNODES"); do echo "node$k"; done; }
# The nodes this DIR was started with (the knobs may differ at stop time).
started_nodes() { local f; for f in "$DIR"/run/slurmd-*.pid; do [ -e "$f" ] && basename "$f" .pid | sed 's/^slurmd-//'; done; true; }

hosts_remove() {
  # Rewrite, not `sed -i`: /etc/hosts is often a bind mount, which sed -i's rename would break.
  if grep -qF -- "$HOSTS_TAG" /etc/hosts; then
    local h; h=$(grep -vF -- "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n' "$h" >/etc/hosts
  fi
}

# Stop slurmctld and all our slurmds together (each takes about 2 s to exit).
stop_slurm_daemons() {
  local -a slurmds=()
  local n
  for n in $(started_nodes); do slurmds+=("$DIR/run/slurmd-$n.pid"); done
  stop_pids /usr/sbin/slurmd "${slurmds[@]}" &
  stop_pids /usr/sbin/slurmctld "$DIR/run/slurmctld.pid" &
  wait
}

do_stop() {
  # Cancel what is left first, so that no slurmstepd or job process outlives the cluster.
  if pid_alive "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld; then
    local jobs; jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086  # one job id per word
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_slurm_daemons
  # munged last: the others use it until they are gone.
  stop_pids /usr/sbin/munged "$DIR/run/munged.pid"
  hosts_remove
  log "stopped ($DIR)"
}

do_status() {
  local f name rc=0
  for f in "$DIR/run/munged.pid" "$DIR/run/slurmctld.pid" "$DIR"/run/slurmd-*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    if pid_alive "$f" "/usr/sbin/${name%%-*}"; then echo "$name: running, pid $(cat "$f")"
    else echo "$name: not running (stale pid file)"; rc=1; fi
  done
  [ -e "$DIR/run/slurmctld.pid" ] || { echo "no cluster started in $DIR"; return 1; }
  sinfo -N -o '%N %P %t %c' 2>&1 || rc=1
  return $rc
}

write_conf() { # write the desired slurm.conf to $1
  local host mem
  host=$(hostname -s)
  mem=$(awk '/MemTotal/ {printf "%d", $2/1024*0.8}' /proc/meminfo)    # 80% of RAM, per node
  cat >"$1" <<EOF
# Generated by scripts/slurm-cluster.sh: a local test cluster under $DIR. Do not edit: rewritten on start.
ClusterName=debertads
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORT}
# Our own munged, on our own socket; cred_expire=10: a requeued job restarts after 11 s, not 121 s.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=10
# Root throughout, so the state dir may be private (a pytest temp dir is mode 0700).
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${DIR}/ctld
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
# Per-node TmpFS: with a shared /tmp the pmix plugin of the 2nd node fails with "File exists".
TmpFS=${DIR}/spool/%n/tmp
# Take the node sizes below, not the hardware's: the emulated nodes oversubscribe the machine.
SlurmdParameters=config_overrides
# pgid: linuxproc let an orphaned child outlive its job. task/none: no writable cgroups here.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Fast scheduling (Slurm defaults: batch_sched_delay=3, sched_interval=60, bf_interval=30).
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No slurmdbd (so no sacct): finished jobs are logged here, and stay in "scontrol show job"
# for MinJobAge seconds.
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.log
MinJobAge=600
ReturnToService=2
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=node[1-${NNODES}] NodeHostname=${host} NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + NNODES))] CPUs=${NCPU} RealMemory=${mem} State=UNKNOWN
# debug: the default. urgent: a higher PriorityTier that preempts debug jobs and requeues them
# (their tasks get SIGTERM, then SIGKILL after GraceTime).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE GraceTime=${GRACE}
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start_munged() {
  if pid_alive "$DIR/run/munged.pid" /usr/sbin/munged; then return 0; fi
  # Our own key, so this cluster trusts nobody else's credentials (and needs no /etc/munge).
  if [ ! -s "$DIR/etc/munge.key" ]; then
    mungekey --create --keyfile="$DIR/etc/munge.key" --force >/dev/null
  fi
  chmod 0600 "$DIR/etc/munge.key"
  rm -f "$DIR/run/munged.pid" "$MUNGE_SOCKET"
  # --force: munged refuses root and a socket dir under /tmp without it.
  /usr/sbin/munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/etc/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" --num-threads=2
  for _ in $(seq 50); do [ -s "$DIR/run/munged.pid" ] && break; sleep 0.1; done
  munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
    || die "munge self-test failed; see $DIR/log/munged.log"
  log "munged pid $(cat "$DIR/run/munged.pid")"
}

# start_daemon NAME BINARY PIDFILE ARGS...: start unless running.
start_daemon() {
  local name=$1 bin=$2 pidf=$3; shift 3
  pid_alive "$pidf" "$bin" && return 0
  rm -f "$pidf"
  "$bin" -f "$CONF" "$@"          # daemonizes and writes $pidf
  for _ in $(seq 100); do [ -s "$pidf" ] && break; sleep 0.1; done
  [ -s "$pidf" ] || { tail -20 "$DIR/log/$name.log" >&2 || true; die "$name did not start"; }
  log "$name pid $(cat "$pidf")"
}

do_start() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd and /etc/hosts need it)"
  local b
  for b in /usr/sbin/munged /usr/sbin/slurmctld /usr/sbin/slurmd; do
    [ -x "$b" ] || die "$b missing: run scripts/system-deps.sh (packages munge slurmctld slurmd slurm-client)"
  done
  command -v sbatch >/dev/null || die "sbatch missing: install slurm-client (scripts/system-deps.sh)"
  local t0; t0=$(date +%s%N)
  local n
  mkdir -p "$DIR"/{etc,munge,run,log,ctld,spool}
  chmod 0755 "$DIR"
  chmod 0700 "$DIR/munge"       # munged insists that nobody else can write its socket dir
  if [ "${SLURM_CLUSTER_CLEAN:-0}" = 1 ]; then
    pid_alive "$DIR/run/slurmctld.pid" /usr/sbin/slurmctld && die "SLURM_CLUSTER_CLEAN=1 needs a stopped cluster: stop first"
    rm -rf "${DIR:?}"/ctld/* "${DIR:?}"/spool/*
  fi

  start_munged

  local new; new=$(mktemp "$DIR/etc/slurm.conf.XXXXXX")
  write_conf "$new"
  CONF_CHANGED=0
  if cmp -s "$new" "$CONF"; then rm -f "$new"
  else
    # New settings (or first start): daemons still running from before read the old file.
    if [ -n "$(started_nodes)" ] || [ -s "$DIR/run/slurmctld.pid" ]; then
      log "slurm.conf changed: restarting the Slurm daemons"
      stop_slurm_daemons
    fi
    chmod 0644 "$new"; mv -f "$new" "$CONF"; CONF_CHANGED=1
  fi
  printf 'export SLURM_CONF=%q\n' "$CONF" >"$DIR/env.sh"

  # Node names must resolve: job scripts use MASTER_ADDR=$(scontrol show hostnames ... | head -n1).
  if ! grep -qF -- "$HOSTS_TAG" /etc/hosts || [ "$CONF_CHANGED" = 1 ]; then
    local h; h=$(grep -vF -- "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n127.0.0.1 %s %s\n' "$h" "$(node_names | tr '\n' ' ')" "$HOSTS_TAG" >/etc/hosts
  fi

  start_daemon slurmctld /usr/sbin/slurmctld "$DIR/run/slurmctld.pid"
  for n in $(node_names); do
    mkdir -p "$DIR/spool/$n/tmp"
    start_daemon "slurmd-$n" /usr/sbin/slurmd "$DIR/run/slurmd-$n.pid" -N "$n"
  done

  # Ready when every node is idle/mixed/allocated; nodes that come up DOWN (e.g. after an
  # unclean stop) are resumed.
  local states bad ok=0
  for _ in $(seq 120); do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u || true)
    bad=$(awk '$2 !~ /^(idle|mix|alloc|comp)$/' <<<"$states")
    if [ -n "$states" ] && [ -z "$bad" ]; then ok=1; break; fi
    awk '$2 ~ /^(down|drain|drng|fail)/ {print $1}' <<<"$bad" | while read -r n; do
      scontrol update nodename="$n" state=resume 2>/dev/null || true
    done
    sleep 0.25
  done
  [ "$ok" = 1 ] || { sinfo -N >&2 || true; die "nodes not ready after 30 s; logs in $DIR/log"; }
  log "ready in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $NNODES nodes x $NCPU CPUs; export SLURM_CONF=$CONF"
}

case "$ACTION" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac
