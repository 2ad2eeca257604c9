"""A fine-tuning run as typed data: `FinetuneRun` (the task, where the run starts, its data, output and
DeepSpeed config) holding `FinetuneConfig` (the training settings). The settings come from the task's preset
(presets/superglue.json), then `--preset-overrides FILE.json`, then `--set key=value` (dotted keys reach into
"sift"), then the named options of NAMED_OPTIONS (--lr, --batch-size, ...): the last one wins. Every key is
known and every value of its type, or the run is refused before anything starts, naming the setting (and the
closest known key). The command line stops at `FinetuneRun.from_args`: the trainer reads the run only.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from model.config import ATTENTION_ALIASES, ATTENTION_IMPLS
from pipeline.errors import ConfigError
from pipeline.settings import apply_overrides, build_dataclass, read_json, set_dotted

PRESETS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets", "superglue.json")
ASCENT_LOSS_NAMES = ("symmetric-kl", "kl", "mse")  # pipeline/finetune/sift.py
REQUIRED = ("lr", "batch_size", "epochs", "warmup_steps", "cls_drop_out", "max_seq_len")


@dataclass
class SiFTSettings:
    """SiFT (paper §4, pipeline/finetune/sift.py); `enabled` is the preset's wish, which `--sift auto` follows
    for the 1.5B model only."""
    enabled: bool = False
    vat_lambda: float = 5.0
    vat_init_perturbation: float = 1e-2
    vat_learning_rate: float = 1e-4
    vat_loss_fn: str = "symmetric-kl"
    mode: str = "auto"  # --sift: auto | on | off (set by the command)


@dataclass
class FinetuneConfig:
    lr: Optional[float] = None                # peak learning rate
    batch_size: Optional[int] = None          # global batch, all ranks together
    epochs: Optional[int] = None
    warmup_steps: Optional[int] = None        # optimizer steps of linear warmup
    cls_drop_out: Optional[float] = None      # dropout before the classifier
    max_seq_len: Optional[int] = None         # tokens per sequence, [CLS] and [SEP] included
    micro_batch_size: Optional[int] = None    # per rank and forward; default batch_size / ranks
    eval_batch_size: Optional[int] = None     # per forward in evaluation; default micro_batch_size
    seed: int = 42
    weight_decay: float = 0.01
    adam_eps: float = 1e-6
    adam_betas: Tuple[float, ...] = (0.9, 0.999)
    clip_grad_norm: float = 1.0               # DeepSpeed's gradient_clipping
    start_from: str = "pretrained"            # "pretrained", or "MNLI": the preset's advice (--init-from-mnli)
    attention_impl: Optional[str] = None      # None: the release's (model/config.py ATTENTION_IMPLS)
    group_by_length: bool = True              # training batches of similar lengths (pipeline/finetune/batches.py)
    sift: SiFTSettings = field(default_factory=SiFTSettings)

    @classmethod
    def from_values(cls, values, where):
        values = dict(values)
        sift = values.pop("sift", {})
        if not isinstance(sift, dict):
            raise ConfigError(f"{where}: sift: expected a JSON object, got {json.dumps(sift)}")
        config = build_dataclass(cls, values, where)
        config.sift = build_dataclass(SiFTSettings, sift, f"{where}: sift")
        config.validate(where)
        return config

    def validate(self, where="fine-tuning settings"):
        for name in REQUIRED:
            if getattr(self, name) is None:
                raise ConfigError(f"{where}: setting {name!r} is missing (not in the preset: pass it)")
        for name in ("batch_size", "epochs", "max_seq_len", "micro_batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{where}: {name} must be at least 1, got {value}")
        if self.max_seq_len < 4:
            raise ConfigError(f"{where}: max_seq_len {self.max_seq_len} leaves no room for text ([CLS] a [SEP] b [SEP])")
        for name in ("lr", "warmup_steps", "weight_decay", "clip_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}: {name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seed range
            raise ConfigError(f"{where}: seed must be in [0, 2**32), got {self.seed}")
        if not 0 <= self.cls_drop_out < 1:
            raise ConfigError(f"{where}: cls_drop_out must be in [0, 1), got {self.cls_drop_out}")
        if not (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas)) or self.adam_eps <= 0:
            raise ConfigError(f"{where}: adam_betas must be two numbers in [0, 1) and adam_eps positive")
        if self.start_from not in ("pretrained", "MNLI"):
            raise ConfigError(f"{where}: start_from {self.start_from!r} is not 'pretrained' or 'MNLI'")
        impl = ATTENTION_ALIASES.get(self.attention_impl, self.attention_impl)
        if impl is not None and impl not in ATTENTION_IMPLS:
            raise ConfigError(f"{where}: attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        sift = self.sift
        if sift.vat_loss_fn not in ASCENT_LOSS_NAMES:
            raise ConfigError(f"{where}: sift.vat_loss_fn {sift.vat_loss_fn!r} is not one of {ASCENT_LOSS_NAMES}")
        if min(sift.vat_lambda, sift.vat_init_perturbation, sift.vat_learning_rate) < 0:
            raise ConfigError(f"{where}: sift.vat_lambda, vat_init_perturbation and vat_learning_rate must be >= 0")
        if sift.mode not in ("auto", "on", "off"):
            raise ConfigError(f"{where}: sift.mode {sift.mode!r} is not auto, on or off")

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class FinetuneRun:
    """The whole run: what `deberta-ds finetune` was asked to do, with its resolved settings."""
    task: str
    settings: FinetuneConfig
    output_dir: str
    release: Optional[str] = None          # start from a release directory ...
    init_from_mnli: Optional[str] = None   # ... or from an MNLI-fine-tuned one (its classifier rows)
    data_dir: Optional[str] = None         # official SuperGLUE layout; None: `datasets`
    deepspeed: Optional[str] = None        # a DeepSpeed config file or shipped name; None: by device
    tokenizer: Optional[str] = None        # None: spm.model in the start directory
    save_dtype: str = "float32"            # dtype of the weights in OUT/best
    overwrite: bool = False                # replace a finished run of other settings in output_dir

    @property
    def start(self):
        return self.release or self.init_from_mnli

    @classmethod
    def from_args(cls, args, task):
        named = {key: getattr(args, dest) for _, dest, key, _ in NAMED_OPTIONS}
        named["sift.mode"] = args.sift
        settings = resolve(task.name, args.preset_overrides, args.set, named)
        return cls(task=task.name, settings=settings, output_dir=args.output_dir, release=args.release,
                   init_from_mnli=args.init_from_mnli, data_dir=args.data_dir, deepspeed=args.deepspeed,
                   tokenizer=args.tokenizer, save_dtype=args.save_dtype, overwrite=args.overwrite)


def _options():
    from pipeline.cli_types import at_least, positive_float, positive_int
    return [  # (flag, argparse dest, settings key, argparse keywords)
        ("--lr", "lr", "lr", dict(type=positive_float, help="peak learning rate (preset: lr)")),
        ("--batch-size", "batch_size", "batch_size",
         dict(type=positive_int, help="global batch size, all ranks together (preset: batch_size)")),
        ("--micro-batch-size", "micro_batch_size", "micro_batch_size",
         dict(type=positive_int, help="examples per rank per forward (default: batch size / ranks; the rest is "
              "gradient accumulation)")),
        ("--eval-batch-size", "eval_batch_size", "eval_batch_size",
         dict(type=positive_int, help="examples per forward in evaluation (default: the micro-batch size)")),
        ("--epochs", "epochs", "epochs", dict(type=positive_int, help="training epochs (preset: epochs)")),
        ("--warmup-steps", "warmup_steps", "warmup_steps",
         dict(type=at_least(0), help="optimizer steps of linear warmup (preset: warmup_steps)")),
        ("--cls-drop-out", "cls_drop_out", "cls_drop_out",
         dict(type=float, help="dropout before the classifier (preset: cls_drop_out)")),
        ("--max-seq-len", "max_seq_len", "max_seq_len",
         dict(type=at_least(4), help="tokens per sequence, [CLS] and [SEP] included (preset)")),
        ("--seed", "seed", "seed", dict(type=int, help="random seed (default 42)")),
        ("--attention-impl", "attention_impl", "attention_impl",
         dict(choices=ATTENTION_IMPLS, help="attention implementation (default: the release's; model/attention.py)")),
        ("--sift-lambda", "sift_lambda", "sift.vat_lambda",
         dict(type=float, help="SiFT weight λ of the adversarial loss (preset: sift.vat_lambda)")),
        ("--sift-init", "sift_init", "sift.vat_init_perturbation",
         dict(type=float, help="SiFT σ of the initial perturbation (preset: sift.vat_init_perturbation)")),
        ("--sift-step", "sift_step", "sift.vat_learning_rate",
         dict(type=float, help="SiFT ascent step size η (preset: sift.vat_learning_rate)")),
        ("--sift-loss-fn", "sift_loss_fn", "sift.vat_loss_fn",
         dict(choices=ASCENT_LOSS_NAMES, help="loss of the SiFT ascent step (preset: sift.vat_loss_fn)")),
    ]


NAMED_OPTIONS = _options()


def add_named_options(parser):
    for flag, dest, _, keywords in NAMED_OPTIONS:
        parser.add_argument(flag, dest=dest, **keywords)


def load_preset(task_name, path=PRESETS_PATH):
    """Fine-tuning values for a task: the file's "defaults" overlaid with the task's entry (keys starting with
    "_", provenance notes, are left out)."""
    presets = read_json(path, "fine-tuning presets")
    if task_name not in presets["tasks"]:
        raise ConfigError(f"no preset for {task_name} in {path}")
    preset = {}
    for layer in (presets["defaults"], presets["tasks"][task_name]):
        for key, value in layer.items():
            if key.startswith("_"):
                continue
            if isinstance(value, dict) and isinstance(preset.get(key), dict):
                preset[key] = {**preset[key], **{k: v for k, v in value.items() if not k.startswith("_")}}
            else:
                preset[key] = json.loads(json.dumps(value))  # a copy: callers may edit it
    return preset


def resolve(task_name, preset_overrides=None, sets=(), named=None):
    """The FinetuneConfig of a task: preset, then the overrides file, then --set items, then named options
    ({dotted key: value}, None for an option not given)."""
    values = load_preset(task_name)
    if preset_overrides:
        for key, value in read_json(preset_overrides, "preset overrides").items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key].update(value)
            else:
                values[key] = value
    apply_overrides(values, sets)
    for key, value in (named or {}).items():
        if value is not None:
            set_dotted(values, key, value)
    return FinetuneConfig.from_values(values, "fine-tuning settings")
