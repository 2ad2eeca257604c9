"""DeBERTa-v2 configuration: transformers' `config.json` (model_type "deberta-v2") in and out.

Field names are transformers' keys, so a release directory is read and written without a mapping.
A key absent from a file takes transformers' default (not the 1.5B value): that is how transformers
itself reads the same file, so both load the same model.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

ATTENTION_IMPLS = ("auto", "math", "eager", "sdpa", "fused", "blockwise")
# earlier builds called the eager path "reference"; releases and run configs written then still load
ATTENTION_ALIASES = {"reference": "eager"}


ACTIVATION_NAMES = ("gelu", "relu", "tanh")  # the functions of model/layers.py ACTIVATIONS

@dataclass
class DebertaConfig:
    # transformers' keys and defaults (configuration_deberta_v2.py)
    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    attention_head_size: Optional[int] = None  # None: hidden_size // num_attention_heads
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1
    pad_token_id: int = 0
    position_biased_input: bool = True
    pos_att_type: List[str] = field(default_factory=list)
    position_buckets: int = -1
    share_att_key: bool = False
    norm_rel_ebd: str = "none"
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    embedding_size: Optional[int] = None  # None: hidden_size (no embed_proj)
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    pooler_hidden_size: Optional[int] = None
    cls_dropout: Optional[float] = None  # None: hidden_dropout_prob
    # ours (transformers keeps unknown keys as attributes and ignores them)
    # the attention path model/fast/convert.py applies to a model of this config where it is built to train or
    # run: "math" (the formula as written, model/attention.py), "eager", "sdpa", "fused", "blockwise"
    # (model/fast/), or "auto" (sdpa where CUDA is; on the CPU eager for short sequences, blockwise for long
    # ones). The plain model (not converted) always runs "math".
    attention_impl: str = "auto"

    def __post_init__(self):
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = [t.strip() for t in self.pos_att_type.lower().split("|") if t.strip()]
        self.pos_att_type = list(self.pos_att_type or [])
        self.attention_impl = ATTENTION_ALIASES.get(self.attention_impl, self.attention_impl)
        self.validate()

    # ---- derived sizes (one place, so the model never re-derives them differently) ----
    @property
    def head_size(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def embed_size(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """k: the number of relative distances on each side; the table has 2k rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def scale_factor(self) -> int:
        return 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)

    @property
    def classifier_dropout(self) -> float:
        return self.hidden_dropout_prob if self.cls_dropout is None else self.cls_dropout

    def validate(self):
        problems = []
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "conv_groups"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:  # the checks below divide by these
            raise ValueError("invalid DeBERTa config: " + "; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        unknown = set(self.pos_att_type) - {"c2p", "p2c"}
        if unknown:
            problems.append(f"pos_att_type {sorted(unknown)} not supported (only c2p and p2c; p2p was removed in the paper)")
        if self.relative_attention and self.position_buckets > 0 and self.position_buckets > self.max_relative:
            problems.append(f"position_buckets {self.position_buckets} is larger than the relative positions "
                            f"{self.max_relative} it buckets (max_relative_positions, or max_position_embeddings when -1)")
        if self.conv_kernel_size > 0 and self.conv_kernel_size % 2 == 0:
            problems.append(f"conv_kernel_size {self.conv_kernel_size} must be odd (the conv keeps the sequence length)")
        if self.conv_kernel_size > 0 and self.hidden_size % self.conv_groups:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by conv_groups {self.conv_groups}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.norm_rel_ebd not in ("none", "layer_norm"):
            problems.append(f"norm_rel_ebd {self.norm_rel_ebd!r} is not 'none' or 'layer_norm'")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.cls_dropout is not None and not 0 <= self.cls_dropout < 1:
            problems.append(f"cls_dropout must be in [0, 1), got {self.cls_dropout}")
        for name in ("hidden_act", "conv_act", "pooler_hidden_act"):
            if getattr(self, name) not in ACTIVATION_NAMES:
                problems.append(f"{name} {getattr(self, name)!r} is not one of {list(ACTIVATION_NAMES)}")
        if problems:
            raise ValueError("invalid DeBERTa config: " + "; ".join(problems))

    # ---- transformers' config.json ----
    @classmethod
    def from_dict(cls, values: dict) -> "DebertaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json(cls, path: str) -> "DebertaConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if values.get("model_type", "deberta-v2") not in ("deberta-v2", "deberta_v2"):
            raise ValueError(f"{path}: model_type is {values.get('model_type')!r}, expected 'deberta-v2'")
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values = {k: v for k, v in values.items() if v is not None}
        values["pos_att_type"] = list(self.pos_att_type)
        values["model_type"] = "deberta-v2"
        values["architectures"] = ["DebertaV2ForMaskedLM"]
        values["legacy"] = False  # our MLM head uses lm_predictions.lm_head.* (the official layout)
        values["tie_word_embeddings"] = True
        return dict(sorted(values.items()))

    def replace(self, **changes) -> "DebertaConfig":
        return dataclasses.replace(self, **changes)


# The v2 attention settings shared by every preset (spec §2.3-2.4).
_V2 = dict(
    relative_attention=True, position_buckets=256, max_relative_positions=-1, norm_rel_ebd="layer_norm",
    share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7, conv_kernel_size=3, conv_act="gelu",
    position_biased_input=False, type_vocab_size=0, max_position_embeddings=512, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02,
)

PRESETS = {
    # tiny: for tests and the CPU demo; same structure (buckets, conv, shared keys) at toy size
    "tiny": dict(_V2, vocab_size=1100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128, position_buckets=32),
    "base": dict(_V2, vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(_V2, vocab_size=128100, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096),
    # microsoft/deberta-v2-xlarge: the 1.5B config with 24 layers
    "xlarge": dict(_V2, vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                   attention_head_size=64, intermediate_size=6144),
    # microsoft/deberta-v2-xxlarge, the 1.5B model (spec §2.4)
    "xxlarge": dict(_V2, vocab_size=128100, hidden_size=1536, num_hidden_layers=48, num_attention_heads=24,
                    attention_head_size=64, intermediate_size=6144),
}


# DeBERTa-v3 discriminators (the official experiments/language_model/rtd_*.json); the generator of each has the
# same width and half the depth (model/rtd.py generator_config_of). No conv, no absolute positions in the input.
_V3 = dict(_V2, conv_kernel_size=0, conv_act="tanh", attention_head_size=64, vocab_size=128100)
PRESETS.update({
    "v3-xsmall": dict(_V3, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "v3-small": dict(_V3, hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "v3-base": dict(_V3, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "v3-large": dict(_V3, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
})


def preset(name: str, **overrides) -> DebertaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return DebertaConfig(**dict(PRESETS[name], **overrides))
