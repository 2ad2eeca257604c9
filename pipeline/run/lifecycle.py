"""What both trainers (pretraining and fine-tuning) share about a run's life: exit codes, the stop flag that
SIGTERM/SIGUSR1 raise, agreeing across ranks, seeding, one run per output directory (RunLock), the deliberate
exit, and the fault-injection hook of the tests.

Seeding, one rule for both trainers: every rank seeds torch, numpy and Python's `random` with `seed` before the
model is built (the same initial weights everywhere, also for a head a release does not carry), then with
`seed + 1 + rank` before the first step: dropout (and SiFT's noise) then differ between the data-parallel
replicas, as they would between the micro-batches of one process. With one stream on every rank, the k-th
micro-batch of each rank would share its dropout masks with the others'. A checkpoint keeps every rank's RNG
states, so a resumed run continues each stream.

Exit codes: 0 done; 1 bad input (one line `error: ...`); 2 usage (argparse); 3 non-finite loss; 75
checkpointed after SIGTERM/SIGUSR1 (EX_TEMPFAIL: run the same command again to continue; the Slurm scripts
requeue on it).
"""
import contextlib
import datetime
import errno
import json
import os
import signal
import socket
import sys
import tempfile
import time

from pipeline.errors import OutputError, RunLockedError

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE, EXIT_NONFINITE, EXIT_REQUEUE = 0, 1, 2, 3, 75
FAULT_VARIABLE = "DEBERTA_DS_FAULT"
LOCK_FILE = "deberta-ds.lock"
UNREADABLE_GRACE_S = 1.0  # how long an empty or damaged lock is read again before it is judged left over
# os.link's errors on a file system without hard links: the lock is then created with O_EXCL and written
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


class StopFlag:
    """SIGTERM/SIGUSR1 only set a flag: the step in flight finishes, all ranks agree, then the run saves."""

    def __init__(self):
        self.raised = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum, _frame):
        self.raised = signal.Signals(signum).name


# ---------------------------------------------------------------- messages
def say(rank, message):
    """One line on stderr from rank 0: the one way a run prints (through tqdm, so a progress bar keeps its
    place); results a command prints as its output go to stdout instead."""
    if rank == 0:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()


# ---------------------------------------------------------------- seeding
def seed_everything(seed):
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def seed_for_build(seed):
    """Before the model is built: the same seed on every rank."""
    seed_everything(seed)


def seed_for_steps(seed, rank):
    """Before the first step: one stream per rank."""
    seed_everything(seed + 1 + rank)


# ---------------------------------------------------------------- ranks
def distributed():
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def any_rank(flag, device="cpu"):
    """True on every rank if it is True on any (a signal may reach the ranks at different times). The flag
    travels as a CPU tensor over gloo (the default group on the CPU, a gloo side group beside NCCL), so agreeing
    waits for the other ranks' hosts but never for the accelerator: the launch queue stays full."""
    if not distributed():
        return bool(flag)
    import torch
    import torch.distributed as dist
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=host_group())
    return bool(t[0])


_host_group = []


def host_group():
    """A process group for small host-side agreements: the default one where it is gloo, else a gloo group over
    all ranks (made once; every rank makes it at the same point, its first agreement)."""
    import torch.distributed as dist
    if dist.get_backend() == "gloo":
        return None
    if not _host_group:
        _host_group.append(dist.new_group(backend="gloo"))
    return _host_group[0]


def reduce_mean(tensor):
    """The mean of a tensor over the ranks, in float64, left on its device: no host read (the loop reads a
    step's values together at its next log line)."""
    import torch
    tensor = tensor.to(torch.float64)
    if distributed():
        import torch.distributed as dist
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def reduce_sum(tensor):
    """The sum of a tensor over the ranks, left on its device."""
    if distributed():
        import torch.distributed as dist
        dist.all_reduce(tensor)
    return tensor


def mean_over_ranks(values, device="cpu", group=None):
    """The mean of a float (or a list of floats) over the ranks of `group`, in float64."""
    import torch
    single = not isinstance(values, (list, tuple))
    tensor = torch.tensor([values] if single else list(values), dtype=torch.float64, device=device)
    if distributed():
        import torch.distributed as dist
        dist.all_reduce(tensor, group=group)
        tensor /= dist.get_world_size(group)
    result = tensor.tolist()
    return result[0] if single else result


def raise_on_every_rank(error, source_rank=0):
    """Rank `source_rank` decided (error: an exception or None); every rank raises it, or none does: a check
    that only one rank can make (a lock, a file only rank 0 reads) must not leave the others waiting."""
    if distributed():
        import torch.distributed as dist
        shared = [None if error is None else (type(error), str(error))]
        dist.broadcast_object_list(shared, src=source_rank)
        if shared[0] is not None:
            kind, message = shared[0]
            raise kind(message)
    elif error is not None:
        raise error


def raise_where_read(error, only_rank_zero_read):
    """The outcome of reading a release: when only rank 0 read it (ZeRO-3), every rank raises rank 0's error (the
    others would wait in the next collective); otherwise each rank read it and raises its own."""
    if only_rank_zero_read:
        raise_on_every_rank(error)
    elif error is not None:
        raise error


def as_user_error(error):
    """A DebertaDSError as it is, an OSError on a path (a full disk, a permission) as an OutputError naming
    the path; anything else None (a bug: it keeps its traceback)."""
    from pipeline.errors import DebertaDSError, OutputError
    if isinstance(error, DebertaDSError):
        return error
    if isinstance(error, OSError) and error.filename is not None:
        return OutputError(f"{error.filename}: {error.strerror or error}")
    return None


def run_and_finish(main, *args):
    """main(*args) -> exit code, a user's error (DebertaDSError, or an OSError on a path) as one line
    `error: ...` and code 1, then finish(code). A bug keeps its traceback, and the run lock is released."""
    try:
        code = main(*args)
    except Exception as error:  # noqa: BLE001 (sorted below: a user's error or a bug)
        user_error = as_user_error(error)
        if user_error is None:
            RunLock.release_all()
            raise
        where = f" (rank {os.environ.get('RANK')})" if distributed() and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"error{where}: {user_error}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    return finish(code)


def on_rank_zero(rank, action, *args):
    """action(*args) on rank 0 only (a file only rank 0 writes); a user's error there is raised on every rank,
    so the others stop too instead of waiting in their next collective. Returns action's result on rank 0."""
    result, error = None, None
    if rank == 0:
        try:
            result = action(*args)
        except Exception as e:  # noqa: BLE001
            error = as_user_error(e)
            if error is None:
                raise
    raise_on_every_rank(error)
    return result


def finish(code):
    """Leave deliberately under torch.distributed: a barrier (when all went well), flushed output, the run
    lock released, then os._exit. torch's gloo teardown at interpreter exit sometimes aborts a finished rank
    ("terminate called without an active exception"), which would make a good run look failed to the
    launcher. Without a process group this just returns the code."""
    try:
        if distributed() and code in (EXIT_OK, EXIT_REQUEUE):
            import torch.distributed as dist
            dist.barrier()
    finally:
        RunLock.release_all()
        if distributed():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


# ---------------------------------------------------------------- one run per directory
def _process_start(pid):
    """The start time of a process (clock ticks since boot, /proc/PID/stat field 22), or None: with the pid it
    tells a live holder from a new process that was given a dead holder's pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """DIR/deberta-ds.lock, holding the host, pid, process start, Slurm job and command of the run that uses DIR.
    A second run is refused with the holder's identity. A lock left by a run that is gone is taken over with a
    message: its holder's pid is dead (or reused) on this host, or the holder was this same Slurm job before a
    requeue. Released when the run ends; a run killed with SIGKILL leaves it, and the next run on the same host
    takes it over.

    The lock is complete or absent: the identity is written to a temporary file, which is then hard-linked to
    the lock's name (the link fails if the name exists: O_EXCL's semantics). A write that fails (a full disk)
    leaves no lock. Older builds created the lock empty and then wrote it, so a failed write left an empty lock
    that refused every later run: a lock that stays empty or is not a JSON record for UNREADABLE_GRACE_S (no
    writer of this build ever shows one) is taken over with a message saying what it held."""

    held = []

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                         "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                         "started": datetime.datetime.now().isoformat(timespec="seconds"),
                         "command": " ".join(sys.argv)}

    @classmethod
    def acquire(cls, directory, what="run"):
        """Take the lock of `directory` (created if needed); returns (lock, message about a takeover or None)."""
        lock = cls(directory)
        os.makedirs(directory, exist_ok=True)
        for _ in range(5):
            if lock._create():
                cls.held.append(lock)
                return lock, None
            raw = lock._settled_content()
            if raw is None:
                continue  # just released
            holder = parse_holder(raw)
            reason = lock._stale(holder)
            if reason is None:
                raise RunLockedError(
                    f"{directory}: in use by another {what} ({describe(holder)}); two runs in one directory would "
                    f"overwrite each other's checkpoints and metrics. Use another directory, or if that run is gone "
                    f"(a node that crashed), delete {lock.path}")
            if lock._remove_stale(raw) and lock._create():
                cls.held.append(lock)
                return lock, f"{directory}: took over the lock of a {what} that is gone ({describe(holder)}: {reason})"
        raise RunLockedError(f"{lock.path}: could not take the lock (other processes keep taking it)")

    def _create(self):
        """True when this process now holds the lock, False when a lock exists."""
        data = json.dumps(self.identity).encode()
        try:
            handle, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{LOCK_FILE}.", suffix=".tmp")
        except OSError as error:
            raise OutputError(f"{self.path}: cannot write the run lock ({error.strerror or error})") from None
        try:
            with os.fdopen(handle, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError as error:
                if error.errno not in NO_HARD_LINKS:
                    raise
                return self._create_exclusive(data)
            return True
        except OSError as error:
            raise OutputError(f"{self.path}: cannot write the run lock ({error.strerror or error})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create_exclusive(self, data):
        """A file system without hard links: create with O_EXCL and write; a failed write removes the lock."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        return True

    def _content(self):
        """The lock's bytes, or None when there is none."""
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise RunLockedError(f"{self.path}: cannot read the run lock ({error.strerror or error}); if no run uses "
                                 f"{self.directory}, delete it") from None

    def _settled_content(self):
        """The lock's bytes; an unreadable lock is read again for UNREADABLE_GRACE_S (an older build's writer
        may be between creating and writing it), then returned as it is."""
        raw = self._content()
        deadline = time.monotonic() + UNREADABLE_GRACE_S
        while raw is not None and "unreadable" in parse_holder(raw) and time.monotonic() < deadline:
            time.sleep(0.05)
            raw = self._content()
        return raw

    def _remove_stale(self, raw):
        """Move the stale lock (content `raw`) away; False when another process took it over in between (its new
        lock is put back)."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:  # only one of several processes taking over can rename the stale lock away
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, "rb") as f:
                if f.read() == raw:
                    return True
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a fresh lock that was not the one judged stale
            return False
        finally:
            os.unlink(aside)

    def _stale(self, holder):
        """Why the holder is gone, or None if it may still run."""
        if "unreadable" in holder:
            return holder["unreadable"]
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job:
            return "the same Slurm job, requeued"
        if holder.get("host") != self.identity["host"]:
            return None
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _alive(pid):
            return "its process has ended"
        start = holder.get("process_start")
        if start is not None and _process_start(pid) not in (None, start):
            return "its process has ended (the pid is now another process's)"
        return None

    def release(self):
        if parse_holder(self._content() or b"") == self.identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self in RunLock.held:
            RunLock.held.remove(self)

    @classmethod
    def release_all(cls):
        for lock in list(cls.held):
            lock.release()


def parse_holder(raw):
    """The holder's identity from the lock's bytes, or {"unreadable": why} for an empty or damaged lock."""
    if not raw.strip():
        return {"unreadable": "the lock file is empty, as an older build left it when writing it failed (a full disk)"}
    try:
        holder = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        holder = None
    if not isinstance(holder, dict):
        return {"unreadable": f"the lock file ({len(raw)} bytes) is not a lock record"}
    return holder


def describe(holder):
    if "unreadable" in holder:
        return "holder unknown"
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("slurm_job_id"):
        parts.append(f"Slurm job {holder['slurm_job_id']}")
    parts.append(f"started {holder.get('started')}")
    return ", ".join(parts)


def lock_run_directory(directory, rank, what="run"):
    """Rank 0 takes the directory's lock and says so when it took over a stale one; every rank stops if the
    lock is held by another run."""
    error = None
    if rank == 0:
        try:
            _, message = RunLock.acquire(directory, what)
            if message:
                print(message, file=sys.stderr)
        except RunLockedError as e:
            error = e
        except OSError as e:  # the directory cannot be created or written
            error = as_user_error(e) or RunLockedError(f"{directory}: cannot take the run lock ({e})")
    raise_on_every_rank(error)


# ---------------------------------------------------------------- fault injection (tests)
def fault_points():
    """DEBERTA_DS_FAULT, e.g. "kill:4" (SIGKILL every rank after optimizer step 4), "signal:5,16" (rank 0 sends
    itself SIGUSR1 after steps 5 and 16) or "fsize:1=200000" (from its first step on, rank 1 can write no file
    beyond 200000 bytes: a full disk on one node): how the tests break a run at a chosen point."""
    spec = os.environ.get(FAULT_VARIABLE, "")
    if not spec:
        return None, ()
    kind, _, values = spec.partition(":")
    if kind == "fsize":
        rank, _, limit = values.partition("=")
        return kind, (int(rank), int(limit))
    return kind, {int(s) for s in values.split(",") if s.strip()}


def inject_fault(step, rank, kinds=("kill", "fsize")):
    """The fault DEBERTA_DS_FAULT asks for at this step, if it is of one of `kinds` (the loop sends the signal
    before the ranks agree on stopping, and kills after the step's checkpoint)."""
    kind, points = fault_points()
    if kind not in kinds:
        return
    if kind == "fsize":
        limited_rank, limit = points
        if rank == limited_rank:
            import resource
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return
    if step not in points:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "signal" and rank == 0:
        os.kill(os.getpid(), signal.SIGUSR1)
