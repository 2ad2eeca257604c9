"""A non-editable install runs every command from another directory: the wheel of this checkout installed into a
fresh venv (its dependencies taken from the test venv through a path entry, so nothing is downloaded and the
checkout is not on sys.path), then the whole flow of the demo at toy size through the installed `deberta-ds`,
with the run configs, the DeepSpeed configs and fine-tuning's default DeepSpeed config found by name."""
import os
import site
import subprocess
import sys
import venv

import pytest

from tests.helpers.launch import ROOT, single_rank
from tests.helpers.superglue import write_cb_like


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    wheels = work / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), ROOT], capture_output=True, text=True, cwd=str(work))
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = [p for p in wheels.iterdir() if p.suffix == ".whl"]
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    alone = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on it would count as installed
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True,
                          text=True, cwd=str(work), env=alone)
    assert done.returncode == 0, done.stderr[-3000:]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True).stdout.strip()
    # the test venv's packages (torch, deepspeed, ...) for the installed project, after its own site-packages
    with open(os.path.join(purelib, "test-dependencies.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return env_dir, work


def run(installed, *args, env=None, timeout=600):
    env_dir, work = installed
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PATH=f"{env_dir / 'bin'}:{environ.get('PATH', '')}")
    environ.update(env or {})
    return subprocess.run([str(env_dir / "bin" / "deberta-ds"), *args], capture_output=True, text=True,
                          cwd=str(work), env=environ, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_the_installed_package_runs_every_command_from_another_directory(installed):
    env_dir, work = installed
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import model, pipeline, pipeline.settings as s; "
                            "print(pipeline.__file__); print(s.shipped_dir('run')); print(s.shipped_dir('deepspeed'))"],
                           capture_output=True, text=True, cwd=str(work),
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    package, runs, deepspeed_configs = where.stdout.split()
    assert package.startswith(str(env_dir)) and runs.startswith(str(env_dir)) and deepspeed_configs.startswith(str(env_dir))
    ok(run(installed, "--help"))
    ok(run(installed, "corpus", "--output", "corpus", "--max-bytes", "300000"))
    ok(run(installed, "tokenizer", "train", "--input", "corpus/*", "--output", "spm", "--vocab-size", "1000"))
    ok(run(installed, "preprocess", "--input", "corpus/*", "--tokenizer", "spm.model", "--output-dir", "shards",
           "--max-seq-len", "128", "--no-progress"))
    single = single_rank()
    ok(run(installed, "pretrain", "--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32", "--data-dir", "shards",
           "--output-dir", "run", "--set", "max_steps=2", "--set", "save_interval=2", env=single))
    ok(run(installed, "convert", "to-release", "--checkpoint", "run/checkpoints", "--output", "release"))
    write_cb_like(str(work / "superglue" / "CB" / "train.jsonl"), 16, seed=1)
    write_cb_like(str(work / "superglue" / "CB" / "val.jsonl"), 8, seed=2)
    write_cb_like(str(work / "superglue" / "CB" / "test.jsonl"), 4, seed=3, labelled=False)
    single = single_rank()
    tuned = ok(run(installed, "finetune", "--task", "CB", "--release", "release", "--data-dir", "superglue",
                   "--output-dir", "cb", "--epochs", "1", "--batch-size", "8", "--max-seq-len", "32", env=single))
    assert "finetune_cpu.json" in tuned.stderr     # the default DeepSpeed config, found in the installed package
    ok(run(installed, "predict", "--task", "CB", "--model", "cb/best", "--data-dir", "superglue", "--output-dir",
           "submission", "--max-seq-len", "32"))
    assert (work / "submission" / "CB.jsonl").exists()
    assert "zero3" in ok(run(installed, "plan", "--config", "xxlarge", "--nodes", "2")).stdout
    assert '"source": "single"' in ok(run(installed, "launch", "env")).stdout
    outside = run(installed, "hostfile", "--output", "hostfile", env={"SLURM_JOB_NODELIST": ""})
    assert outside.returncode == 1 and outside.stderr.startswith("error: not inside a Slurm allocation")
