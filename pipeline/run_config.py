"""A pretraining run as declarative data: one JSON run config (model, data, schedule, checkpoints)
plus one DeepSpeed config from ds_configs/ (ZeRO stage, precision, clipping, offload), both with
command-line overrides (`--set key=value`, `--ds key.sub=value`).

Each setting has one home. Batch sizes live here (the run config) and are written into the DeepSpeed
config; precision, gradient clipping and ZeRO settings live in the DeepSpeed config. A DeepSpeed
config that states a batch size different from the run's is refused rather than silently overridden.
"""
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from model.config import DebertaConfig, preset

MODES = ("zero3", "pipeline")


class ConfigError(ValueError):
    """A run that cannot start: names the file or the setting."""


@dataclass
class RunConfig:
    # model: a preset name plus overrides of its fields (model/config.py PRESETS)
    model: str = "xxlarge"
    model_overrides: dict = field(default_factory=dict)
    emd: bool = True  # Enhanced Mask Decoder (the paper's pretraining head)
    # engine
    mode: str = "zero3"  # "zero3": DeepSpeedEngine with ZeRO (stage from the DS config); "pipeline": PipelineModule + ZeRO-0/1
    pipeline_stages: int = 1
    activation_checkpointing: bool = False
    # ZeRO-3: gather each encoder layer's parameters as one group (a DeepSpeed leaf module), so ZeRO-3's hooks
    # run once per layer rather than once per Linear and LayerNorm (pipeline/engine.py, leaf_layers)
    zero3_leaf_layers: bool = True
    # data
    data_dir: str = ""
    tokenizer: str = ""  # spm.model; default: <data_dir>/spm.model
    seed: int = 1234
    # batch (the paper: global batch 2k of 512-token sequences)
    global_batch_size: int = 2048
    micro_batch_size: int = 8
    # optimizer: AdamW, no weight decay on biases and LayerNorm weights (paper Table 8, official optimizer)
    lr: float = 1.5e-4
    warmup_steps: int = 10_000
    max_steps: int = 1_000_000
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-6
    optimizer: str = "adamw"  # "adamw" (torch; fused on CUDA) or "cpu_adam" (DeepSpeedCPUAdam, for optimizer offload)
    # checkpoints
    output_dir: str = ""
    save_interval: int = 1000  # steps; also on SIGTERM/SIGUSR1
    keep_last: int = 3
    init_from_release: str = ""  # start from a release directory (transformers layout) instead of random weights
    # held-out evaluation (pipeline/evaluate.py): every eval_interval steps and at the last step, the MLM
    # loss over the first eval_steps global batches of valid_data_dir, the same samples and masks each time
    valid_data_dir: str = ""  # shards from `deberta-ds preprocess` with the training tokenizer; "": none
    eval_interval: int = 1000
    eval_steps: int = 10
    # logging
    log_interval: int = 10
    peak_tflops: Optional[float] = None  # per device, for the MFU estimate; None: a guess from the device name
    # robustness
    max_nonfinite_steps: int = 20  # fp16: stop after this many skipped (non-finite) steps in a row

    def model_config(self) -> DebertaConfig:
        return preset(self.model, **self.model_overrides)

    @classmethod
    def from_file(cls, path, overrides=()):
        values = read_json(path, "run config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - {"comment"})
        if unknown:
            raise ConfigError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        values.pop("comment", None)
        for item in overrides:
            key, value = parse_override(item)
            top = key.split(".")[0]
            if top not in known:
                raise ConfigError(f"--set {item}: unknown setting {top!r}")
            set_dotted(values, key, value)
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        run = cls(**values)
        run.validate(path)
        return run

    def validate(self, source="run config"):
        if self.mode not in MODES:
            raise ConfigError(f"{source}: mode {self.mode!r} is not one of {MODES}")
        if self.mode == "zero3" and self.pipeline_stages != 1:
            raise ConfigError(f"{source}: pipeline_stages={self.pipeline_stages} needs mode 'pipeline'")
        if self.optimizer not in ("adamw", "cpu_adam"):
            raise ConfigError(f"{source}: optimizer {self.optimizer!r} is not 'adamw' or 'cpu_adam'")
        for name in ("global_batch_size", "micro_batch_size", "max_steps", "save_interval", "keep_last",
                     "log_interval", "pipeline_stages", "eval_interval", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} must be at least 1, got {getattr(self, name)}")
        try:
            self.model_config()
        except ValueError as e:
            raise ConfigError(f"{source}: model: {e}") from None

    def to_dict(self):
        return dataclasses.asdict(self)


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def parse_override(item):
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # a bare string such as mode=pipeline
    return key.strip(), value


def set_dotted(values, key, value):
    parts = key.split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


# ---------------------------------------------------------------- the DeepSpeed config
def load_ds_config(path, overrides=()):
    ds = read_json(path, "DeepSpeed config")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(ds, key, value)
    return ds


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


def complete_ds_config(run: RunConfig, ds: dict, dp_size: int, source="DeepSpeed config"):
    """The DeepSpeed config for this run and data-parallel size: batch sizes filled in from the run
    config, contradictions refused with both values named."""
    ds = copy.deepcopy(ds)
    stage = zero_stage(ds)
    if run.mode == "pipeline" and stage >= 2:
        raise ConfigError(f"{source}: ZeRO stage {stage} with mode 'pipeline': DeepSpeed's pipeline engine refuses "
                          "ZeRO-2 and ZeRO-3 (they are incompatible with pipeline parallelism). Use mode 'zero3' "
                          "for ZeRO-2/3, or a ZeRO-0/1 config (ds_configs/pipeline_zero1.json) for pipeline mode.")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: both fp16 and bf16 are enabled; choose one")
    per_step = run.micro_batch_size * dp_size
    if run.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size {run.global_batch_size} is not a multiple of micro_batch_size "
                          f"{run.micro_batch_size} x data-parallel size {dp_size}")
    accumulation = run.global_batch_size // per_step
    wanted = {"train_batch_size": run.global_batch_size, "train_micro_batch_size_per_gpu": run.micro_batch_size,
              "gradient_accumulation_steps": accumulation}
    for key, value in wanted.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{source}: {key} is {ds[key]} but the run config gives {value} "
                              f"(global {run.global_batch_size}, micro {run.micro_batch_size}, data-parallel "
                              f"{dp_size}); remove it from the DeepSpeed config or make them agree")
        ds[key] = value
    if offloads_optimizer(ds) and run.optimizer != "cpu_adam":
        raise ConfigError(f"{source}: offload_optimizer to CPU needs optimizer 'cpu_adam' in the run config "
                          f"(DeepSpeedCPUAdam), got {run.optimizer!r}")
    if run.mode == "pipeline":
        pipe = ds.setdefault("pipeline", {})
        if pipe.get("activation_checkpoint_interval", 0) and not run.activation_checkpointing:
            raise ConfigError(f"{source}: activation checkpointing is a run-config setting "
                              "(activation_checkpointing: true); remove pipeline.activation_checkpoint_interval")
        # stage inputs carry integer tensors (mask, labels): only the non-reentrant checkpoint accepts them
        pipe["use_reentrant"] = False
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{source}: the optimizer and LR schedule come from the run config (AdamW with "
                          "per-group weight decay, warmup + linear decay); remove 'optimizer'/'scheduler'")
    return ds


def default_tokenizer(run: RunConfig):
    return run.tokenizer or os.path.join(run.data_dir, "spm.model")
