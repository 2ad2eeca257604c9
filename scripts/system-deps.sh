#!/usr/bin/env bash
# System packages the tests use: Open MPI (mpirun, mpi4py) and a local Slurm (slurmctld, slurmd,
# munge, pmix). Installed with apt-get when missing and we are root; otherwise say what is missing.
set -euo pipefail
need=()
command -v mpirun   >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v numactl  >/dev/null 2>&1 || need+=(numactl)
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd   >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch   >/dev/null 2>&1 || need+=(slurm-client)
command -v munged   >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || need+=(munge)
ls /usr/lib/*/libpmix.so.2* >/dev/null 2>&1 || need+=(libpmix2)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
else
  echo "missing system packages (install them, or the MPI/Slurm tests fail): ${need[*]}" >&2
fi
