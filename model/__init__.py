"""DeBERTa-v2 in plain PyTorch. Nothing here imports DeepSpeed: parallelism is applied from outside."""
from model.config import PRESETS, DebertaConfig, preset
from model.encoder import DebertaModel, Output
from model.heads import DebertaForMaskedLM, DebertaForMultipleChoice, DebertaForSequenceClassification
from model.release import CheckpointError, load_release, save_release

__all__ = ["PRESETS", "DebertaConfig", "preset", "DebertaModel", "Output", "DebertaForMaskedLM",
           "DebertaForMultipleChoice", "DebertaForSequenceClassification", "CheckpointError", "load_release",
           "save_release"]
