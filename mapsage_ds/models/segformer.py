"""SegFormer (MiT encoder + all-MLP decoder) from Hugging Face transformers, built by size name."""

from __future__ import annotations

from transformers import SegformerConfig, SegformerForSemanticSegmentation

from mapsage_ds.errors import ConfigError

# Published MiT variants (Xie et al., 2021) plus two small sizes for tests and the CPU demo.
SEGFORMER_SIZES: dict[str, dict] = {
    "test": dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 8, 16, 16], num_attention_heads=[1, 1, 1, 1],
                 decoder_hidden_size=16),
    "mini": dict(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 8],
                 decoder_hidden_size=64),
    "b0": dict(depths=[2, 2, 2, 2], hidden_sizes=[32, 64, 160, 256], decoder_hidden_size=256),
    "b1": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=256),
    "b2": dict(depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "b3": dict(depths=[3, 4, 18, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "b4": dict(depths=[3, 8, 27, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
    "b5": dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512], decoder_hidden_size=768),
}


def segformer_config(size: str, class_names: list[str]) -> SegformerConfig:
    """HF config of SegFormer ``size`` with one output per class and named labels."""
    if size not in SEGFORMER_SIZES:
        raise ConfigError(f"model.size='{size}': expected one of {', '.join(SEGFORMER_SIZES)}")
    return SegformerConfig(
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        semantic_loss_ignore_index=255,
        **SEGFORMER_SIZES[size],
    )


def build_segformer(size: str, class_names: list[str]) -> SegformerForSemanticSegmentation:
    """Randomly initialised SegFormer of the given size (HF weight init)."""
    return SegformerForSemanticSegmentation(segformer_config(size, class_names))
