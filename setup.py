"""varitok: variable-length visual tokenizers and coarse-to-fine generators, trained at scale."""
from setuptools import find_packages, setup

setup(
    name="varitok",
    version="0.1.0",
    description="Distributed pretraining pipeline for dynamic-granularity x factorized VQ tokenizers "
    "and coarse-to-fine autoregressive image generators",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "data", "data.*", "models", "models.*"]),
    include_package_data=True,
    package_data={"": ["*.yaml", "*.json"]},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "deepspeed>=0.15",
        "webdataset>=0.2.90",
        "accelerate>=1.0",
        "transformers>=4.40",
        "open_clip_torch>=2.24",
        "timm>=1.0",
        "omegaconf>=2.3",
        "pyarrow>=15",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pillow>=10",
        "scipy>=1.10",
        "torchmetrics>=1.3",
        "torch-fidelity>=0.4",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2", "ruff>=0.5"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["varitok = pipeline.cli:main"]},
)
