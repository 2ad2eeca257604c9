"""What the CPU pretraining benches share (`python -m bench.pipeline_step`, `python -m bench.rtd_step`): shards
of the demo corpus, built once in a work directory, and `deberta-ds pretrain` on 2 CPU ranks with the tiny
config, read back from its metrics.jsonl. The commands start through the launch harness
(tests/helpers/launch.py); a command that fails stops the bench with its error."""
import os

from tests.helpers.launch import ROOT, cli, metrics, or_exit, pretrain


def demo_shards(work, seq):
    """WORK/shards-SEQ: the demo corpus (1.5 MB), a 1000-piece tokenizer and shards of SEQ tokens; reused when
    a previous invocation built them."""
    shards = os.path.join(work, f"shards-{seq}")
    if os.path.exists(os.path.join(shards, "spm.model")):
        return shards
    corpus, spm = os.path.join(work, "corpus"), os.path.join(work, "spm")
    for args in (["corpus", "--output", corpus, "--max-bytes", "1500000"],
                 ["tokenizer", "train", "--input", os.path.join(corpus, "*"), "--output", spm, "--vocab-size", "1000"],
                 ["preprocess", "--input", os.path.join(corpus, "*"), "--tokenizer", spm + ".model", "--output-dir",
                  shards, "--max-seq-len", str(seq), "--no-progress"]):
        or_exit(cli(*args, timeout=None), f"deberta-ds {args[0]}")
    return shards


def pretrain_metrics(sets, deepspeed, data_dir, out, what="pretrain"):
    """`deberta-ds pretrain` under torchrun on 2 CPU ranks, configs/pretrain_tiny_cpu.json with the `--set` items
    `sets`, DeepSpeed config ds_configs/DEEPSPEED.json; the records of its metrics.jsonl."""
    ds = os.path.join(ROOT, "ds_configs", f"{deepspeed}.json")
    or_exit(pretrain(data_dir, out, sets=sets, ds=ds, timeout=None), what)
    return metrics(out)
