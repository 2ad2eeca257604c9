"""Release directories (the layout transformers loads): reading (read.py), writing (write.py), and converting
training checkpoints into them (convert.py, `deberta-ds convert`)."""
from pipeline.release.read import Release, load_release, read_state_dict
from pipeline.release.write import save_release

__all__ = ["Release", "load_release", "read_state_dict", "save_release"]
