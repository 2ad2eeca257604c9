"""The DeepSpeed config of a run, for both trainers: read (a path or a shipped name), overridden (`--ds
key.sub=value`), checked and completed by one rule.

Each setting has one home. The trainer owns the batch sizes (and fine-tuning also the gradient clipping,
from its settings) and writes them into the DeepSpeed config: there they are absent or "auto", or they
must equal the trainer's value, else the run is refused naming both values. Precision, ZeRO, clipping in
pretraining and everything else live in the DeepSpeed config. The optimizer and the LR schedule come from
the trainer (pipeline/run/optim.py), so "optimizer" and "scheduler" sections are refused. DeepSpeed ignores a
top-level key it does not know (`gradient_clippingg` trains without clipping): here such a key is refused,
naming the closest known one. Keys and values inside the sections DeepSpeed builds as pydantic models are
checked against the running DeepSpeed's own models (pipeline/run/ds_schema.py), so `zero_optimization.stgae` is
refused here, in one line, not by DeepSpeed after the run directory exists; a number that is not finite (NaN,
Infinity) is refused anywhere in the config.
"""
import copy

from pipeline.run.ds_schema import check_sections
from pipeline.errors import ConfigError
from pipeline.settings import apply_overrides, check_finite, closest, config_file, read_json

# The top-level keys DeepSpeed 0.19.8 reads (deepspeed/runtime/config.py and the configs it builds), besides
# the ones it has removed and refuses itself (curriculum_learning, eigenvalue, elasticity, ...).
# tests/unit/test_ds_config.py checks that each one occurs in the installed DeepSpeed's source.
KNOWN_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "dump_state", "disable_allgather", "disable_python_gc", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "gradient_clipping", "communication_data_type", "seq_parallel_communication_data_type",
    "optimizer", "scheduler", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "fp16", "bf16", "bfloat16", "torch_autocast", "activation_checkpointing", "flops_profiler", "comms_logger",
    "tensorboard", "wandb", "csv_monitor", "comet", "autotuning", "checkpoint", "data_types", "pipeline",
    "data_efficiency", "weight_quantization", "aio", "dataloader_drop_last", "memory_breakdown",
    "wall_clock_breakdown", "timers", "hybrid_engine", "compile", "expert_parallel", "tensor_parallel",
    "use_data_before_expert_parallelism", "vocabulary_size", "managed_gradient_accumulation", "log_level",
    "sequence_parallel_size", "data_parallel_size",
)
IGNORED_KEYS = ("comment",)  # ours: a note in the file


AUTO = "auto"  # `deberta-ds pretrain --deepspeed auto`: the planner builds the config (pipeline/train/auto_ds.py)


def load_ds_config(name_or_path, overrides=()):
    """The DeepSpeed config file (by path, or a shipped name such as zero3_bf16) with `--ds` overrides,
    every key known to DeepSpeed (nested ones where DeepSpeed gives a schema), every number finite."""
    if name_or_path == AUTO:
        raise ConfigError("--deepspeed auto: only `deberta-ds pretrain` plans its DeepSpeed config; give a file or "
                          "the name of a shipped one here")
    path = config_file(name_or_path, "deepspeed")
    ds = apply_overrides(read_json(path, "DeepSpeed config"), overrides, option="--ds")
    return check_ds_config(ds, path, f"{path} with --ds" if overrides else path), path


def check_ds_config(ds, path, source):
    """`ds` without its comment, every top-level key known to DeepSpeed and every section we read well-formed;
    `path` names the file in messages, `source` the file and its overrides (a bad value may come from either)."""
    for key in ds:
        if key not in KNOWN_KEYS and key not in IGNORED_KEYS:
            raise ConfigError(f"{path}: unknown DeepSpeed setting {key!r}{closest(key, KNOWN_KEYS)}; DeepSpeed "
                              "would ignore it")
    ds.pop("comment", None)
    check_finite(ds, f"{source}: DeepSpeed setting")
    check_shapes(ds, source)
    check_sections(ds, source)
    return ds


SECTIONS = ("zero_optimization", "fp16", "bf16", "bfloat16", "activation_checkpointing", "checkpoint", "pipeline",
            "tensorboard", "wandb", "csv_monitor", "flops_profiler", "comms_logger", "data_types", "aio")


def check_shapes(ds, path):
    """The sections this code reads are objects, the ZeRO stage one of 0-3: `--ds bf16=true` (meant:
    bf16.enabled=true) is named here, not an AttributeError later."""
    for section in SECTIONS:
        if section in ds and not isinstance(ds[section], dict):
            raise ConfigError(f"{path}: DeepSpeed setting {section!r} must be an object, got {ds[section]!r} "
                              f"(a value inside it: --ds {section}.KEY=VALUE, e.g. "
                              f"{'zero_optimization.stage=3' if section == 'zero_optimization' else section + '.enabled=true'})")
    for parent in ("zero_optimization",):
        for child in ("offload_optimizer", "offload_param"):
            value = ds.get(parent, {}).get(child)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}: DeepSpeed setting '{parent}.{child}' must be an object, got {value!r} "
                                  f"(e.g. --ds {parent}.{child}.device=cpu)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


def zero_stage(ds):
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds):
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def offloads_optimizer(ds):
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def batch_fields(global_batch, micro_batch, dp_size, names=("global_batch_size", "micro_batch_size")):
    """DeepSpeed's three batch fields for a global batch over `dp_size` data-parallel ranks (`names`: what the
    trainer calls the two sizes, for the message)."""
    per_step = micro_batch * dp_size
    if global_batch % per_step:
        raise ConfigError(f"{names[0]} {global_batch} is not a multiple of {names[1]} {micro_batch} x data-parallel "
                          f"size {dp_size}")
    return {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": global_batch // per_step}


def complete_ds_config(ds, owned, source, who):
    """A copy of `ds` with the fields the trainer owns (`owned`: {field: value}) filled in: absent or "auto" is
    filled, an equal value kept, a different one refused naming both. `who` names the trainer's settings in
    messages ("the run config", "the fine-tuning settings")."""
    ds = copy.deepcopy(ds)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{source}: remove the {section!r} section: the optimizer (AdamW with per-group weight "
                              f"decay) and the LR schedule (warmup then linear decay) come from {who}")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: both fp16 and bf16 are enabled; choose one")
    for key, value in owned.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{source}: {key} is {given} but {who} gives {value}; remove it from the DeepSpeed "
                              "config (or write \"auto\") or make them agree")
        ds[key] = value
    left = [k for k, v in ds.items() if v == "auto"]
    if left:
        raise ConfigError(f"{source}: {', '.join(left)} is \"auto\" but {who} does not set it; give a value")
    return ds
