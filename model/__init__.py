"""DeBERTa-v2 in plain PyTorch: the formulas with torch's modules. Parallelism is applied from outside
(pipeline/train/), the fast pieces by one converter (model/fast/convert.py), and release directories are read
and written by pipeline/release/. Importing this package imports neither a distributed runtime nor triton."""
from model.config import PRESETS, DebertaConfig, preset
from model.encoder import DebertaModel, Output
from model.heads import DebertaForEntityScoring, DebertaForMaskedLM, DebertaForMultipleChoice, DebertaForSequenceClassification

__all__ = ["PRESETS", "DebertaConfig", "preset", "DebertaModel", "Output", "DebertaForMaskedLM",
           "DebertaForMultipleChoice", "DebertaForSequenceClassification", "DebertaForEntityScoring"]
