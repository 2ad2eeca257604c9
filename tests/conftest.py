"""Tests run against the checkout: pytest puts the repository root on sys.path (tests/ is a package), so
`model`, `pipeline` and `tests.helpers` import from here.

  tests/unit/         in-process (the Triton interpreter checks run one python subprocess each): `make unit`
  tests/integration/  real launches: torchrun with 2 gloo ranks, mpirun, sbatch on a local Slurm cluster, and a
                      non-editable install; marked `integration` (`-m "not integration"` leaves them out)
  tests/gpu/          checks that need a CUDA GPU (the Triton kernels on CUDA, the 1.5B against transformers);
                      marked `gpu` and left out of the default run by pytest.ini; `pytest -m gpu tests/gpu`
                      runs them (bench/gpu_checks.sh), and on a machine without CUDA each fails, saying so

The launch harness (tests/helpers/launch.py) and the synthetic SuperGLUE data (tests/helpers/superglue.py) are
shared with bench/ and scripts/demo.py.
"""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# fixtures shared by several modules, each built once per session
pytest_plugins = ["tests.helpers.data", "tests.helpers.pretrain", "tests.helpers.slurm", "tests.helpers.dist"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = os.path.basename(os.path.dirname(str(item.fspath)))
        if folder in ("unit", "integration", "gpu"):
            item.add_marker(getattr(pytest.mark, folder))
