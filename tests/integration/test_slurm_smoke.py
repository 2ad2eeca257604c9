"""slurm/smoke.sbatch on a real local Slurm cluster (tests/helpers/slurm.py): two emulated nodes,
one task each, rank discovery + gloo all_reduce, and the deepspeed hostfile of the allocation."""
import json
import os
import re
import subprocess


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(REPO, "slurm", "smoke.sbatch")


def test_smoke_job_two_nodes(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(SMOKE, str(tmp_path))
    state = slurm_cluster.wait(job, timeout=180)
    out = slurm_cluster.output(job)
    assert state == "COMPLETED", out
    assert slurm_cluster.restarts(job) == 0

    # One line per rank; both agree on the world and on the rendezvous; the all_reduce summed 0+1.
    lines = re.findall(r"^LAUNCH_CHECK .*$", out, re.M)
    ranks = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in lines]
    assert sorted(r["rank"] for r in ranks) == ["0", "1"], out
    for r in ranks:
        assert (r["world_size"], r["rank_sum"], r["source"], r["local_rank"], r["local_world_size"]) == \
            ("2", "1", "slurm", "0", "1"), r
        assert r["master"] == f"node1:{20000 + int(job) % 10000}"
        assert r["omp_threads"] == "1"  # --cpus-per-task=1
    # rank N ran on node N+1 (SLURM_NODEID), i.e. really on two (emulated) nodes
    assert {(r["node_rank"], r["slurmd_node"]) for r in ranks} == {("0", "node1"), ("1", "node2")}

    # The batch shell is not taken for a rank.
    batch_env = json.loads(re.search(r"^BATCH_ENV (.*)$", out, re.M).group(1))
    assert (batch_env["source"], batch_env["world_size"]) == ("single", 1)

    # The hostfile: written by `python -m pipeline.cli hostfile` from scontrol's expansion of node[1-2].
    assert (tmp_path / "hostfile").read_text() == "node1 slots=1\nnode2 slots=1\n"
    assert "HOSTFILE_BEGIN\nnode1 slots=1\nnode2 slots=1\nHOSTFILE_END" in out
    assert out.rstrip().endswith("SMOKE_OK")


def test_smoke_script_outside_allocation_fails_clearly(tmp_path):
    # As if someone ran the batch script by hand: no SLURM_* variables at all.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", SMOKE, str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not inside a Slurm allocation" in proc.stderr
    assert "sbatch slurm/smoke.sbatch" in proc.stderr
    assert os.listdir(tmp_path) == []  # it stopped before doing anything
