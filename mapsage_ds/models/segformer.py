"""SegFormer (MiT encoder + all-MLP decoder) from Hugging Face transformers, built by size name.

With ``model.head`` set to ``upernet`` or ``linear`` the MiT encoder keeps HF's layout and the
decode head is replaced (:class:`SegformerWithHead`); the choice is recorded in the HF config.
"""

from __future__ import annotations

import re

from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel
from transformers.models.segformer.modeling_segformer import SegformerPreTrainedModel

from mapsage_ds.errors import ConfigError
from mapsage_ds.models.decode_heads import build_pyramid_head

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


# What the weights fix (and a named size must agree with); the rest of the encoder config comes along.
_ENCODER_FIELDS = ("num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes",
                   "strides", "num_attention_heads", "mlp_ratios", "hidden_act", "layer_norm_eps")


def size_of(depths: list[int], hidden_sizes: list[int]) -> str | None:
    """The named size with these depths and widths, if any."""
    wanted = (list(depths), list(hidden_sizes))
    return next((name for name, fields in SEGFORMER_SIZES.items()
                 if (list(fields["depths"]), list(fields["hidden_sizes"])) == wanted), None)


def segformer_config_from_checkpoint(
    size: str, class_names: list[str], checkpoint: SegformerConfig, *, source: str, has_decode_head: bool
) -> SegformerConfig:
    """The SegFormer config of a checkpoint's encoder, with one output per class.

    ``size="auto"`` takes the architecture from the checkpoint; a named size is a cross-check.
    The decoder width is the checkpoint's when it carries a decode head, else the named (or
    matching) size's.

    Raises:
        ConfigError: the named size is not the checkpoint's.
    """
    depths, hidden = list(checkpoint.depths), list(checkpoint.hidden_sizes)
    found = size_of(depths, hidden)
    if size != "auto":
        if size not in SEGFORMER_SIZES:
            raise ConfigError(f"model.size='{size}': expected auto or one of {', '.join(SEGFORMER_SIZES)}")
        named = SEGFORMER_SIZES[size]
        if list(named["depths"]) != depths or list(named["hidden_sizes"]) != hidden:
            raise ConfigError(f"model.size='{size}' (depths {list(named['depths'])} hidden "
                              f"{list(named['hidden_sizes'])}) but {source} is depths {depths} hidden {hidden} "
                              f"({found or 'no named size'}); set model.size={found or 'auto'}")
    encoder = {name: getattr(checkpoint, name) for name in _ENCODER_FIELDS}
    if has_decode_head or (size == "auto" and found is None):
        decoder_hidden_size = checkpoint.decoder_hidden_size
    else:
        decoder_hidden_size = SEGFORMER_SIZES[size if size != "auto" else found]["decoder_hidden_size"]
    return SegformerConfig(
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        semantic_loss_ignore_index=255,
        decoder_hidden_size=decoder_hidden_size,
        **encoder,
    )


# The HF config field naming a replaced decode head: {"type": upernet | linear, "channels": int | None, "norm": str}.
HEAD_FIELD = "mapsage_head"


class SegformerWithHead(SegformerForSemanticSegmentation):
    """SegFormer whose decode head is this project's UPerNet or linear probe on the four MiT stages.

    Parameter names stay HF's (``segformer.*`` encoder, ``decode_head.*`` head), and so do the
    forward pass, the output and the layer ids; the head is described by ``config.mapsage_head``,
    which ``save_pretrained`` writes to ``config.json``, so ``from_pretrained`` rebuilds it.
    Plain ``SegformerForSemanticSegmentation`` would load only the encoder of such a directory.
    """

    def __init__(self, config: SegformerConfig) -> None:
        # Skips SegformerForSemanticSegmentation.__init__: its all-MLP head would be built only to be
        # discarded (under ZeRO-3, as registered shards).
        SegformerPreTrainedModel.__init__(self, config)
        spec = getattr(config, HEAD_FIELD, None)
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"SegformerWithHead: config.{HEAD_FIELD}={spec!r}; expected {{type, channels, norm}}")
        self.segformer = SegformerModel(config)
        self.decode_head = build_pyramid_head(spec["type"], in_channels=list(config.hidden_sizes),
                                              channels=spec.get("channels"), num_classes=config.num_labels,
                                              norm=spec.get("norm", "batch"))
        self.post_init()


def build_segformer(size: str, class_names: list[str]) -> SegformerForSemanticSegmentation:
    """Randomly initialised SegFormer of the given size (HF weight init)."""
    return SegformerForSemanticSegmentation(segformer_config(size, class_names))


# In-memory names (transformers >= 5: segformer.stages.S.blocks.J) and hub names
# (segformer.encoder.block.S.J) are both understood.
_BLOCK = re.compile(r"^segformer\.(?:stages\.(\d+)\.blocks|encoder\.block\.(\d+))\.(\d+)\.")
_PATCH_EMBED = re.compile(r"^segformer\.(?:stages\.(\d+)\.patch_embeddings|encoder\.patch_embeddings\.(\d+))\.")
_STAGE_NORM = re.compile(r"^segformer\.(?:stages\.(\d+)\.layer_norm|encoder\.layer_norm\.(\d+))\.")


def segformer_layer_id(name: str, depths: list[int]) -> int | None:
    """Layer id for layer-wise LR decay: the cumulative block index across the four MiT stages.

    Blocks are numbered 1..sum(depths) in order; a stage's patch embedding takes the id of the
    block before it (0 for the first stage), its closing norm the id of its last block. Returns
    None for decode-head parameters.
    """
    starts = [sum(depths[:stage]) for stage in range(len(depths))]
    if match := _BLOCK.match(name):
        stage = int(match.group(1) or match.group(2))
        return starts[stage] + int(match.group(3)) + 1
    if match := _PATCH_EMBED.match(name):
        return starts[int(match.group(1) or match.group(2))]
    if match := _STAGE_NORM.match(name):
        stage = int(match.group(1) or match.group(2))
        return starts[stage] + depths[stage]
    if name.startswith("decode_head."):
        return None
    raise ConfigError(f"no layer id for SegFormer parameter '{name}'")
