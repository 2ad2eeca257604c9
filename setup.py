"""DeBERTa-DS: pretrain and fine-tune DeBERTa-v2 (up to 1.5B) with DeepSpeed."""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithConfigs(build_py):
    """Ship the run configs (configs/) and DeepSpeed configs (ds_configs/) inside the package, as
    pipeline/shipped/{configs,ds_configs}: an installed `deberta-ds` finds them by name (pipeline/settings.py
    looks beside the package first, as a checkout has them)."""

    def run(self):
        super().run()
        for folder in ("configs", "ds_configs"):
            target = os.path.join(self.build_lib, "pipeline", "shipped", folder)
            os.makedirs(target, exist_ok=True)
            for path in glob.glob(os.path.join(HERE, folder, "*.json")):
                shutil.copy(path, target)


setup(
    name="deberta-ds",
    version="0.2.0",
    description="DeBERTa pretraining (v2: MLM + EMD, v3: replaced token detection) and SuperGLUE fine-tuning "
                "(SiFT) on DeepSpeed",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["model", "model.*", "pipeline", "pipeline.*"]),
    package_data={"pipeline.finetune": ["presets/*.json"]},
    cmdclass={"build_py": BuildWithConfigs},
    # A range, not a pin: keep the torch a GPU cluster already has.
    install_requires=[
        "torch>=2.4",  # torch.get_autocast_dtype(device_type), is_autocast_enabled(device_type)
        "deepspeed>=0.15",
        "sentencepiece>=0.1.99",
        "datasets>=2.14",
        "tensorboard>=2.12",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "protobuf",  # the tokenizer edits the sentencepiece model proto (normalizer off)
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],  # needs a system MPI (Debian: openmpi-bin libopenmpi-dev)
        # triton: the GPU kernels' tests run them on the CPU in its interpreter (TRITON_INTERPRET=1)
        "dev": ["pytest>=7", "transformers>=4.46", "accelerate", "protobuf", "tiktoken", "scikit-learn",
                "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["deberta-ds=pipeline.cli:main"]},
)
