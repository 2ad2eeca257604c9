"""Record or compare a behaviour golden: the numbers a refactor must leave as they are.

    python scripts/golden.py record OUT.json [--demo-out DIR]   run the demo and a pipeline-mode run, write OUT.json
    python scripts/golden.py compare A.json B.json [--tol X]    bitwise (or within X) per entry; exit 1 on a difference

What is recorded:
  demo.pretrain    every step's training loss and the held-out losses of `make demo`'s pretraining (ZeRO-3, 2 ranks)
  demo.release     sha256 of every tensor of the release `convert to-release` made from it
  demo.finetune    every epoch's train/task/adversarial loss and val scores of the demo's fine-tuning (SiFT)
  demo.best        sha256 of every tensor of the fine-tuned best release, and of the submission file
  pipeline         the losses of a 2-stage pipeline-mode run on the demo's shards (2 ranks, 40 steps)
The losses are Python floats written with repr: equal text means bitwise equal values.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_STEPS = 40


def tensor_hashes(release_dir):
    from safetensors import safe_open
    hashes = {}
    for name in sorted(os.listdir(release_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(release_dir, name), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key).contiguous()
                    hashes[key] = hashlib.sha256(tensor.view(-1).view(dtype=__import__("torch").uint8).numpy()).hexdigest()
    return hashes


def read_losses(run_dir, key):
    found = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if key in record:
                found[str(record["step"])] = record[key]
    return found


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def pipeline_run(demo_out):
    """A 2-stage pipeline run of the demo's model on the demo's shards (deterministic: no dropout)."""
    out = os.path.join(demo_out, "pipeline_run")
    shutil.rmtree(out, ignore_errors=True)  # a run directory left from before would be resumed, not rerun
    env = dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "pipeline.cli", "pretrain", "--config", "configs/pretrain_tiny_cpu.json",
           "--deepspeed", "ds_configs/cpu_pipeline_fp32.json", "--data-dir", os.path.join(demo_out, "shards"),
           "--valid-data-dir", os.path.join(demo_out, "valid"), "--output-dir", out,
           "--set", "mode=pipeline", "--set", "pipeline_stages=2", "--set", f"max_steps={PIPELINE_STEPS}",
           "--set", "save_interval=1000", "--set", "eval_interval=20", "--set", "log_interval=10",
           "--set", "model_overrides.hidden_dropout_prob=0", "--set", "model_overrides.attention_probs_dropout_prob=0"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"pipeline run failed:\n{result.stderr[-4000:]}")
    return {"loss": read_losses(out, "loss"), "val_loss": read_losses(out, "val_loss")}


def record(path, demo_out):
    env = dict(os.environ, DEMO_OUT=demo_out)
    subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=ROOT, env=env, check=True)
    run = os.path.join(demo_out, "run")
    with open(os.path.join(demo_out, "finetune", "metrics.json"), encoding="utf-8") as f:
        finetune = json.load(f)
    golden = {
        "demo": {
            "pretrain": {"loss": read_losses(run, "loss"), "val_loss": read_losses(run, "val_loss")},
            "release": tensor_hashes(os.path.join(demo_out, "release")),
            "finetune": [{k: e[k] for k in ("epoch", "step", "train_loss", "task_loss", "adv_loss", "val")}
                         for e in finetune["epochs"]],
            "best": dict(tensor_hashes(os.path.join(demo_out, "finetune", "best")),
                         submission=file_sha256(os.path.join(demo_out, "submission", "BoolQ.jsonl"))),
        },
        "pipeline": pipeline_run(demo_out),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
    print(f"wrote {path}")


def leaves(value, prefix=""):
    if isinstance(value, dict):
        for key in sorted(value):
            yield from leaves(value[key], f"{prefix}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def compare(a_path, b_path, tol, only):
    a, b = (dict(leaves(json.load(open(p, encoding="utf-8")))) for p in (a_path, b_path))
    differ, worst = [], 0.0
    for key in sorted(set(a) | set(b)):
        if only and not key.startswith(only):
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, float) and isinstance(y, float):
            worst = max(worst, abs(x - y))
            if abs(x - y) > tol:
                differ.append((key, x, y))
        elif x != y:
            differ.append((key, x, y))
    for key, x, y in differ[:40]:
        print(f"{key}: {x!r} vs {y!r}")
    compared = sum(1 for k in set(a) | set(b) if not only or k.startswith(only))
    print(f"{compared} entries compared{' under ' + only if only else ''}: {len(differ)} differ "
          f"(tolerance {tol}); largest float difference {worst:.3g}")
    return 1 if differ else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("output")
    rec.add_argument("--demo-out", default="/tmp/deberta-ds-golden")
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("a")
    cmp_.add_argument("b")
    cmp_.add_argument("--tol", type=float, default=0.0)
    cmp_.add_argument("--only", default="", help="compare only entries under this prefix, e.g. /pipeline")
    args = parser.parse_args()
    if args.action == "record":
        record(os.path.abspath(args.output), os.path.abspath(args.demo_out))
        return 0
    return compare(args.a, args.b, args.tol, args.only)


if __name__ == "__main__":
    sys.exit(main())
