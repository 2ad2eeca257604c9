"""How the tests, the benches and the demo start the project's commands, in one place: the checkout's root, a
free port, the environment of a child run, `deberta-ds` as a subprocess, torchrun around it, what a run wrote
to metrics.jsonl, and the check that a failure is one line.

No pytest here (the fixtures are in tests/helpers/pretrain.py and data.py): `python -m bench.NAME` and
`python -m scripts.demo` import this module too."""
import json
import os
import subprocess
import sys

from pipeline.launch.env import free_port  # noqa: F401  (the one free-port finder; imported from here)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_RUN = os.path.join(ROOT, "configs", "pretrain_tiny_cpu.json")
ZERO3 = os.path.join(ROOT, "ds_configs", "cpu_zero3_fp32.json")
PIPE = os.path.join(ROOT, "ds_configs", "cpu_pipeline_fp32.json")
NO_DROPOUT = ["model_overrides.hidden_dropout_prob=0", "model_overrides.attention_probs_dropout_prob=0"]
# what a launcher sets; a child run must not inherit the ones of the process that starts it
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_env(extra=None, cpu=True, threads=1, root=ROOT):
    """The environment of a child run: this checkout first on PYTHONPATH, no launcher variables inherited,
    DS_ACCELERATOR=cpu (cpu=False: DeepSpeed picks the accelerator, e.g. CUDA), OMP_NUM_THREADS=threads (one
    by default: on a shared 2-core machine two threads made the tiny runs about 20 times slower), then
    `extra`."""
    env = dict(os.environ, PYTHONPATH=root, TOKENIZERS_PARALLELISM="false")
    for key in LAUNCH_VARIABLES:
        env.pop(key, None)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


def single_rank(extra=None):
    """What `torchrun --nproc_per_node 1` sets, for a DeepSpeed command started without a launcher."""
    return dict({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, **(extra or {}))


def cli_command(*args):
    """`deberta-ds ARGS` as the checkout runs it."""
    return [sys.executable, "-m", "pipeline.cli", *args]


def torchrun_command(nproc, *module_args):
    """torchrun with nproc local ranks on a free port, then `-m MODULE_ARGS...` (e.g. "pipeline.cli", "pretrain")."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", *module_args]


def cli(*args, extra_env=None, env=None, timeout=300):
    """`deberta-ds ARGS` in a subprocess from the root; the CompletedProcess (output captured as text)."""
    return subprocess.run(cli_command(*args), cwd=ROOT, env=env or run_env(extra_env), capture_output=True,
                          text=True, timeout=timeout)


def or_exit(result, what):
    """result, when its command succeeded; otherwise this program (a bench) stops with the command's error."""
    if result.returncode != 0:
        sys.exit(f"error: {what} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result


# runs the rest of argv with files limited to N bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a write beyond it fails
# with EFBIG, a real OS error from a real write, as ENOSPC on a full disk)
FILE_LIMIT = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
              "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def pretrain_command(data_dir, out_dir, nproc=2, sets=(), ds=ZERO3, ds_sets=(), config=TINY_RUN, args=()):
    """torchrun --nproc_per_node N -m pipeline.cli pretrain --config CONFIG --deepspeed DS ... with `--set` items
    `sets` and `--ds` items `ds_sets`."""
    cmd = torchrun_command(nproc, "pipeline.cli", "pretrain", "--config", str(config), "--deepspeed", str(ds),
                           "--data-dir", str(data_dir), "--output-dir", str(out_dir))
    for item in sets:
        cmd += ["--set", item]
    for item in ds_sets:
        cmd += ["--ds", item]
    return cmd + list(args)


def pretrain(data_dir, out_dir, nproc=2, sets=(), ds=ZERO3, ds_sets=(), config=TINY_RUN, extra_env=None,
             timeout=600, args=(), file_limit=None):
    """`deberta-ds pretrain` under torchrun on the CPU (gloo); the CompletedProcess. file_limit: no file of the
    run may grow beyond this many bytes."""
    cmd = pretrain_command(data_dir, out_dir, nproc, sets, ds, ds_sets, config, args)
    if file_limit:
        cmd = [sys.executable, "-c", FILE_LIMIT, str(file_limit)] + cmd[1:]
    return subprocess.run(cmd, cwd=ROOT, env=run_env(extra_env), capture_output=True, text=True, timeout=timeout)


def metrics(out_dir):
    """The records of OUT_DIR/metrics.jsonl, in order."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def losses(out_dir, key="loss"):
    """{step: loss} from metrics.jsonl (the last record of a step wins: a resumed run rewrites it);
    key="val_loss" gives the held-out evaluations."""
    return {record["step"]: record[key] for record in metrics(out_dir) if key in record}


def explain(result):
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"


def one_line_error(result, *fragments, exit_code=None):
    """A failure a user can cause (result: a CompletedProcess): exit code `exit_code` (any non-zero one when
    None), exactly one line with "error:" on stderr, no traceback, and each fragment in that line."""
    code, stderr = result.returncode, result.stderr
    assert code not in (0, None) and (exit_code is None or code == exit_code), f"exit {code}\n{stderr[-2000:]}"
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
