"""Every option of every subcommand, given a bad value: one line naming the option or the file and the problem,
a non-zero exit, no traceback (in process, through pipeline.cli.main as `deberta-ds` runs it).

The walk covers each option with a type or a set of choices automatically; the table below adds the values
that only the command itself can judge (settings, files, paths)."""
import argparse
import importlib
import subprocess

import pytest

from pipeline import cli
from tests.helpers.launch import one_line_error

# a start that passes argparse for each command, so that the one bad value is the only problem
REQUIRED = {
    "corpus": ["--output", "{tmp}/corpus"],
    "tokenizer": ["train", "--output", "{tmp}/spm", "--input", "{tmp}/none.txt"],
    "preprocess": ["--tokenizer", "{tmp}/spm.model", "--output-dir", "{tmp}/shards", "--input", "{tmp}/none.txt"],
    "plan": ["--config", "xxlarge"],
    "pretrain": ["--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32", "--output-dir", "{tmp}/run"],
    "convert": ["to-release", "--checkpoint", "{tmp}/ckpt", "--output", "{tmp}/release"],
    "finetune": ["--task", "CB", "--release", "{tmp}/release", "--output-dir", "{tmp}/out"],
    "predict": ["--task", "CB", "--model", "{tmp}/release", "--output-dir", "{tmp}/out"],
    "hostfile": ["--nodelist", "node1"],
    "launch": ["env"],
}
BAD_FOR_TYPE = "x1"          # no int, no float, no size
SKIP = {"--help", "--local_rank"}


def run_cli(argv, capsys):
    """pipeline.cli.main(argv) in this process, as a CompletedProcess (exit code and stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as stop:
        code = stop.code
    return subprocess.CompletedProcess(argv, code, "", capsys.readouterr().err)


def typed_options():
    """(command, prefix argv, option, bad value) for every option with a type or choices."""
    cases = []
    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = cli.Parser(prog=f"deberta-ds {name}")
        module.add_arguments(parser)
        parsers = [(parser, [])]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers = [(p, [sub]) for sub, p in action.choices.items()]
        for sub_parser, prefix in parsers:
            for action in sub_parser._actions:
                option = next((o for o in action.option_strings if o.startswith("--")), None)
                if option is None or option in SKIP or not (action.type or action.choices):
                    continue
                cases.append((name, prefix, option, "nonsense" if action.choices else BAD_FOR_TYPE))
    return cases


@pytest.mark.parametrize("command, prefix, option, value", typed_options(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_typed_option_refuses_a_bad_value_in_one_line(command, prefix, option, value, capsys, tmp_path):
    base = [a.format(tmp=tmp_path) for a in REQUIRED[command]]
    if prefix:  # a subcommand's option: that subcommand in place of the one REQUIRED starts with
        base = prefix + base[1:]
    argv = [command] + base + [option, value]
    one_line_error(run_cli(argv, capsys), f"argument {option}", exit_code=2)


SEMANTIC = [
    (["pretrain", "--set", "max_steps=abc"], 'max_steps: expected an integer, got "abc"'),
    (["pretrain", "--set", "max_steps=1.5"], "max_steps: expected an integer, got 1.5"),
    (["pretrain", "--set", "lr=abc"], 'lr: expected a number, got "abc"'),
    (["pretrain", "--set", "model_overrides.hiden_size=32"], "model_overrides: unknown setting 'hiden_size'"),
    (["pretrain", "--set", "max_step=3"], "unknown setting 'max_step' (did you mean 'max_steps'?)"),
    (["pretrain", "--set", "lr"], "--set 'lr': expected KEY=VALUE"),
    (["pretrain", "--ds", "gradient_clippingg=1.0"], "unknown DeepSpeed setting 'gradient_clippingg' (did you mean 'gradient_clipping'?)"),
    (["pretrain", "--ds", "zero_optimization.stgae=3"],
     "unknown DeepSpeed setting 'zero_optimization.stgae' (did you mean 'stage'?)"),
    (["pretrain", "--ds", "gradient_clipping=NaN"], "DeepSpeed setting 'gradient_clipping' is NaN: expected a finite number"),
    (["pretrain", "--set", "lr=NaN"], "lr: expected a finite number, got NaN"),
    (["pretrain", "--set", "lr=Infinity"], "lr: expected a finite number, got Infinity"),
    (["pretrain", "--set", "adam_betas=[0.9,NaN]"], "adam_betas[1]: expected a finite number, got NaN"),
    (["pretrain", "--set", "model_overrides.layer_norm_eps=-Infinity"], "layer_norm_eps: expected a finite number, got -Infinity"),
    (["finetune", "--set", "lr=NaN"], "lr: expected a finite number, got NaN"),
    (["finetune", "--set", "sift.vat_lambda=Infinity"], "sift: vat_lambda: expected a finite number, got Infinity"),
    (["finetune", "--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    (["plan", "--set", "lr=NaN"], "lr: expected a finite number, got NaN"),
    (["pretrain", "--config", "tiny_cpux"], "tiny_cpux: no such run config file"),
    (["pretrain", "--set", "model_overrides.num_attention_heads=0"], "num_attention_heads must be positive, got 0"),
    (["pretrain", "--set", "model_overrides.conv_groups=0"], "conv_groups must be positive, got 0"),
    (["pretrain", "--set", "model_overrides.hidden_act=swish"], "hidden_act 'swish' is not one of"),
    (["pretrain", "--set", "model_overrides.hidden_dropout_prob=1.5"], "hidden_dropout_prob must be in [0, 1), got 1.5"),
    (["pretrain", "--set", "model_overrides.hidden_size=66"], "hidden_size 66 is not divisible by num_attention_heads"),
    (["pretrain", "--set", "mode=pipeline", "--set", "pipeline_stages=2", "--set", "model_overrides.num_hidden_layers=1"],
     "mode 'pipeline' needs at least 2 encoder layers"),
    (["pretrain", "--set", "seed=-1"], "seed must be in [0, 2**32), got -1"),
    (["pretrain", "--ds", "bf16=true"], "with --ds: DeepSpeed setting 'bf16' must be an object, got True"),
    (["pretrain", "--ds", "zero_optimization=3"], "e.g. zero_optimization.stage=3"),
    (["pretrain", "--ds", "zero_optimization.stage=x"], "zero_optimization.stage must be 0, 1, 2 or 3, got 'x'"),
    (["finetune", "--set", "seed=4294967296"], "seed must be in [0, 2**32), got 4294967296"),
    (["pretrain", "--data-dir", "{tmp}/nowhere"], "does not exist (give --data-dir)"),
    (["finetune", "--set", "epocs=3"], "unknown setting 'epocs' (did you mean 'epochs'?)"),
    (["finetune", "--set", "sift.vat_lamda=3"], "sift: unknown setting 'vat_lamda'"),
    (["finetune", "--set", "lr=abc"], 'lr: expected a number, got "abc"'),
    (["finetune", "--set", "batch_size=0"], "batch_size must be at least 1, got 0"),
    (["finetune", "--deepspeed", "finetune_cpux"], "finetune_cpux: no such DeepSpeed config file"),
    (["finetune", "--task", "SQuAD"], "--task SQuAD: unknown task"),
    (["predict", "--task", "MNLI"], "MNLI is the intermediate task"),
    (["predict", "--task", "SQuAD"], "--task SQuAD: unknown task"),
    (["convert", "--max-shard-size", "lots"], "--max-shard-size 'lots': not a size"),
    (["convert"], "{tmp}/ckpt: no such directory"),
    (["plan", "--nodes", "0"], "argument --nodes: must be at least 1, got 0"),
    (["plan", "--gpu-memory-gb", "-1"], "argument --gpu-memory-gb: must be positive, got -1"),
    (["plan", "--set", "lr=x"], 'lr: expected a number, got "x"'),
    (["tokenizer", "--vocab-size", "3"], "argument --vocab-size: must be at least 8, got 3"),
    (["tokenizer"], "{tmp}/none.txt: no such file"),
    (["preprocess", "--max-seq-len", "1"], "argument --max-seq-len: must be at least 3, got 1"),
    (["preprocess", "--workers", "0"], "argument --workers: must be at least 1, got 0"),
    (["corpus", "--max-bytes", "0"], "argument --max-bytes: must be at least 1, got 0"),
    (["corpus", "--output", "/proc/deberta-ds-test/corpus"], "/proc/deberta-ds-test/corpus: cannot create the corpus directory"),
    (["hostfile", "--slots", "0"], "argument --slots: must be at least 1, got 0"),
    (["pretrain", "--nodes", "0", "--check-only"], "argument --nodes: must be at least 1, got 0"),
]


@pytest.mark.parametrize("argv, message", SEMANTIC, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_values_only_the_command_can_judge_are_refused_in_one_line(argv, message, capsys, tmp_path):
    command, extra = argv[0], argv[1:]
    base = [a.format(tmp=tmp_path) for a in REQUIRED[command]]
    result = run_cli([command] + base + [a.format(tmp=tmp_path) for a in extra], capsys)
    one_line_error(result, message.format(tmp=tmp_path))


def test_a_deepspeed_config_refused_inside_a_section_leaves_no_run_directory(tmp_path):
    # a typo inside a section passed the checks and DeepSpeed refused it after the run directory existed
    from tests.helpers.launch import cli as run_deberta_ds
    data = tmp_path / "shards"
    data.mkdir()
    (data / "spm.model").write_bytes(b"")  # the preflight checks only that it exists
    ds = tmp_path / "ds.json"
    ds.write_text('{"fp16": {"enabledd": true}}')
    done = run_deberta_ds("pretrain", "--config", "tiny_cpu", "--deepspeed", str(ds), "--data-dir", str(data),
                          "--output-dir", str(tmp_path / "run"), timeout=300)
    one_line_error(done, f"{ds}: unknown DeepSpeed setting 'fp16.enabledd' (did you mean 'enabled'?)", exit_code=1)
    assert not (tmp_path / "run").exists()
