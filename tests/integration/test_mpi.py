"""`mpirun` launches: pipeline.launch finds the ranks from Open MPI's variables (no mpi4py needed), and
a 2-rank ZeRO-3 pretraining run under mpirun gives the losses of the same run under torchrun."""
import os
import re
import subprocess
import sys

from tests.helpers.launch import ROOT, TINY_RUN, ZERO3, explain, free_port, losses, pretrain, run_env

STEPS = 4


def mpirun(*args, timeout=300):
    # --allow-run-as-root: CI containers run as root. The ranks inherit this process's environment
    # (local launch), so MASTER_PORT etc. need no -x. MASTER_ADDR: pipeline.launch picks 127.0.0.1
    # because all ranks are on this host (OMPI_COMM_WORLD_LOCAL_SIZE == SIZE).
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "--bind-to", "none",
           sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=run_env({"MASTER_PORT": str(free_port())}), capture_output=True,
                          text=True, timeout=timeout)


def test_mpirun_ranks_agree_with_mpi4py():
    result = mpirun("-m", "pipeline.cli", "launch", "check", timeout=120)
    # split at the marker, not at line ends: mpirun forwards each rank's output in its own chunks, and once
    # a full make test here got one rank's line glued to the other's ("mpi_check=okLAUNCH_CHECK rank=1")
    records = [re.match(r"(?:\S+=\S+\s*)*", chunk).group(0) for chunk in result.stdout.split("LAUNCH_CHECK ")[1:]]
    ranks = sorted((dict(re.findall(r"(\S+?)=(\S+)", record)) for record in records), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == ["0", "1"], explain(result)
    for r in ranks:
        assert (r["world_size"], r["source"], r["rank_sum"], r["local_world_size"]) == ("2", "openmpi", "1", "2")
        assert r["master"].startswith("127.0.0.1:")
        assert r["mpi_check"] == "ok"  # mpi4py's COMM_WORLD says the same rank and size
        assert r["omp_threads"] == "1"


def test_mpirun_pretraining_equals_torchrun(tiny_shards, tmp_path):
    sets = ["--set", f"max_steps={STEPS}", "--set", f"save_interval={STEPS}"]
    result = mpirun("-m", "pipeline.cli", "pretrain", "--config", TINY_RUN, "--deepspeed", ZERO3, "--data-dir",
                    str(tiny_shards), "--output-dir", str(tmp_path / "mpi"), *sets)
    # the result files are the truth (the launcher's exit code can suffer from gloo's exit abort)
    assert os.path.isdir(tmp_path / "mpi" / "checkpoints" / f"global_step{STEPS}"), explain(result)
    assert "pretrain: mode zero3, 2 ranks" in result.stderr
    reference = pretrain(tiny_shards, tmp_path / "torchrun", nproc=2, sets=[s for s in sets if s != "--set"])
    assert reference.returncode == 0, explain(reference)
    a, b = losses(tmp_path / "mpi"), losses(tmp_path / "torchrun")
    assert sorted(a) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
