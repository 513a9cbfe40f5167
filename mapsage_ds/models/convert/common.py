"""What every converter returns: an HF config, HF-layout tensors, and what was left out and why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

# Identity of the pretraining data, which decides the input normalisation.
PRETRAINING_IMAGENET = "imagenet"
PRETRAINING_SAT493M = "sat493m"
PRETRAINING_LVD1689M = "lvd1689m"


@dataclass
class ConvertedWeights:
    """A checkpoint in Hugging Face layout.

    Attributes:
        arch: ``"segformer"`` or ``"dinov3"`` (or ``"sam"``).
        config: the HF config the tensors belong to, read from the checkpoint itself.
        state_dict: tensors under the HF on-disk names (``segformer.encoder.*`` / ``decode_head.*``
            for SegFormer, ``embeddings.*`` / ``layer.N.*`` / ``norm.*`` for DINOv3).
        source_format: ``"hf"``, ``"nvlabs"``, ``"mmseg"``, ``"meta-dinov3"``, ``"meta-sam"``.
        pretraining: one of the ``PRETRAINING_*`` names, or None when the checkpoint does not say.
        dropped: source key (or key pattern) -> why it was not converted.
    """

    arch: str
    config: PretrainedConfig
    state_dict: dict[str, torch.Tensor]
    source_format: str
    pretraining: str | None = None
    dropped: dict[str, str] = field(default_factory=dict)


def list_names(items: Sequence[object], limit: int = 8) -> str:
    """The first ``limit`` names of ``items``, comma-separated, and how many more there are (for errors)."""
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
