"""Everything `deberta-ds pretrain` can check before DeepSpeed starts: the run config, the DeepSpeed config
completed for the world size, the data and tokenizer directories. `deberta-ds pretrain --check-only --nodes N
--ranks-per-node R ...` runs the same checks for a job of N x R ranks and exits (slurm/pretrain.sbatch does,
in the batch shell, so that a bad job fails in seconds with one line before any rank starts).
"""
import json
import os

from pipeline.run.ds_config import AUTO, batch_fields, complete_ds_config, load_ds_config, offloads_optimizer
from pipeline.errors import ConfigError, DataError
from pipeline.io import make_dirs
from pipeline.run.lifecycle import say
from pipeline.train.config import RunConfig
from pipeline.train.modes import stepper_class


def run_overrides(args):
    """--set items, then the named options (--data-dir, ...), which win."""
    overrides = list(args.set)
    for option, key in (("data_dir", "data_dir"), ("output_dir", "output_dir"), ("valid_data_dir", "valid_data_dir")):
        value = getattr(args, option, None)
        if value:
            overrides.append(f"{key}={json.dumps(value)}")
    return overrides


def dp_size_of(run, world_size):
    """Data-parallel ranks: the world over the ranks of one pipeline or one sequence group."""
    if world_size % run.pipeline_stages:
        raise ConfigError(f"world size {world_size} is not divisible by pipeline_stages {run.pipeline_stages}: every "
                          f"pipeline needs {run.pipeline_stages} ranks")
    if world_size % run.sequence_parallel_size:
        raise ConfigError(f"world size {world_size} is not divisible by sequence_parallel_size "
                          f"{run.sequence_parallel_size}: every sequence group needs {run.sequence_parallel_size} ranks")
    return world_size // run.pipeline_stages // run.sequence_parallel_size


def complete_for_run(run, ds, dp_size, source):
    """The DeepSpeed config of this run: batch sizes from the run config, the mode's own checks."""
    fields = batch_fields(run.global_batch_size, run.micro_batch_size, dp_size)
    if run.sequence_parallel_size > 1:
        from pipeline.train.sequence_parallel import deepspeed_batch_fields
        fields = deepspeed_batch_fields(fields, run.sequence_parallel_size)
    ds = complete_ds_config(ds, fields, source, "the run config")
    if offloads_optimizer(ds) and run.optimizer != "cpu_adam":
        raise ConfigError(f"{source}: offload_optimizer to CPU needs optimizer 'cpu_adam' in the run config "
                          f"(DeepSpeedCPUAdam), got {run.optimizer!r}")
    return stepper_class(run).prepare_ds_config(run, ds, source)


def prepare(args, world_size, ranks_per_node=1, local_rank=0, announce=True):
    """(run config, completed DeepSpeed config), or a DebertaDSError naming what is wrong. `--deepspeed auto`
    plans the DeepSpeed config, micro-batch and recomputation for world_size ranks, ranks_per_node to a node
    (pipeline/train/auto_ds.py; `announce`: print the choice)."""
    run = fit_to_data(RunConfig.from_file(args.config, run_overrides(args)), announce)
    if args.deepspeed == AUTO:
        from pipeline.train.auto_ds import resolve
        check_inputs(run)  # first: the plan reads the shards' sequence length
        run, ds, source = resolve(run, args.ds, world_size, ranks_per_node, local_rank, announce)
    else:
        ds, source = load_ds_config(args.deepspeed, args.ds)
    ds = complete_for_run(run, ds, dp_size_of(run, world_size), source)
    check_inputs(run)
    make_dirs(run.output_dir, "run directory")  # last: a refused run leaves nothing behind
    return run, ds


def fit_to_data(run, announce=True):
    """The run with its position table as long as the shards' sequences (RunConfig.fitted_to), the change said
    once. A missing data directory is check_inputs' to report, unreadable shards the loader's."""
    if not run.data_dir or not os.path.isdir(run.data_dir):
        return run
    from pipeline.data.shards import ShardError, ShardSet
    try:
        seq_len = ShardSet(run.data_dir).max_seq_len
    except ShardError:  # the data loader says what is wrong with the shards, where it reads them
        return run
    run, notice = run.fitted_to(seq_len)
    if notice and announce:
        say(0, notice)
    return run


def check_inputs(run):
    """The run's directories and files exist (auto reads the shards' sequence length)."""
    if not run.output_dir:
        raise ConfigError("no output directory: give --output-dir or output_dir in the run config")
    if not run.data_dir or not os.path.isdir(run.data_dir):
        raise DataError(f"data directory {run.data_dir!r} does not exist (give --data-dir)")
    if run.valid_data_dir and not os.path.isdir(run.valid_data_dir):
        raise DataError(f"validation directory {run.valid_data_dir!r} does not exist")
    if not os.path.exists(run.tokenizer_path()):
        raise DataError(f"{run.tokenizer_path()}: no tokenizer (the shard directory carries spm.model; or set tokenizer)")
    if run.init_from_release and not os.path.isdir(run.init_from_release):
        raise ConfigError(f"init_from_release {run.init_from_release!r}: no such release directory")


def check_job(args):
    """--check-only: the checks of `prepare` for a world of nodes x ranks per node."""
    world = args.nodes * args.ranks_per_node
    stages = RunConfig.from_file(args.config, run_overrides(args)).pipeline_stages
    if world % stages:
        raise ConfigError(f"{args.nodes} node(s) x {args.ranks_per_node} rank(s) per node = {world} ranks, which is not "
                          f"divisible by pipeline_stages {stages}: every pipeline needs {stages} ranks. Use a node count "
                          f"whose rank total is a multiple of {stages} (sbatch --nodes=...), or change pipeline_stages.")
    run, _ = prepare(args, world, args.ranks_per_node)
    print(f"preflight ok: {world} ranks ({args.nodes} x {args.ranks_per_node}), pipeline_stages "
          f"{run.pipeline_stages}, data {run.data_dir}")
    return 0
