"""`deberta-ds hostfile`: a deepspeed hostfile (`host slots=N` per line) for the current Slurm allocation."""
import os

from pipeline.errors import LaunchError
from pipeline.io import atomic_write
from pipeline.launch.env import env_int, parse_tasks_per_node, slurm_hostnames
from pipeline.cli_types import positive_int


def add_arguments(parser):
    parser.add_argument("--output", "-o", default="hostfile",
                        help="where to write the hostfile (default: ./hostfile); written to a temporary "
                        "name in the same directory, then renamed, so readers never see half a file")
    parser.add_argument("--slots", type=positive_int, default=None,
                        help="slots (processes, normally GPUs) per host; default: SLURM_GPUS_ON_NODE, "
                        "else SLURM_NTASKS_PER_NODE, else each node's count in SLURM_TASKS_PER_NODE, else 1")
    parser.add_argument("--nodelist", default=None,
                        help="Slurm hostlist to use instead of SLURM_JOB_NODELIST (e.g. 'node[1-4]')")


def hostfile_slots(hosts, environ, slots=None):
    """Slots per host: explicit, else from the allocation's GPU or task counts (see --slots)."""
    if slots is not None:
        if slots < 1:
            raise LaunchError(f"--slots must be at least 1, got {slots}")
        return [slots] * len(hosts)
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        n = env_int(environ, name, 0)
        if n > 0:
            return [n] * len(hosts)
    spec = environ.get("SLURM_TASKS_PER_NODE", "").strip()
    if spec:
        counts = parse_tasks_per_node(spec, "SLURM_TASKS_PER_NODE")
        if len(counts) == len(hosts):
            return counts
    return [1] * len(hosts)


def write_hostfile(path, hosts, slots):
    """Write `host slots=N` lines atomically (temp file in the same directory, then rename)."""
    text = "".join(f"{h} slots={n}\n" for h, n in zip(hosts, slots))
    atomic_write(os.path.abspath(path), text)
    return text


def run(args, environ=None):
    environ = os.environ if environ is None else environ
    name = "--nodelist" if args.nodelist else next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST")
                                                    if environ.get(n)), None)
    if name is None:
        raise LaunchError("not inside a Slurm allocation (SLURM_JOB_NODELIST is not set). Run it in an "
                          "sbatch/salloc job, or pass --nodelist.")
    hosts = slurm_hostnames(args.nodelist or environ[name], name)
    text = write_hostfile(args.output, hosts, hostfile_slots(hosts, environ, args.slots))
    print(f"wrote {args.output}: {len(hosts)} hosts, {sum(int(l.rsplit('=', 1)[1]) for l in text.splitlines())} slots")
    return 0


