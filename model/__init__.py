"""DeBERTa-v2 in plain PyTorch. Nothing here imports DeepSpeed: parallelism is applied from outside
(pipeline/train/), and release directories are read and written by pipeline/release/."""
from model.config import PRESETS, DebertaConfig, preset
from model.encoder import DebertaModel, Output
from model.heads import DebertaForEntityScoring, DebertaForMaskedLM, DebertaForMultipleChoice, DebertaForSequenceClassification

__all__ = ["PRESETS", "DebertaConfig", "preset", "DebertaModel", "Output", "DebertaForMaskedLM",
           "DebertaForMultipleChoice", "DebertaForSequenceClassification", "DebertaForEntityScoring"]
