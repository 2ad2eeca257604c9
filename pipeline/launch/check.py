"""`deberta-ds launch env|check`: what this process discovered about its launch, and a smoke test of it.

  env    print the discovered environment (rank, world size, master, source) as JSON
  check  discover, export, resolve MASTER_ADDR, meet at a rendezvous with a deadline (--timeout, default 60 s;
         pipeline/launch/rendezvous.py: a missing rank or an unreachable rank 0 is one line naming it), init
         torch.distributed (gloo) on it, all_reduce the ranks and print one `LAUNCH_CHECK ...` line per rank
         (slurm/smoke.sbatch runs it). Under `mpirun` with mpi4py installed it also compares the discovered rank
         and size with MPI's own (`mpi_check=ok`); the launch discovery never needs mpi4py.
"""
import dataclasses
import json
import os
import socket
import sys

from pipeline.cli_types import positive_float
from pipeline.errors import LaunchError
from pipeline.launch.env import apply_runtime_defaults, check_master_addr, discover_env, export_env


def add_arguments(parser):
    parser.add_argument("what", choices=["env", "check"],
                        help="env: print the discovered environment as JSON; check: gloo all_reduce smoke test")
    parser.add_argument("--timeout", type=positive_float, default=60.0,
                        help="check: seconds every rank may take to arrive, and each collective after (default "
                        "%(default)g); then the check fails naming the ranks that did not arrive")


def run(args):
    if args.what == "env":
        print(json.dumps(dataclasses.asdict(discover_env()), sort_keys=True))
        return 0
    main_check(args.timeout)


def main_check(timeout_s=60.0):
    """Smoke test of a launch: every rank all_reduces its rank over gloo and prints one line.

    Exits with os._exit after flushing: torch's gloo teardown sometimes aborts at interpreter exit
    (see the project notes), which would turn a good run into a failed step.
    """
    import datetime

    env = discover_env()
    check_master_addr(env)  # before importing torch: a bad address is named in well under a second

    import torch
    import torch.distributed as dist

    from pipeline.launch.rendezvous import rendezvous

    export_env(env)
    apply_runtime_defaults(env)
    store = rendezvous(env, timeout_s)
    dist.init_process_group("gloo", store=store, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    total = torch.tensor([env.rank], dtype=torch.int64)
    dist.all_reduce(total)
    dist.barrier()
    mpi = mpi_cross_check(env)
    print(f"LAUNCH_CHECK rank={env.rank} world_size={env.world_size} local_rank={env.local_rank} "
          f"local_world_size={env.local_world_size} node_rank={env.node_rank} host={socket.gethostname()} "
          f"slurmd_node={os.environ.get('SLURMD_NODENAME', '-')} master={env.master_addr}:{env.master_port} "
          f"source={env.source} omp_threads={os.environ.get('OMP_NUM_THREADS')} rank_sum={int(total.item())} "
          f"mpi_check={mpi.split()[0]}",
          flush=True)
    sys.stderr.flush()
    dist.barrier()  # every rank has printed before any exits
    if "mpi4py.MPI" in sys.modules:  # MPI was initialised: without MPI_Finalize, mpirun calls the exit improper
        sys.modules["mpi4py.MPI"].Finalize()
    os._exit(0)


def mpi_cross_check(env):
    """Compare the discovered rank/size with mpi4py's COMM_WORLD (only under an MPI launcher).

    Returns "ok", "skipped (...)" or raises LaunchError on a mismatch. Importing mpi4py calls
    MPI_Init, so it is done only when an MPI launcher started us, never for srun/torchrun ranks.
    """
    if env.source not in ("openmpi", "pmi"):
        return f"skipped (launched by {env.source})"
    try:
        from mpi4py import MPI
    except ImportError:
        return "skipped (no mpi4py)"
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (env.rank, env.world_size):
        raise LaunchError(f"MPI says rank {comm.Get_rank()} of {comm.Get_size()}, the environment says "
                          f"rank {env.rank} of {env.world_size}")
    return "ok"


