"""What the benches that launch `deberta-ds` share: the checkout's root, a CLI call that stops the bench with
the command's error, and a free port for torchrun. Imported as `runs` (a bench runs as `python bench/X.py`, so
bench/ is on sys.path)."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, env):
    """`deberta-ds ARGS` from the checkout; the bench stops with the command's error if it fails."""
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"deberta-ds {args[0]} failed:\n{result.stderr[-3000:]}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_pretrain(sets, deepspeed, data_dir, out, env, what="pretrain"):
    """`deberta-ds pretrain` under torchrun on 2 CPU ranks with the tiny config and `--set` items `sets`, the
    DeepSpeed config ds_configs/DEEPSPEED.json; the records of its metrics.jsonl (the bench stops if it fails)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pipeline.cli", "pretrain", "--config", os.path.join(ROOT, "configs", "pretrain_tiny_cpu.json"),
           "--deepspeed", os.path.join(ROOT, "ds_configs", f"{deepspeed}.json"), "--data-dir", data_dir,
           "--output-dir", out] + [a for s in sets for a in ("--set", s)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed:\n{result.stderr[-4000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
