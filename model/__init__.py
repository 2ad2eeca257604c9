"""DeBERTa-v2 in plain PyTorch. Nothing here imports DeepSpeed: parallelism is applied from outside."""
from model.config import PRESETS, DebertaConfig, preset  # noqa: F401
from model.encoder import DebertaModel, Output  # noqa: F401,E402
from model.heads import DebertaForMaskedLM, DebertaForMultipleChoice, DebertaForSequenceClassification  # noqa: F401,E402
from model.release import CheckpointError, load_release, save_release  # noqa: F401,E402
