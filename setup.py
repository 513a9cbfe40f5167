"""Install MapSage DS.

torch and torchvision are declared as ranges: servers ship their own torch (a vendor build such as
Enflame's torch_gcu pairs with its own torch release, clusters have their CUDA image), and pip must
keep it rather than replace it.
"""

from setuptools import find_packages, setup

# Console scripts: mapsage-NAME runs mapsage_ds.cli.NAME (mapsage-run-plan: mapsage_ds.cli.run_plan).
COMMANDS = ("finetune", "distill", "evaluate", "predict", "plan", "health", "tracks", "leaderboard", "convert",
            "run_plan")

setup(
    name="mapsage_ds",
    version="0.1.0",
    description="DeepSpeed fine-tuning of large vision models for remote-sensing semantic segmentation",
    # ds_configs/ stays at the top of the repository and is installed as mapsage_ds.ds_configs.
    packages=find_packages(include=["mapsage_ds", "mapsage_ds.*"]) + ["mapsage_ds.ds_configs"],
    package_dir={"mapsage_ds.ds_configs": "ds_configs"},
    package_data={"mapsage_ds": ["recipes/*.yaml"], "mapsage_ds.ds_configs": ["*.json"]},
    entry_points={"console_scripts": [f"mapsage-{name.replace('_', '-')} = mapsage_ds.cli.{name}:console"
                                         for name in COMMANDS]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",  # not imported by mapsage_ds: timm needs it; the pair matching torch>=2.4
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
        "rasterio>=1.3",  # GeoTIFF/COG scenes read and written window by window (its wheels carry GDAL)
        "fiona>=1.10",  # GeoPackage writer of predict --polygons (its wheels carry GDAL; takes rasterio's shapes)
    ],
    extras_require={
        # segmentation-models-pytorch: the independent reference for the Dice and Lovász tests.
        # mmsegmentation (+ mmengine, mmcv-lite): the reference MiT and the training-checkpoint format of the
        # weights converter; segment-anything: Meta's SAM, the reference of the SAM converter. pytest-xdist: the
        # suite runs on two workers (pytest.ini), which keeps it under 15 minutes on a 2-core machine; pytest-timeout:
        # a test that hangs fails with every thread's stack instead of stalling CI until its limit.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "pytest-timeout>=2.3", "ninja", "segmentation-models-pytorch>=0.5",
                 "mmsegmentation==1.2.2",
                 "mmengine>=0.10",
                 "mmcv-lite>=2.0.0rc4,<2.2.0", "ftfy", "segment-anything==1.0"],
        # kornia: a candidate backend measured by scripts/benchmark_data.py.
        "bench": ["kornia>=0.8"],
    },
)
