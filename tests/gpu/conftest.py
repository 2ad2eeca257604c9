"""The GPU tests (marker `gpu`, given by tests/conftest.py to everything in tests/gpu). pytest.ini leaves them
out of the default run (`-m "not gpu"`), so `make test` on a CPU machine neither runs nor skips them; asked for
explicitly (`pytest -m gpu tests/gpu`), each one fails on a machine without CUDA and says why, so that a GPU
check that did not run never reads as passed."""
import pytest


@pytest.fixture(autouse=True)
def cuda_device():
    import torch
    if not torch.cuda.is_available():
        pytest.fail(f"needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is False); "
                    "run the GPU tests on a GPU machine: bash bench/gpu_checks.sh, or pytest -m gpu tests/gpu",
                    pytrace=False)
