"""Install MapSage DS. torch is pinned to the 2.14.1 / torchvision 0.29.1 pair (see README)."""

from setuptools import find_packages, setup

setup(
    name="mapsage_ds",
    version="0.1.0",
    description="DeepSpeed fine-tuning of large vision models for remote-sensing semantic segmentation",
    packages=find_packages(include=["mapsage_ds", "mapsage_ds.*"]),
    package_data={"mapsage_ds": ["recipes/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed>=0.16",
        "transformers>=4.56",
        "timm>=1.0",
        "safetensors>=0.4",
        "datasets>=3.0",
        "pillow>=10",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "accelerate>=1.0",
        "matplotlib>=3.7",  # evaluation report figures (confusion matrix, IoU bars, panels)
        "scipy>=1.10",  # SAM refinement: connected regions and distance transform
        "albumentations>=2.0,<3",  # training augmentations (OpenCV); chosen by docs/training_recipe.md
    ],
    extras_require={
        # segmentation-models-pytorch: the independent reference for the Dice and Lovász tests.
        "test": ["pytest>=8", "ninja", "segmentation-models-pytorch>=0.5"],
        # kornia: a candidate backend measured by scripts/benchmark_data.py.
        "bench": ["kornia>=0.8"],
    },
)
