"""Shared pieces of the pretraining tests: a tiny corpus -> tokenizer -> shards (once per session), and
real multi-process runs of `deberta-ds pretrain` (pipeline/train/pretrain.py) under torchrun (gloo on the CPU)."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RUN = os.path.join(ROOT, "configs", "pretrain_tiny_cpu.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "cpu_zero3_fp32.json")
PIPE = os.path.join(ROOT, "ds_configs", "cpu_pipeline_fp32.json")
NO_DROPOUT = ["model_overrides.hidden_dropout_prob=0", "model_overrides.attention_probs_dropout_prob=0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def cli(*args, extra_env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=run_env(extra_env),
                          capture_output=True, text=True, timeout=timeout)


# runs the rest of argv with files limited to N bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a write beyond it fails
# with EFBIG, a real OS error from a real write, as ENOSPC on a full disk)
FILE_LIMIT = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
              "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def pretrain(data_dir, out_dir, nproc=2, sets=(), ds=ZERO3, ds_sets=(), config=TINY_RUN, extra_env=None,
             timeout=600, args=(), file_limit=None):
    """torchrun --nproc_per_node N -m pipeline.cli pretrain ...; returns the CompletedProcess. file_limit: no
    file of the run may grow beyond this many bytes."""
    limit = [sys.executable, "-c", FILE_LIMIT, str(file_limit)] if file_limit else [sys.executable]
    cmd = limit + ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "pipeline.cli", "pretrain",
           "--config", config, "--deepspeed", ds, "--data-dir", str(data_dir), "--output-dir", str(out_dir)]
    for item in sets:
        cmd += ["--set", item]
    for item in ds_sets:
        cmd += ["--ds", item]
    cmd += list(args)
    return subprocess.run(cmd, cwd=ROOT, env=run_env(extra_env), capture_output=True, text=True, timeout=timeout)


def losses(out_dir, key="loss"):
    """{step: loss} from metrics.jsonl (the last record of a step wins: a resumed run rewrites it);
    key="val_loss" gives the held-out evaluations."""
    found = {}
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if key in record:
                found[record["step"]] = record[key]
    return found


def explain(result):
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """The embedded corpus through the real pipeline: corpus -> tokenizer (1000 pieces) -> 128-token shards."""
    work = tmp_path_factory.mktemp("pretrain_data")
    for args in (["corpus", "--output", str(work / "corpus"), "--max-bytes", "400000"],
                 ["tokenizer", "train", "--input", str(work / "corpus" / "*"), "--output", str(work / "spm"),
                  "--vocab-size", "1000"],
                 ["preprocess", "--input", str(work / "corpus" / "*"), "--tokenizer", str(work / "spm.model"),
                  "--output-dir", str(work / "shards"), "--max-seq-len", "128", "--workers", "1", "--no-progress"]):
        result = cli(*args)
        assert result.returncode == 0, explain(result)
    return work / "shards"


@pytest.fixture(scope="session")
def valid_shards(tiny_shards):
    """Validation shards: one corpus file through `preprocess` again (held-out data in a real run; here it
    overlaps the training data, which the evaluation mechanics do not care about)."""
    work = tiny_shards.parent
    first = sorted((work / "corpus").iterdir())[0]
    result = cli("preprocess", "--input", str(first), "--tokenizer", str(work / "spm.model"), "--output-dir",
                 str(work / "valid"), "--max-seq-len", "128", "--workers", "1", "--no-progress")
    assert result.returncode == 0, explain(result)
    return work / "valid"


def eval_sets(valid_dir, interval=2, steps=1):
    return [f"valid_data_dir={json.dumps(str(valid_dir))}", f"eval_interval={interval}", f"eval_steps={steps}"]
