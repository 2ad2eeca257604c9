"""A pretraining run as declarative data: one JSON run config (model, data, schedule, checkpoints), given by
path or by the name of a shipped one (`xxlarge`: configs/pretrain_xxlarge.json), with command-line overrides
(`--set key=value`, dotted keys into model_overrides). Every setting is typed and checked before anything
starts: an unknown key is refused naming the closest known one, a value of the wrong type or out of range
names the setting.

Each setting has one home. Batch sizes live here and are written into the DeepSpeed config (pipeline/
ds_config.py); precision, gradient clipping and ZeRO settings live in the DeepSpeed config.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from model.config import PRESETS, DebertaConfig
from pipeline.errors import ConfigError
from pipeline.settings import apply_overrides, build_dataclass, closest, config_file, read_json

MODES = ("zero3", "pipeline")
OBJECTIVES = ("mlm", "rtd")
OPTIMIZERS = ("adamw", "cpu_adam")
RTD_TRAININGS = ("decoupled", "joint")


@dataclass
class RunConfig:
    # model: a preset name plus overrides of its fields (model/config.py PRESETS)
    model: str = "xxlarge"
    model_overrides: dict = field(default_factory=dict)
    emd: bool = True  # Enhanced Mask Decoder (the paper's pretraining head; with objective rtd: the generator's)
    # objective: "mlm" (DeBERTa-v2: MLM + EMD) or "rtd" (DeBERTa-v3: a generator and a discriminator, replaced
    # token detection; model/rtd.py). The model above is then the discriminator.
    objective: str = "mlm"
    generator_layers: int = 0  # rtd: the generator's depth (same width); 0: half the discriminator's
    embedding_sharing: str = "gdes"  # rtd: "gdes" (gradient-disentangled), "es" (one shared table) or "none"
    rtd_lambda: float = 10.0  # rtd: weight of the discriminator's loss (the official code's default; the paper 50)
    discriminator_lr: Optional[float] = None  # rtd: the discriminator's peak learning rate; None: lr
    # rtd: "decoupled" (the official default, `--decoupled_training True`): the generator and the discriminator
    # each have their own engine (optimizer, clipping, loss scale, schedule) and step one after the other
    # (pipeline/train/rtd_decoupled.py); "joint": one engine, one step on L_MLM + rtd_lambda * L_RTD (rtd.py)
    rtd_training: str = "decoupled"
    # engine
    mode: str = "zero3"  # "zero3": DeepSpeedEngine with ZeRO (stage from the DS config); "pipeline": PipelineModule + ZeRO-0/1
    pipeline_stages: int = 1
    # zero3 mode: ranks per sequence (DeepSpeed Ulysses, pipeline/train/sequence_parallel.py): each of SP ranks
    # holds 1/SP of every sequence's tokens; data-parallel ranks = world / SP. Must divide the attention heads
    # and the data's sequence length.
    sequence_parallel_size: int = 1
    activation_checkpointing: bool = False
    # ZeRO-3: gather each encoder layer's parameters as one group (a DeepSpeed leaf module), so ZeRO-3's hooks
    # run once per layer rather than once per Linear and LayerNorm (pipeline/train/zero3.py, leaf_layers)
    zero3_leaf_layers: bool = True
    # data
    data_dir: str = ""
    tokenizer: str = ""  # spm.model; default: <data_dir>/spm.model
    seed: int = 1234
    # batch (the paper: global batch 2k of 512-token sequences)
    global_batch_size: int = 2048
    micro_batch_size: int = 8
    # optimizer: AdamW, no weight decay on biases and LayerNorm weights (pipeline/run/optim.py)
    lr: float = 1.5e-4
    warmup_steps: int = 10_000
    max_steps: int = 1_000_000
    weight_decay: float = 0.01
    adam_betas: Tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 1e-6
    optimizer: str = "adamw"  # "adamw" (torch; fused on CUDA) or "cpu_adam" (DeepSpeedCPUAdam, for optimizer offload)
    # checkpoints
    output_dir: str = ""
    save_interval: int = 1000  # steps; also on SIGTERM/SIGUSR1
    keep_last: int = 3
    init_from_release: str = ""  # start from a release directory (transformers layout) instead of random weights
    # held-out evaluation (pipeline/train/evaluate.py): every eval_interval steps and at the last step, the
    # objective's loss over the first eval_steps global batches of valid_data_dir, the same samples and masks
    valid_data_dir: str = ""  # shards from `deberta-ds preprocess` with the training tokenizer; "": none
    eval_interval: int = 1000
    eval_steps: int = 10
    # logging
    log_interval: int = 10
    peak_tflops: Optional[float] = None  # per device, for the MFU estimate; None: a guess from the device name
    # robustness
    max_nonfinite_steps: int = 20  # fp16: stop after this many skipped (non-finite) steps in a row

    def model_config(self) -> DebertaConfig:
        return model_config_of(self.model, self.model_overrides)

    def generator_config(self) -> DebertaConfig:
        """objective rtd: the generator's config (the model's width, generator_layers deep)."""
        from model.rtd import generator_config_of
        return generator_config_of(self.model_config(), self.generator_layers)

    @classmethod
    def from_file(cls, name_or_path, overrides=()):
        path = config_file(name_or_path, "run")
        values = apply_overrides(read_json(path, "run config"), overrides)
        run = build_dataclass(cls, values, path)
        run.validate(f"{path} with --set" if overrides else path)  # a bad value may come from either
        return run

    def validate(self, source="run config"):
        """Every setting in range, and the model config valid: a ConfigError naming the setting otherwise."""
        if self.mode not in MODES:
            raise ConfigError(f"{source}: mode {self.mode!r} is not one of {MODES}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{source}: objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.objective == "rtd" and self.mode == "pipeline":
            raise ConfigError(f"{source}: objective 'rtd' runs in mode 'zero3' only: DeepSpeed's pipeline engine "
                              "takes one loss, at the last stage, and sums the gradients of tied weights, while rtd "
                              "has a second loss at the generator's end and gdes needs the discriminator to read the "
                              "generator's word table without its gradient (a tie would turn it into es); use mode "
                              "zero3 (ZeRO-1, 2 or 3 by the DeepSpeed config)")
        from model.rtd import SHARING
        if self.embedding_sharing not in SHARING:
            raise ConfigError(f"{source}: embedding_sharing {self.embedding_sharing!r} is not one of {SHARING}")
        if self.rtd_training not in RTD_TRAININGS:
            raise ConfigError(f"{source}: rtd_training {self.rtd_training!r} is not one of {RTD_TRAININGS}")
        if self.objective == "rtd" and self.rtd_training == "decoupled" and self.embedding_sharing == "es":
            raise ConfigError(f"{source}: embedding_sharing 'es' trains one word table with both losses, which needs "
                              "one step over both networks: set rtd_training 'joint' for it (in decoupled training "
                              "each engine steps its own parameters; the official decoupled trainer drops the "
                              "table's RTD gradient, which is gdes without the delta), or use embedding_sharing "
                              "'gdes'")
        if self.rtd_lambda < 0 or self.generator_layers < 0:
            raise ConfigError(f"{source}: rtd_lambda and generator_layers must not be negative")
        if self.discriminator_lr is not None and self.discriminator_lr < 0:
            raise ConfigError(f"{source}: discriminator_lr must not be negative, got {self.discriminator_lr}")
        if self.sequence_parallel_size < 1:
            raise ConfigError(f"{source}: sequence_parallel_size must be at least 1, got {self.sequence_parallel_size}")
        if self.mode == "pipeline" and self.sequence_parallel_size != 1:
            raise ConfigError(f"{source}: sequence_parallel_size {self.sequence_parallel_size} needs mode 'zero3': "
                              "DeepSpeed's pipeline engine passes one activation tensor between stages and averages "
                              "gradients over its own data-parallel groups, which do not know of sequence groups; use "
                              "mode zero3 (ZeRO-3 partitions the model as the pipeline would)")
        if self.mode == "zero3" and self.pipeline_stages != 1:
            raise ConfigError(f"{source}: pipeline_stages={self.pipeline_stages} needs mode 'pipeline'")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{source}: optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        for name in ("global_batch_size", "micro_batch_size", "max_steps", "save_interval", "keep_last",
                     "log_interval", "pipeline_stages", "eval_interval", "eval_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{source}: {name} must not be negative, got {getattr(self, name)}")
        if not (len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas)):
            raise ConfigError(f"{source}: adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"{source}: adam_eps must be positive, got {self.adam_eps}")
        if not 0 <= self.seed < 2 ** 32:  # numpy's seed range; torch's is wider
            raise ConfigError(f"{source}: seed must be in [0, 2**32), got {self.seed}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"{source}: peak_tflops must be positive, got {self.peak_tflops}")
        try:
            config = self.model_config()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if config.num_attention_heads % self.sequence_parallel_size:
            raise ConfigError(f"{source}: sequence_parallel_size {self.sequence_parallel_size} does not divide the "
                              f"{config.num_attention_heads} attention heads of model {self.model!r}: each rank of a "
                              "sequence group attends with an equal share of the heads")
        if self.mode == "pipeline" and config.num_hidden_layers < 2:
            raise ConfigError(f"{source}: mode 'pipeline' needs at least 2 encoder layers (the first stage's block "
                              f"carries the conv, the last one's the EMD), model {self.model!r} has "
                              f"{config.num_hidden_layers}")
        if self.objective == "rtd" and self.generator_layers > config.num_hidden_layers:
            raise ConfigError(f"{source}: generator_layers {self.generator_layers} is deeper than the discriminator's "
                              f"{config.num_hidden_layers} layers (model {self.model!r}); the generator is the smaller "
                              "network (the official v3 models: half the depth)")

    def to_dict(self):
        return dataclasses.asdict(self)

    def fitted_to(self, seq_len):
        """(this run for data of seq_len tokens, a one-line notice or None). A model with an absolute position
        table (the EMD's; the input's with position_biased_input) needs a row per position: a longer sequence than
        max_position_embeddings gets a table of seq_len rows, in model_overrides, so the checkpoints' model config,
        a resume on the same data and the release all have it. max_relative_positions -1 means "follow
        max_position_embeddings": it is pinned to the old value, so the relative attention (its log buckets) stays
        what the preset defines and a release of the preset still fits; only the absolute table grows."""
        config = self.model_config()
        has_table = config.position_biased_input or self.emd
        if not has_table or seq_len <= config.max_position_embeddings:
            return self, None
        overrides = dict(self.model_overrides, max_position_embeddings=seq_len)
        if config.max_relative_positions < 1:
            overrides["max_relative_positions"] = config.max_relative
        notice = (f"data of {seq_len} tokens: the absolute position table grows from {config.max_position_embeddings} "
                  f"to {seq_len} rows (model_overrides.max_position_embeddings={seq_len}; relative positions as "
                  f"before, max_relative_positions={overrides.get('max_relative_positions', config.max_relative)})")
        return dataclasses.replace(self, model_overrides=overrides), notice

    def tokenizer_path(self):
        return self.tokenizer or os.path.join(self.data_dir, "spm.model")


def model_config_of(preset_name, overrides):
    """The DeBERTa config of a preset with overrides, every override a known field of the right type."""
    if preset_name not in PRESETS:
        raise ConfigError(f"model: unknown preset {preset_name!r}; choose one of {sorted(PRESETS)}"
                          f"{closest(preset_name, PRESETS)}")
    try:
        return build_dataclass(DebertaConfig, dict(PRESETS[preset_name], **overrides), "model_overrides")
    except ConfigError:
        raise
    except ValueError as e:  # DebertaConfig.validate: sizes that do not fit together
        raise ConfigError(f"model: {e}") from None
