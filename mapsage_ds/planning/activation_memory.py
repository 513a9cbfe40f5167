"""Analytic activation memory of one training micro-batch, per block type.

What a training step keeps from forward to backward is what autograd saves. For each block type
the saved tensors were listed with ``torch.autograd.graph.saved_tensors_hooks`` on small models
(see :mod:`memprobe` and ``docs/planner.md``) and are written here as element counts
per token, so the estimate scales to any width, depth and crop without running the model:

- ViT block (DINOv3, pre-norm, LayerScale, SDPA/flash attention): the residual input, the normed
  input, q and k after RoPE, v, the attention output, the o_proj input, the LayerScale input, the
  second residual, the normed MLP input: ``11 × dim`` per token, plus ``2 × intermediate`` (GELU
  MLP: activation input, down_proj input) or ``4 × intermediate`` (SwiGLU: gate, up, product,
  down_proj input), plus fp32 LayerNorm statistics and the attention log-sum-exp per head.
- MiT block (SegFormer) at its stage resolution: ``6 × dim + 3 × mlp_hidden`` per token (Mix-FFN
  keeps fc1 output, depthwise-conv output and fc2 input) plus ``4 × dim`` per key/value token
  after spatial reduction (``2 × dim`` without reduction).

Attention is memory-efficient (SDPA/flash keeps q, k, v, output and log-sum-exp, never the
attention matrix), which is what PyTorch picks on CPU and on current GPUs for these models.
Frozen layers at the input side save nothing: no tensor there needs a gradient. With activation
checkpointing a checkpointed block keeps only its input, and during backward one block at a time
is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from mapsage_ds.errors import ConfigError

FP32 = 4  # LayerNorm statistics, log-sum-exp and the loss's log-probabilities are fp32
INT64 = 8  # the label map
MASK = 1  # a dropout mask is one byte per element on accelerators (bool)


@dataclass(frozen=True)
class ViTGeometry:
    """What the activation estimate needs to know about a DINOv3 ViT segmenter."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    gated_mlp: bool
    prefix_tokens: int  # CLS + register tokens
    patch_size: int
    feature_layers: tuple[int, ...]
    head_channels: int
    num_classes: int


@dataclass(frozen=True)
class MiTGeometry:
    """What the activation estimate needs to know about a SegFormer (MiT encoder + MLP decoder)."""

    depths: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    num_heads: tuple[int, ...]
    sr_ratios: tuple[int, ...]
    mlp_ratios: tuple[int, ...]
    strides: tuple[int, ...]
    decoder_hidden_size: int
    num_classes: int
    decoder_dropout: bool

    @property
    def num_layers(self) -> int:
        """Blocks over all stages (layer ids 1..num_layers)."""
        return sum(self.depths)


@dataclass
class ActivationEstimate:
    """Activation bytes of one micro-batch on one card.

    Attributes:
        saved: bytes autograd keeps from the end of forward until backward frees them.
        transient: extra bytes alive at the peak of backward (gradients in flight, the block
            being recomputed under checkpointing).
        parts: ``saved`` split by part of the network, for the report.
    """

    saved: int
    transient: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Saved plus transient bytes."""
        return self.saved + self.transient


def geometry_of(module: nn.Module) -> ViTGeometry | MiTGeometry:
    """Read the shape parameters of a model built by :func:`mapsage_ds.models.factory.build_model`.

    Works on models built on the meta device.

    Raises:
        ConfigError: for a model type without an activation model.
    """
    from transformers import SegformerForSemanticSegmentation

    from mapsage_ds.models.dinov3 import DINOv3Segmenter

    if isinstance(module, DINOv3Segmenter):
        config = module.backbone.config
        return ViTGeometry(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
            gated_mlp=bool(config.use_gated_mlp), prefix_tokens=module.prefix_tokens,
            patch_size=config.patch_size, feature_layers=tuple(module.feature_layers),
            head_channels=module.head.classifier.in_channels, num_classes=module.head.classifier.out_channels,
        )
    if isinstance(module, SegformerForSemanticSegmentation):
        config = module.config
        return MiTGeometry(
            depths=tuple(config.depths), hidden_sizes=tuple(config.hidden_sizes),
            num_heads=tuple(config.num_attention_heads), sr_ratios=tuple(config.sr_ratios),
            mlp_ratios=tuple(config.mlp_ratios), strides=tuple(config.strides),
            decoder_hidden_size=config.decoder_hidden_size, num_classes=config.num_labels,
            decoder_dropout=config.classifier_dropout_prob > 0,
        )
    raise ConfigError(f"no activation model for {type(module).__name__}: expected a DINOv3 or SegFormer segmenter")


def estimate_activations(
    geometry: ViTGeometry | MiTGeometry,
    *,
    batch_size: int,
    crop_size: int,
    dtype_bytes: int,
    frozen_layers: int = 0,
    checkpointing: bool = False,
) -> ActivationEstimate:
    """Activation bytes of one micro-batch of ``batch_size`` square crops.

    Args:
        geometry: from :func:`geometry_of`.
        batch_size: images per card per forward pass (the micro-batch).
        crop_size: side of the training crop in pixels.
        dtype_bytes: bytes per element of the compute dtype (2 for bf16/fp16, 4 for fp32).
        frozen_layers: backbone layer ids below this are frozen (see ``unfreeze.frozen_layer_count``).
        checkpointing: whether transformer blocks are activation-checkpointed.
    """
    if batch_size < 1 or crop_size < 1:
        raise ConfigError(f"batch_size={batch_size}, crop_size={crop_size}: expected positive values")
    if isinstance(geometry, ViTGeometry):
        parts, block_bytes = _vit_parts(geometry, crop_size, dtype_bytes, frozen_layers, checkpointing)
    else:
        parts, block_bytes = _mit_parts(geometry, crop_size, dtype_bytes, frozen_layers, checkpointing)
    parts = {name: value * batch_size for name, value in parts.items()}
    # Backward holds the gradients flowing through one block (about one block's activations) and,
    # under checkpointing, also that block's recomputed activations.
    transient = block_bytes * batch_size * (2 if checkpointing else 1)
    transient += crop_size * crop_size * geometry.num_classes * FP32 * batch_size  # gradient of the logits
    return ActivationEstimate(saved=sum(parts.values()), transient=transient, parts=parts)


def vit_block_bytes(geometry: ViTGeometry, tokens: int, dtype_bytes: int) -> int:
    """Bytes one ViT block saves for backward, per image with ``tokens`` tokens."""
    dim, hidden = geometry.hidden_size, geometry.intermediate_size
    per_token = (11 * dim + (4 if geometry.gated_mlp else 2) * hidden) * dtype_bytes
    per_token += (4 + geometry.num_heads) * FP32  # two LayerNorms' mean/rstd, log-sum-exp per head
    return tokens * per_token


def _vit_parts(g: ViTGeometry, crop: int, b: int, cut: int, checkpointing: bool) -> tuple[dict[str, int], int]:
    side = math.ceil(crop / g.patch_size)  # inputs are padded to a multiple of the patch size
    grid = side * side
    tokens = g.prefix_tokens + grid
    layers = g.num_layers
    # Block i has layer id i + 1; embeddings 0; the final norm layers + 1; the head is always trained.
    trainable = [i + 1 >= cut for i in range(layers)]
    full = vit_block_bytes(g, tokens, b)
    kept = tokens * g.hidden_size * b if checkpointing else full
    parts = {
        "embeddings": 3 * (side * g.patch_size) ** 2 * b if cut <= 0 else 0,
        "blocks": kept * sum(trainable),
    }
    # The final norm runs on every tapped layer and on the last one; its input is already saved
    # when it is also the input of a trained block.
    norm_trained = cut <= layers + 1
    tapped = sorted({i + 1 for i in g.feature_layers} | {layers})
    neck = 0
    if norm_trained:
        neck += (len(g.feature_layers) + 1) * tokens * 2 * FP32
        neck += sum(tokens * g.hidden_size * b for k in tapped if not (k < layers and trainable[k]))
    neck += len(g.feature_layers) * tokens * g.hidden_size * b  # normed tokens kept by the 1x1 projections
    parts["neck"] = neck
    quarter = 16 * grid  # the head works at 4x the patch grid
    levels, channels = len(g.feature_layers), g.head_channels
    parts["head"] = (levels * 2 * grid * channels + quarter * (levels + 3) * channels) * b
    parts["loss"] = _loss_bytes(crop, g.num_classes)
    return parts, full if any(trainable) else 0


def _mit_parts(g: MiTGeometry, crop: int, b: int, cut: int, checkpointing: bool) -> tuple[dict[str, int], int]:
    sides, side = [], crop
    for stride in g.strides:
        side = math.ceil(side / stride)  # overlapping patch embeddings: kernel 2*pad + 1
        sides.append(side)
    tokens = [s * s for s in sides]
    starts = [sum(g.depths[:s]) for s in range(len(g.depths))]
    parts = {"patch_embeddings": 0, "blocks": 0, "stage_norms": 0}
    largest = 0
    for s, (n, dim) in enumerate(zip(tokens, g.hidden_sizes, strict=True)):
        if starts[s] >= cut:  # the stage's patch embedding (conv input, LayerNorm input and statistics)
            conv_input = 3 * crop * crop if s == 0 else tokens[s - 1] * g.hidden_sizes[s - 1]
            parts["patch_embeddings"] += (conv_input + n * dim) * b + n * 2 * FP32
        full = mit_block_bytes(g, s, n, sides[s], b)
        for j in range(g.depths[s]):
            if starts[s] + j + 1 >= cut:
                parts["blocks"] += n * dim * b if checkpointing else full
                largest = max(largest, full)
        if starts[s] + g.depths[s] >= cut:
            parts["stage_norms"] += n * dim * b + n * 2 * FP32
    decoder, quarter = g.decoder_hidden_size, tokens[0]
    head = sum(n * dim for n, dim in zip(tokens, g.hidden_sizes, strict=True)) * b  # per-stage MLP inputs
    head += quarter * decoder * (len(g.depths) + 3) * b  # fuse input, BN input, ReLU output, classifier input
    head += quarter * decoder * MASK if g.decoder_dropout else 0
    parts["head"] = head
    parts["loss"] = _loss_bytes(crop, g.num_classes)
    return parts, largest


def mit_block_bytes(geometry: MiTGeometry, stage: int, tokens: int, side: int, dtype_bytes: int) -> int:
    """Bytes one MiT block of ``stage`` saves for backward, per image with ``tokens`` tokens."""
    dim = geometry.hidden_sizes[stage]
    hidden = dim * geometry.mlp_ratios[stage]
    ratio = geometry.sr_ratios[stage]
    reduced = (side // ratio) ** 2 if ratio > 1 else tokens
    saved = tokens * (6 * dim + 3 * hidden) * dtype_bytes
    saved += reduced * dim * (4 if ratio > 1 else 2) * dtype_bytes  # reduced LayerNorm/k_proj inputs, k, v
    saved += tokens * (4 + geometry.num_heads[stage]) * FP32 + (reduced * 2 * FP32 if ratio > 1 else 0)
    return saved


def _loss_bytes(crop: int, num_classes: int) -> int:
    """Cross-entropy on fp32 logits at label resolution keeps the log-probabilities and the labels."""
    return crop * crop * (num_classes * FP32 + INT64)
