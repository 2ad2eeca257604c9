"""The project's own Slurm scripts (slurm/*.sbatch, slurm/chain.sh) on a real local Slurm cluster
(tests/helpers/slurm.py: slurmctld + two emulated nodes, one rank per node), with the tiny CPU configs.

- the chain: preprocessing array (2 tasks) -> pretraining on 2 nodes (srun mode) -> conversion ->
  fine-tuning, linked by --dependency=afterok (slurm/chain.sh);
- SIGUSR1 to the batch shell mid-run (what `--signal=B:USR1@SECS` sends before the time limit):
  checkpoint, requeue, resume; the losses equal the uninterrupted chain run bitwise, in srun and in
  deepspeed-launcher mode;
- bad input refused before anything starts, with one clear line.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers.launch import PIPE, ROOT, TINY_RUN, ZERO3, cli, explain, losses
from tests.helpers.superglue import write_cb_like


SLURM = os.path.join(ROOT, "slurm")
STEPS = 80  # long enough (about 6 s) that a signal sent after step 3 lands mid-run
PRETRAIN_ARGS = f"--set max_steps={STEPS} --set save_interval=1000"
# Job environment for the tests: CPU accelerator, one thread per rank (the op cache: this venv's own, which
# `deberta-ds` sets where TORCH_EXTENSIONS_DIR is unset).
JOB_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Corpus files and a tokenizer (the inputs of the preprocessing array), and CB-like data."""
    work = tmp_path_factory.mktemp("slurm_inputs")
    for args in (["corpus", "--output", str(work / "corpus"), "--max-bytes", "400000"],
                 ["tokenizer", "train", "--input", str(work / "corpus" / "*"), "--output", str(work / "spm"),
                  "--vocab-size", "1000"]):
        result = cli(*args)
        assert result.returncode == 0, explain(result)
    write_cb_like(str(work / "superglue" / "CB" / "train.jsonl"), 32, seed=1)
    write_cb_like(str(work / "superglue" / "CB" / "val.jsonl"), 16, seed=2)
    return work


@pytest.fixture(scope="module")
def chain(slurm_cluster, corpus, tmp_path_factory):
    """slurm/chain.sh submits preprocess (array 0-1) -> pretrain (2 nodes) -> convert -> finetune."""
    work = tmp_path_factory.mktemp("chain")
    env = dict(JOB_ENV, WORK=str(work), INPUT=str(corpus / "corpus" / "*"), TOKENIZER=str(corpus / "spm.model"),
               ARRAY="0-1", RUN_CONFIG=TINY_RUN, DS_CONFIG=ZERO3, PREPROCESS_ARGS="--max-seq-len 128",
               PRETRAIN_ARGS=PRETRAIN_ARGS, FINETUNE_TASK="CB", FINETUNE_DATA=str(corpus / "superglue"),
               FINETUNE_DS_CONFIG=os.path.join(ROOT, "ds_configs", "finetune_cpu.json"),
               FINETUNE_ARGS="--epochs 1 --batch-size 8 --max-seq-len 32")
    proc = slurm_cluster.run("bash", os.path.join(SLURM, "chain.sh"), env=env)
    ids = dict(re.findall(r"(\w+)=(\d+)", re.search(r"^CHAIN .*$", proc.stdout, re.M).group(0)))
    states = slurm_cluster.wait_all([ids[k] for k in ("preprocess", "pretrain", "convert", "finetune")],
                                    timeout=420)
    logs = {name: "".join(open(work / "logs" / f).read() for f in sorted(os.listdir(work / "logs"))
                          if f.startswith(name)) for name in ids}
    return work, ids, states, logs


def _time(info, key):
    return time.strptime(info[key], "%Y-%m-%dT%H:%M:%S")


def test_chain_preprocess_array_pretrain_two_nodes_convert_finetune(chain, slurm_cluster):
    work, ids, states, logs = chain
    assert set(states.values()) == {"COMPLETED"}, (states, logs)

    # preprocessing: two array tasks, each wrote its part; the shard dir carries the tokenizer
    assert "task 0 of 2: wrote" in logs["preprocess"] and "task 1 of 2: wrote" in logs["preprocess"]
    names = os.listdir(work / "shards")
    assert {"task-00000-of-00002.done", "task-00001-of-00002.done", "spm.model"} <= set(names)

    # pretraining: one job on both nodes, 2 ranks (one per node), started after preprocessing ended
    info = slurm_cluster.job_info(ids["pretrain"])
    assert (info["NumNodes"], info["NodeList"], info["Restarts"]) == ("2", "node[1-2]", "0")
    assert "LAUNCHER=srun, 2 node(s) x 1 rank(s), master node1:" in logs["pretrain"]
    assert "2 ranks (dp 2 x stages 1)" in logs["pretrain"] and "from scratch" in logs["pretrain"]
    assert sorted(losses(work / "run")) == list(range(1, STEPS + 1))
    for earlier, later in (("preprocess", "pretrain"), ("pretrain", "convert"), ("convert", "finetune")):
        ends = [_time(i, "EndTime") for i in slurm_cluster.job_infos(ids[earlier])]
        assert _time(slurm_cluster.job_info(ids[later]), "StartTime") >= max(ends), (earlier, later)

    # conversion: a release directory; fine-tuning started from it and kept its best epoch
    assert {"config.json", "model.safetensors", "spm.model"} <= set(os.listdir(work / "release"))
    metrics = json.load(open(work / "finetune-CB" / "metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    assert os.path.exists(work / "finetune-CB" / "best" / "config.json")


def usr1_when(slurm_cluster, job, ready):
    """Once ready() holds, SIGUSR1 to the job's batch shell (as `--signal=B:USR1@SECS` before a time
    limit); then the job must complete after exactly one requeue. Returns its output."""
    deadline = time.monotonic() + 180
    while not ready():
        assert time.monotonic() < deadline and slurm_cluster.state(job) in ("PENDING", "RUNNING"), \
            slurm_cluster.output(job)
        time.sleep(0.2)
    slurm_cluster.cancel(job, "--signal=USR1", "--batch")
    state = slurm_cluster.wait(job, timeout=300)
    text = slurm_cluster.output(job)
    assert state == "COMPLETED", text
    assert slurm_cluster.restarts(job) == 1, text
    return text


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_signal_checkpoints_requeues_and_resumes_exactly(chain, slurm_cluster, launcher, tmp_path):
    """SIGUSR1 to the batch shell mid-run (as `--signal=B:USR1@SECS` before a time limit): the ranks
    save and exit 75, the job requeues itself and resumes with no flag; with dropout on, every
    step's loss equals the uninterrupted chain run (same data, same 2 ranks) bitwise. This run also
    evaluates every 2 steps (VALID_DATA_DIR; the training shards serve, only the plumbing is checked),
    which the chain run does not: the evaluation changes no training loss."""
    work, ids, states, logs = chain
    assert states[ids["pretrain"]] == "COMPLETED"
    out = tmp_path / "run"
    job = slurm_cluster.sbatch(os.path.join(SLURM, "pretrain.sbatch"), env=dict(
        JOB_ENV, LAUNCHER=launcher, RUN_CONFIG=TINY_RUN, DS_CONFIG=ZERO3, DATA_DIR=str(work / "shards"),
        VALID_DATA_DIR=str(work / "shards"), OUTPUT_DIR=str(out),
        EXTRA_ARGS=PRETRAIN_ARGS + " --set eval_interval=2 --set eval_steps=1"))
    text = usr1_when(slurm_cluster, job, lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 3)
    stopped = int(re.search(r"stopping on SIGUSR1 after step (\d+): checkpoint saved", text).group(1))
    assert 3 <= stopped < STEPS
    assert "got SIGUSR1: asking the job step to checkpoint" in text
    assert f"requeuing job {job} (restart 1)" in text
    assert f"resumed from global_step{stopped} at step {stopped}" in text
    assert f"LAUNCHER={launcher}, 2 node(s) x 1 rank(s)" in text
    baseline, resumed = losses(work / "run"), losses(out)
    assert [resumed[s] for s in range(1, STEPS + 1)] == [baseline[s] for s in range(1, STEPS + 1)]
    assert sorted(losses(out, "val_loss")) == sorted(set(range(2, STEPS + 1, 2)) | {STEPS})


def test_finetune_checkpoints_on_a_signal_requeues_and_finishes(chain, slurm_cluster, corpus, tmp_path):
    """finetune.sbatch gets SIGUSR1 in its second epoch: the rank saves and exits 75, the job requeues
    itself, and the next run continues from the checkpoint to the last epoch."""
    work = chain[0]
    out = tmp_path / "ft"
    job = slurm_cluster.sbatch(os.path.join(SLURM, "finetune.sbatch"), env=dict(
        JOB_ENV, TASK="CB", RELEASE_DIR=str(work / "release"), DATA_DIR=str(corpus / "superglue"),
        OUTPUT_DIR=str(out), DS_CONFIG=os.path.join(ROOT, "ds_configs", "finetune_cpu.json"),
        EXTRA_ARGS="--epochs 12 --batch-size 8 --max-seq-len 32"))
    text = usr1_when(slurm_cluster, job, lambda: "epoch 1:" in slurm_cluster.output(job))
    stopped = int(re.search(r"stopping on SIGUSR1 after step (\d+): checkpoint saved", text).group(1))
    assert 4 <= stopped < 48  # 4 steps per epoch, 12 epochs
    assert f"resumed from {out / 'checkpoints'} at epoch" in text and f"optimizer step {stopped}" in text
    assert f"requeuing job {job} (restart 1)" in text
    metrics = json.load(open(out / "metrics.json"))
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, 13))
    assert sorted(os.listdir(out)) == ["best", "deberta-ds.output.json", "metrics.json", "metrics.jsonl",
                                       "tensorboard"]


def test_pipeline_stages_that_do_not_fit_the_nodes_fail_the_job_before_srun(slurm_cluster, chain, tmp_path):
    work = chain[0]
    job = slurm_cluster.sbatch(os.path.join(SLURM, "pretrain.sbatch"), env=dict(
        JOB_ENV, RUN_CONFIG=TINY_RUN, DS_CONFIG=PIPE, DATA_DIR=str(work / "shards"), OUTPUT_DIR=str(tmp_path / "run"),
        EXTRA_ARGS="--set mode=pipeline --set pipeline_stages=4"))
    assert slurm_cluster.wait(job, timeout=120) == "FAILED"
    assert slurm_cluster.job_info(job)["ExitCode"] == "2:0"
    text = slurm_cluster.output(job)
    assert "2 node(s) x 1 rank(s) per node = 2 ranks, which is not divisible by pipeline_stages 4" in text
    assert "refused before starting" in text
    assert not (tmp_path / "run").exists()


# ---- without the cluster: the checks that run before anything starts -----------------------------

def run_script(script, env_extra, tmp_path, allocation=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DEBERTA_DS_PYTHON=sys.executable, DEBERTA_DS_WORKDIR=ROOT, PYTHONPATH=ROOT, **JOB_ENV)
    if allocation:  # what sbatch would set for a 3-node job (no srun happens: the checks come first)
        env.update(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-3]", SLURM_JOB_NUM_NODES="3",
                   SLURM_NNODES="3", SLURM_NTASKS_PER_NODE="1", SLURM_NTASKS="3")
    env.update(env_extra)
    return subprocess.run(["bash", os.path.join(SLURM, script)], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("script", ["pretrain.sbatch", "preprocess.sbatch", "convert.sbatch", "finetune.sbatch"])
def test_scripts_started_outside_an_allocation_say_so(script, tmp_path):
    result = run_script(script, {"OUTPUT_DIR": str(tmp_path / "out")}, tmp_path, allocation=False)
    assert result.returncode == 2
    assert "not inside a Slurm allocation (SLURM_JOB_ID is not set)" in result.stderr
    assert "Submit it:" in result.stderr and f" slurm/{script}" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script, settings, message", [
    ("convert.sbatch", {"CHECKPOINT": "{tmp}/nowhere/checkpoints", "RELEASE_DIR": "{tmp}/rel"},
     "CHECKPOINT={tmp}/nowhere/checkpoints: no such directory"),
    ("convert.sbatch", {"CHECKPOINT": "{tmp}", "RELEASE_DIR": "{tmp}/rel"},
     "holds no checkpoint (no global_step* directory)"),
    ("pretrain.sbatch", {"RUN_CONFIG": TINY_RUN, "DS_CONFIG": ZERO3, "DATA_DIR": "{tmp}/no-shards",
                         "OUTPUT_DIR": "{tmp}/run"}, "DATA_DIR={tmp}/no-shards: no such directory"),
    ("pretrain.sbatch", {"RUN_CONFIG": TINY_RUN, "DS_CONFIG": PIPE, "DATA_DIR": "{tmp}", "OUTPUT_DIR": "{tmp}/run",
                         "EXTRA_ARGS": "--set mode=pipeline --set pipeline_stages=2"},
     "3 node(s) x 1 rank(s) per node = 3 ranks, which is not divisible by pipeline_stages 2"),
    ("pretrain.sbatch", {"RUN_CONFIG": TINY_RUN, "DS_CONFIG": ZERO3, "DATA_DIR": "{tmp}", "OUTPUT_DIR": "{tmp}/run",
                         "LAUNCHER": "pdsh"}, "LAUNCHER=pdsh: use srun or deepspeed"),
    ("pretrain.sbatch", {"DS_CONFIG": ZERO3, "DATA_DIR": "{tmp}", "OUTPUT_DIR": "{tmp}/run"},
     "RUN_CONFIG is not set"),
    ("pretrain.sbatch", {"RUN_CONFIG": TINY_RUN, "DS_CONFIG": ZERO3, "DATA_DIR": "{tmp}", "OUTPUT_DIR": "{tmp}/run",
                         "VALID_DATA_DIR": "{tmp}/no-valid"}, "VALID_DATA_DIR={tmp}/no-valid: no such directory"),
    ("preprocess.sbatch", {"INPUT": "{tmp}/corpus/*.txt", "TOKENIZER": TINY_RUN, "OUTPUT_DIR": "{tmp}/shards"},
     "INPUT={tmp}/corpus/*.txt matches no file"),
    ("finetune.sbatch", {"TASK": "CB", "RELEASE_DIR": "{tmp}/no-release", "DATA_DIR": "{tmp}", "OUTPUT_DIR": "{tmp}/ft"},
     "RELEASE_DIR={tmp}/no-release: no such directory"),
])
def test_bad_input_is_refused_before_anything_starts(script, settings, message, tmp_path):
    fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
    before = sorted(os.listdir(tmp_path))
    result = run_script(script, {k: fill(v) for k, v in settings.items()}, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert fill(message) in result.stderr
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing started


def test_chain_refuses_bad_settings_before_submitting(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WORK=str(tmp_path / "w"), RUN_CONFIG=TINY_RUN, DS_CONFIG=ZERO3, INPUT=str(tmp_path / "none*"),
               TOKENIZER=TINY_RUN)
    result = subprocess.run(["bash", os.path.join(SLURM, "chain.sh")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"INPUT={tmp_path}/none* matches no file" in result.stderr
    assert not (tmp_path / "w").exists()
