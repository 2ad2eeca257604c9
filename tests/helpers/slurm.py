"""A real (local) Slurm cluster for tests: a session fixture plus helpers to submit and follow jobs.

Use it from a test module with

    
    def test_chain(slurm_cluster):
        first = slurm_cluster.sbatch("slurm/a.sbatch", "arg", env={"X": "1"})
        second = slurm_cluster.sbatch("slurm/b.sbatch", options=[f"--dependency=afterok:{first}"])
        assert slurm_cluster.wait_all([first, second], timeout=120) == {first: "COMPLETED", second: "COMPLETED"}
        assert "done" in slurm_cluster.output(second)

(`pytest_plugins` registers this module once, so every module shares one cluster; importing the
fixture by name into several modules would start one cluster per module.)

The fixture starts `scripts/slurm-cluster.sh start DIR` with DIR a fresh temp directory and a
free port range, and always runs `stop` at the end of the session, also when tests failed, the
start failed half way, or pytest got SIGTERM/Ctrl-C. Afterwards it checks by pid that none of the
daemons it started is still alive (and SIGKILLs and reports any that is).

Jobs run the python that runs pytest (absolute path, exported as DEBERTA_DS_PYTHON) in this
checkout (DEBERTA_DS_WORKDIR, also put on PYTHONPATH), and see SLURM_CONF of the test cluster.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_SCRIPT = os.path.join(REPO, "scripts", "slurm-cluster.sh")
NODES = 2

# A job in one of these states will not change any more (PENDING + DependencyNeverSatisfied too).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
}
# scontrol's "Key=Value Key=Value" line: a key starts after whitespace and ends at the first "=".
_KEY = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_scontrol_line(line):
    """`scontrol -o show job` output line -> dict (values may contain spaces and '=')."""
    matches = list(_KEY.finditer(line))
    fields = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        fields[m.group(1)] = line[m.end():end].strip()
    return fields


def _port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def find_port_base(count, candidates=(6817,) + tuple(range(17100, 19000, 37))):
    """First port P with P..P+count-1 all free: slurmctld on P, slurmd of nodeK on P+K."""
    for base in candidates:
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range for the test Slurm cluster")


def _exe_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


class SlurmCluster:
    """Handle on a running test cluster. All client commands run with `self.env`."""

    def __init__(self, state_dir, env):
        self.state_dir = str(state_dir)
        self.env = env
        self.jobs_dir = os.path.join(self.state_dir, "jobs")
        os.makedirs(self.jobs_dir, exist_ok=True)
        self.python = env["DEBERTA_DS_PYTHON"]
        self.workdir = env["DEBERTA_DS_WORKDIR"]

    # -- commands ---------------------------------------------------------------------------------
    def run(self, *cmd, env=None, check=True, timeout=60):
        """Run a command (e.g. "squeue", "-h") with the cluster's environment; returns CompletedProcess."""
        full_env = dict(self.env, **(env or {}))
        proc = subprocess.run(list(cmd), env=full_env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script, *args, env=None, options=(), output=None):
        """Submit `script` (path relative to the checkout, or absolute) with `args`; return the job id.

        env: extra environment variables for the job (sbatch passes its whole environment on).
        options: extra sbatch options, e.g. ["--dependency=afterok:12", "--partition=urgent"].
        output: the job's stdout/stderr file; default JOBS_DIR/%j.out (%A_%a.out for arrays),
        opened in append mode so that the output of a requeued job's earlier runs is kept.
        """
        opts = list(options)
        if output is None and not any(o.startswith(("-o", "--output")) for o in opts):
            is_array = any(o.startswith(("-a", "--array")) for o in opts)
            output = os.path.join(self.jobs_dir, "%A_%a.out" if is_array else "%j.out")
        if output is not None:
            opts += [f"--output={output}", "--open-mode=append"]
        proc = self.run("sbatch", "--parsable", *opts, script, *args, env=env)
        return proc.stdout.strip().split(";")[0]  # "id" or "id;cluster"

    def cancel(self, job_id, *options):
        """scancel JOB [options], e.g. cancel(j, "--signal=USR1", "--batch")."""
        self.run("scancel", *options, str(job_id))

    # -- job state ---------------------------------------------------------------------------------
    def job_infos(self, job_id):
        """`scontrol show job` as a list of dicts (several for an array job), [] if unknown."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return []
            raise RuntimeError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return [parse_scontrol_line(line) for line in proc.stdout.splitlines() if line.strip()]

    def job_info(self, job_id):
        """`scontrol show job` of one job as a dict (JobState, Reason, Restarts, ExitCode, StdOut...)."""
        infos = self.job_infos(job_id)
        if not infos:
            raise KeyError(f"job {job_id} unknown to slurmctld")
        return infos[0]

    def state(self, job_id):
        """JobState, e.g. "PENDING", "RUNNING", "COMPLETED"."""
        return self.job_info(job_id)["JobState"]

    def restarts(self, job_id):
        """How often the job was requeued (scontrol's Restarts=N)."""
        return int(self.job_info(job_id)["Restarts"])

    def output(self, job_id):
        """Text of the job's stdout file (all array tasks concatenated for an array id)."""
        texts = []
        for info in self.job_infos(job_id):
            path = info.get("StdOut", "")
            if path and os.path.exists(path):
                with open(path, errors="replace") as f:
                    texts.append(f.read())
        return "".join(texts)

    def _is_final(self, info):
        return info["JobState"] in FINAL_STATES or (
            info["JobState"] == "PENDING" and info.get("Reason") == "DependencyNeverSatisfied")

    def wait(self, job_id, timeout=120, until=None, poll=0.5):
        """Wait until the job is final (or, with `until`, in one of those states); return its state.

        A job left PENDING with Reason=DependencyNeverSatisfied counts as final: it would never
        run. For an array job id every task must get there; the state of the first is returned.
        On timeout raises TimeoutError with the job's record and the end of its output.
        """
        deadline = time.monotonic() + timeout
        while True:
            infos = self.job_infos(job_id)
            if infos and all((info["JobState"] in until) if until else self._is_final(info) for info in infos):
                return infos[0]["JobState"]
            if time.monotonic() > deadline:
                tail = self.output(job_id)[-3000:]
                raise TimeoutError(f"job {job_id} not {'in ' + str(sorted(until)) if until else 'finished'} "
                                   f"after {timeout} s: {infos}\n--- output ---\n{tail}")
            time.sleep(poll)

    def wait_all(self, job_ids, timeout=300, poll=0.5):
        """Wait for several jobs (e.g. a dependency chain) to be final; {job_id: state}."""
        deadline = time.monotonic() + timeout
        return {j: self.wait(j, timeout=max(deadline - time.monotonic(), 1), poll=poll) for j in job_ids}

    # -- daemons -------------------------------------------------------------------------------------
    def daemon_pids(self):
        """{pid: binary} of the daemons this cluster started (from its pid files)."""
        pids = {}
        run_dir = os.path.join(self.state_dir, "run")
        if os.path.isdir(run_dir):
            for name in os.listdir(run_dir):
                if name.endswith(".pid"):
                    try:
                        with open(os.path.join(run_dir, name)) as f:
                            pids[int(f.read().strip())] = "/usr/sbin/" + name.split("-")[0].split(".")[0]
                    except (OSError, ValueError):
                        pass
        return pids


def _cluster_script(action, state_dir, env, timeout):
    return subprocess.run(["bash", CLUSTER_SCRIPT, action, str(state_dir)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running 2-node test cluster (node1, node2; partitions debug (default) and urgent)."""
    state_dir = tmp_path_factory.mktemp("slurm")
    if len(str(state_dir)) > 70:
        # munged's socket lives in there, and a unix socket path has at most 107 bytes
        # (a long --basetemp would break it).
        state_dir = tempfile.mkdtemp(prefix="slurm-", dir="/tmp")
    # No SLURM_* from outside: not an enclosing real job's variables, nor slurm-cluster.sh knobs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURM_CONF=os.path.join(state_dir, "etc", "slurm.conf"),
        SLURM_CLUSTER_NODES=str(NODES),
        SLURM_CLUSTER_PORT=str(find_port_base(NODES + 1)),
        DEBERTA_DS_PYTHON=os.environ.get("DEBERTA_DS_PYTHON", sys.executable),
        DEBERTA_DS_WORKDIR=REPO,
        PYTHONPATH=REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
    )
    cluster = SlurmCluster(state_dir, env)

    # pytest dies on SIGTERM without running fixture teardown; turn it into an exception so that the
    # `finally` below stops the daemons (a CI time limit sends SIGTERM).
    def _on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, _on_term)
    started = {}
    try:
        t0 = time.monotonic()
        proc = _cluster_script("start", state_dir, env, timeout=120)
        started = cluster.daemon_pids()
        if proc.returncode != 0:
            raise RuntimeError(f"slurm-cluster.sh start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        cluster.start_seconds = time.monotonic() - t0
        yield cluster
    finally:
        started.update(cluster.daemon_pids())
        proc = _cluster_script("stop", state_dir, env, timeout=120)
        signal.signal(signal.SIGTERM, old_handler)
        # Trust, but verify: nothing we started may outlive the session.
        left = {p: b for p, b in started.items() if _exe_of(p) == os.path.realpath(b)}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        if left or proc.returncode != 0:
            raise RuntimeError(f"slurm-cluster.sh stop left daemons {left} (rc {proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}")
