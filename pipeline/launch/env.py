"""Where am I in the job? Discover rank, world size and rendezvous address from whatever launched us.

`discover_env()` reads the variables of the launcher that started this process and returns a
`DistEnv`; `export_env(env)` writes them back as RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE /
MASTER_ADDR / MASTER_PORT, which is what `deepspeed.init_distributed()` and torch's `env://`
rendezvous read. Sources, first match wins:

1. ``env``: RANK and WORLD_SIZE are set (the deepspeed launcher, torchrun, or you). LOCAL_RANK,
   LOCAL_WORLD_SIZE (torchrun) / LOCAL_SIZE (deepspeed), GROUP_RANK (torchrun) / CROSS_RANK
   (deepspeed) / NODE_RANK are used when present. The deepspeed launcher also passes
   ``--local_rank=N`` on argv: the entry point accepts and ignores it, the environment agrees.
2. ``openmpi``: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK / _LOCAL_SIZE (``mpirun``). Checked before
   Slurm on purpose: ``mpirun`` inside an allocation starts its daemons with ``srun``, so its ranks
   also carry SLURM_PROCID/SLURM_NTASKS, but those count daemons (one per node), not ranks.
   MASTER_ADDR: the variable if set (``mpirun -x MASTER_ADDR=host``); else 127.0.0.1 when all ranks
   are on this host (LOCAL_SIZE == SIZE); else, inside a Slurm allocation, the first node of the
   allocation (where ``mpirun``'s default mapping puts rank 0); else an error that says to set it.
   node_rank = rank // local size (true for mpirun's default by-slot mapping).
3. ``pmi``: PMI_RANK / PMI_SIZE (MPICH/Intel MPI's hydra), with MPI_LOCALRANKID / MPI_LOCALNRANKS.
   Without the local variables all ranks are assumed to be on this host. Under ``srun --mpi=pmi2``
   the PMI and Slurm variables agree and the Slurm ones (which say more) are used instead.
4. ``slurm``: only inside an ``srun`` step, i.e. SLURM_STEP_ID and SLURM_PROCID both set. The batch
   shell of an sbatch job has SLURM_PROCID=0 and SLURM_NTASKS=N but no SLURM_STEP_ID: a batch script
   that runs the deepspeed launcher or torchrun is not itself a rank.
   rank = SLURM_PROCID, world_size = SLURM_NTASKS (SLURM_STEP_NUM_TASKS), local_rank =
   SLURM_LOCALID, node_rank = SLURM_NODEID, local_world_size = this node's count in
   SLURM_STEP_TASKS_PER_NODE, SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE ("2(x3),1" syntax).
   MASTER_ADDR: the variable if set, else the first host of the step's node list (rank 0 runs
   there), from ``scontrol show hostnames`` (a small parser of its own if scontrol is missing).
   MASTER_PORT: the variable if set, else 20000 + job id % 10000, so that every rank of the job
   derives the same port without talking, and different jobs on shared nodes rarely collide. Two
   steps of one job running at the same time must set MASTER_PORT themselves.
5. ``single``: none of the above: rank 0 of 1 at 127.0.0.1, on MASTER_PORT or a free port.

A bad variable is one line naming it and its value (LaunchError): an integer that is not one, a MASTER_PORT
outside 1-65535, a node list that is not a Slurm hostlist (`node[1-2`, `node]`: scontrol would pass `node]`
through as a host). `setup_distributed` resolves MASTER_ADDR before torch's rendezvous, which retries an
unknown host for minutes before it says anything.

`apply_runtime_defaults(env)` then sets, only where unset (os.environ.setdefault):
- OMP_NUM_THREADS = SLURM_CPUS_PER_TASK if set (divided by the ranks on this node when a launcher
  such as the deepspeed launcher runs as one Slurm task per node and starts the ranks itself), else the CPUs this process may use divided by the
  ranks on this node (at least 1): several ranks with one OpenMP pool each the size of the machine
  thrash.
- TORCH_EXTENSIONS_DIR = a cache of DeepSpeed's JIT-built ops of this Python environment alone
  (extensions_cache): environments that shared torch's default rebuilt the ops at almost every launch.
- TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a rank whose NCCL collective fails or times out aborts the
  process, so the job ends (and Slurm can requeue it) instead of hanging until its time limit.
  (torch >= 2.2 reads this name; older torch read NCCL_ASYNC_ERROR_HANDLING, which newer torch
  warns about, so that one is not set.)
NCCL's own tuning variables are cluster specific and are left alone: set NCCL_SOCKET_IFNAME (the
interface between nodes), NCCL_IB_HCA / NCCL_IB_DISABLE (InfiniBand), NCCL_DEBUG=INFO (to see what
NCCL picked) in the job script when the cluster needs them. On CPU only machines DeepSpeed uses gloo;
GLOO_SOCKET_IFNAME plays the role of NCCL_SOCKET_IFNAME there.
"""
import dataclasses
import hashlib
import os
import re
import socket
import subprocess
import sys

from pipeline.errors import LaunchError

# Port range for MASTER_PORT derived from a Slurm job id: below Linux's ephemeral ports
# (32768-60999), so a port picked by some client's connect() does not take it first.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000
# torch.distributed's own default for MASTER_PORT, used when a launcher set RANK but no port.
TORCH_DEFAULT_PORT = 29500


@dataclasses.dataclass
class DistEnv:
    """The position of this process in a distributed job (see the module docstring)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # env | openmpi | pmi | slurm | single


def env_int(environ, name, default=None):
    """The integer in variable `name` (`default` when unset; None: it must be set); a LaunchError naming the
    variable and its value otherwise."""
    value = environ.get(name, "")
    if value.strip() == "":
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def env_port(environ, default):
    """MASTER_PORT as a TCP port (1-65535), `default` when unset."""
    if not environ.get("MASTER_PORT", "").strip():
        return default
    port = env_int(environ, "MASTER_PORT")
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={environ['MASTER_PORT']!r} is not a TCP port: give one in 1-65535 "
                          "(unprivileged, and free on rank 0's host: 1024-65535)")
    return port


def check_master_addr(env):
    """MASTER_ADDR resolves, or one line naming it: torch's rendezvous would retry an unknown host until its
    timeout (minutes) before saying anything."""
    try:
        socket.getaddrinfo(env.master_addr, env.master_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise LaunchError(f"MASTER_ADDR={env.master_addr!r} does not resolve ({reason}): set it to the host name or "
                          "address of rank 0's node") from None


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_tasks_per_node(spec, name="tasks per node"):
    """Expand Slurm's compressed task counts: "2(x3),1" -> [2, 2, 2, 1]. `name`: the variable it came from."""
    counts = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise LaunchError(f"{name}={spec!r} is not a Slurm task count list (e.g. '2(x3),1')")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _split_top_level(hostlist):
    """Split "a[1-2],b,c[3,5]" at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in hostlist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def first_host_fallback(hostlist):
    """First host of a Slurm hostlist without scontrol: "gpu[07-09,12],cpu1" -> "gpu07".

    Each bracket group is replaced by its first member (zero padding kept); enough for rank 0's
    host. `scontrol show hostnames` is preferred where it exists.
    """
    first = _split_top_level(hostlist)[0]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], first)


# A Slurm hostlist: comma-separated names of host characters and bracketed ranges, "gpu[07-09,12],rack[1-2]-n[01-04]"
_HOST_CHARS = r"[A-Za-z0-9._-]+"
_RANGES = r"\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\]"
_HOST_PATTERN = re.compile(rf"(?:{_HOST_CHARS}|{_RANGES})+")


def check_hostlist(hostlist, name):
    """Refuse, naming `name` (the variable or option it came from), what is not a Slurm hostlist: scontrol
    passes `node]` through as a host name, and a hostfile or MASTER_ADDR with it fails much later."""
    def refuse(why):
        raise LaunchError(f"{name}={hostlist!r} is not a Slurm hostlist: {why} (e.g. 'node[01-04],gpu7')")
    depth = 0
    for ch in hostlist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            refuse("a ']' without its '['")
        if depth > 1:
            refuse("a '[' inside brackets")
    if depth:
        refuse("a '[' without its ']'")
    parts = _split_top_level(hostlist)
    if not parts:
        refuse("no host")
    for part in parts:
        if not _HOST_PATTERN.fullmatch(part):
            refuse(f"{part!r} is not a host name with [ranges]")
        for low, high in re.findall(r"(\d+)-(\d+)", "".join(re.findall(_RANGES, part))):
            if int(low) > int(high):
                refuse(f"the range {low}-{high} runs backwards")


def slurm_hostnames(hostlist, name="SLURM_JOB_NODELIST"):
    """All hosts of a Slurm hostlist, in order, via `scontrol show hostnames` (the authority). `name`: where
    the hostlist came from, for messages."""
    check_hostlist(hostlist, name)
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", hostlist],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout
    except FileNotFoundError:
        raise LaunchError("scontrol not found: is this a Slurm node?") from None
    except subprocess.CalledProcessError as e:
        last = (e.stderr.strip().splitlines() or ["no message"])[-1]  # scontrol's errors come last
        raise LaunchError(f"scontrol show hostnames {hostlist} ({name}) failed: {last}") from None
    hosts = out.split()
    if not hosts:
        raise LaunchError(f"scontrol show hostnames {hostlist} printed nothing")
    return hosts


def _first_slurm_host(hostlist, name):
    check_hostlist(hostlist, name)
    try:
        return slurm_hostnames(hostlist)[0]  # checked above; its failure is not shown (the fallback parses)
    except LaunchError:
        return first_host_fallback(hostlist)


def _from_env(environ):
    rank = env_int(environ, "RANK")
    world = env_int(environ, "WORLD_SIZE")
    local_rank = env_int(environ, "LOCAL_RANK", 0)
    local_world = env_int(environ, "LOCAL_WORLD_SIZE", env_int(environ, "LOCAL_SIZE", 0))
    if local_world <= 0:
        # The launcher did not say: assume one host (a user's own RANK/WORLD_SIZE on a workstation).
        local_world = world
    for name in ("GROUP_RANK", "CROSS_RANK", "NODE_RANK"):
        if environ.get(name, "").strip():
            node_rank = env_int(environ, name)
            break
    else:
        node_rank = rank // max(local_world, 1)
    if "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
        launcher = "deepspeed"
    else:
        launcher = "env"
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank,
        master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
        master_port=env_port(environ, TORCH_DEFAULT_PORT),
        source=launcher,
    )


def _from_openmpi(environ):
    rank = env_int(environ, "OMPI_COMM_WORLD_RANK")
    world = env_int(environ, "OMPI_COMM_WORLD_SIZE")
    local_rank = env_int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", 0)
    local_world = env_int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if local_world == world:
            addr = "127.0.0.1"
        elif environ.get("SLURM_JOB_NODELIST"):
            addr = _first_slurm_host(environ["SLURM_JOB_NODELIST"], "SLURM_JOB_NODELIST")
        else:
            raise LaunchError(
                "Open MPI ranks on several hosts but MASTER_ADDR is not set: "
                "run `mpirun -x MASTER_ADDR=<host of rank 0> -x MASTER_PORT=<port> ...`"
            )
    return _mpi_env(environ, rank, world, local_rank, local_world, addr, source="openmpi")


def _mpi_env(environ, rank, world, local_rank, local_world, addr, source):
    """An MPI launcher's ranks: nodes hold local_world consecutive ranks each, the port from MASTER_PORT."""
    return DistEnv(
        rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=rank // max(local_world, 1),
        master_addr=addr,
        master_port=env_port(environ, TORCH_DEFAULT_PORT),
        source=source,
    )


def _from_pmi(environ):
    rank = env_int(environ, "PMI_RANK")
    world = env_int(environ, "PMI_SIZE")
    local_rank = env_int(environ, "MPI_LOCALRANKID", rank)
    local_world = env_int(environ, "MPI_LOCALNRANKS", world)
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if local_world != world:
            raise LaunchError("PMI ranks on several hosts but MASTER_ADDR is not set: "
                              "pass it to the launcher (e.g. mpiexec -genv MASTER_ADDR <host of rank 0>)")
        addr = "127.0.0.1"
    return _mpi_env(environ, rank, world, local_rank, local_world, addr, source="pmi")


def _in_slurm_step(environ):
    return bool(environ.get("SLURM_STEP_ID", "").strip()) and bool(environ.get("SLURM_PROCID", "").strip())


def _slurm_world_size(environ):
    for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_NPROCS"):
        if environ.get(name, "").strip():
            return env_int(environ, name)
    raise LaunchError("inside a Slurm step but SLURM_NTASKS is not set")


def _from_slurm(environ):
    rank = env_int(environ, "SLURM_PROCID")
    world = _slurm_world_size(environ)
    node_rank = env_int(environ, "SLURM_NODEID", 0)
    # The step's own layout first: a step may use fewer tasks per node than the job.
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        spec = environ.get(name, "").strip()
        if spec:
            counts = parse_tasks_per_node(spec, name)
            local_world = counts[node_rank] if node_rank < len(counts) else counts[-1]
            break
    else:
        local_world = 1
    addr = environ.get("MASTER_ADDR")
    if not addr:
        name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if environ.get(n)), None)
        if name is None:
            raise LaunchError("inside a Slurm step but SLURM_JOB_NODELIST is not set; set MASTER_ADDR")
        addr = _first_slurm_host(environ[name], name)
    port = env_port(environ, None)
    if port is None:
        port = SLURM_PORT_BASE + env_int(environ, "SLURM_JOB_ID", env_int(environ, "SLURM_JOBID", 0)) % SLURM_PORT_SPAN
    return DistEnv(
        rank=rank, world_size=world, local_rank=env_int(environ, "SLURM_LOCALID", 0),
        local_world_size=local_world, node_rank=node_rank,
        master_addr=addr, master_port=port, source="slurm",
    )


def discover_env(environ=None):
    """Return this process's `DistEnv` from the launcher's variables (order: module docstring).

    `environ` defaults to os.environ; it is only read. Raises LaunchError when a launcher's
    variables are present but unusable.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RANK", "").strip() and environ.get("WORLD_SIZE", "").strip():
        env = _from_env(environ)
    elif environ.get("OMPI_COMM_WORLD_RANK", "").strip():
        env = _from_openmpi(environ)
    elif environ.get("PMI_RANK", "").strip() and environ.get("PMI_SIZE", "").strip() and not (
        # srun --mpi=pmi2 sets PMI_* consistent with Slurm's: then Slurm's say more. They differ
        # under hydra, which (like mpirun) starts one proxy per node with srun.
        _in_slurm_step(environ) and env_int(environ, "PMI_SIZE") == _slurm_world_size(environ)
    ):
        env = _from_pmi(environ)
    elif _in_slurm_step(environ):
        env = _from_slurm(environ)
    else:
        env = DistEnv(
            rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
            master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
            master_port=env_port(environ, None) or free_port(),
            source="single",
        )
    if not (0 <= env.rank < env.world_size) or not (0 <= env.local_rank < max(env.local_world_size, 1)):
        raise LaunchError(f"inconsistent launch variables ({env.source}): {env}")
    return env


def export_env(env, environ=None):
    """Write `env` into os.environ (or `environ`) for deepspeed.init_distributed / torch env://.

    Overwrites: the discovered values are the truth for this process. Returns `env`.
    """
    environ = os.environ if environ is None else environ
    environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
    return env


def apply_runtime_defaults(env, environ=None):
    """Set OMP_NUM_THREADS, TORCH_NCCL_ASYNC_ERROR_HANDLING and TORCH_EXTENSIONS_DIR where unset (module docstring).

    Returns the dict of variables it set (empty when all were already set).
    """
    environ = os.environ if environ is None else environ
    cpus = env_int(environ, "SLURM_CPUS_PER_TASK", 0)
    if cpus > 0 and env.source != "slurm":
        # A launcher (deepspeed --no_ssh, torchrun) running as ONE Slurm task per node started
        # several ranks: they share that task's CPUs.
        cpus = max(cpus // max(env.local_world_size, 1), 1)
    if cpus <= 0:
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            usable = os.cpu_count() or 1
        cpus = usable // max(env.local_world_size, 1)
    wanted = {
        "OMP_NUM_THREADS": str(max(cpus, 1)),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_EXTENSIONS_DIR": extensions_cache(),
    }
    applied = {}
    for name, value in wanted.items():
        if name not in environ:
            environ[name] = value
            applied[name] = value
    return applied


def extensions_cache(prefix=None):
    """This Python environment's own cache of DeepSpeed's JIT-built ops: ~/.cache/torch_extensions/deberta-ds-
    <environment>-<hash of its path>. torch's default is shared by every environment of one Python version, and
    an op built by another environment (other include paths, another torch) is built again at every launch that
    alternates between them."""
    prefix = os.path.realpath(prefix or sys.prefix)
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions",
                        f"deberta-ds-{os.path.basename(prefix)}-{digest}")


def setup_distributed(local_rank=None):
    """Discover this process's place, export it for torch, set the runtime defaults and join the process group
    (deepspeed.init_distributed). `local_rank`: the deepspeed launcher's --local_rank, used when nothing else
    says it."""
    env = discover_env()
    if local_rank is not None and env.source == "single":
        env.local_rank = local_rank
    check_master_addr(env)
    export_env(env)
    apply_runtime_defaults(env)
    import deepspeed
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    return env
