"""Datasets, label encoding and synthetic LoveDA trees."""

from mapsage_ds.data.classes import (
    IGNORE_INDEX,
    LOVEDA_CLASSES,
    LOVEDA_PALETTE,
    NUM_CLASSES,
    check_index_mask,
    encode_loveda_mask,
)
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.synthetic import (
    SyntheticSpec,
    ensure_synthetic_tree,
    generate_loveda_tree,
    write_loveda_sample,
)
from mapsage_ds.data.validation import ValidationReport, validate_dataset

# data.source: a LoveDA folder tree (the official layout, or mmseg's img_dir/ann_dir one: detected by LoveDA),
# or a local Hugging Face datasets dataset (save_to_disk or parquet).
SOURCES = ("loveda", "hf")



def __getattr__(name: str):
    # The Hugging Face source imports `datasets` (pyarrow, pandas: ~100 MB): only when it is used.
    if name in ("HFSegmentationDataset", "load_local_dataset"):
        from mapsage_ds.data import hf_source

        return getattr(hf_source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SOURCES",
    "IGNORE_INDEX",
    "LOVEDA_CLASSES",
    "LOVEDA_PALETTE",
    "NUM_CLASSES",
    "HFSegmentationDataset",
    "LoveDA",
    "SyntheticSpec",
    "ValidationReport",
    "check_index_mask",
    "encode_loveda_mask",
    "ensure_synthetic_tree",
    "generate_loveda_tree",
    "load_local_dataset",
    "validate_dataset",
    "write_loveda_sample",
]
