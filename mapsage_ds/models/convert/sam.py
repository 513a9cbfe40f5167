"""Meta's original Segment Anything checkpoints, converted to transformers' ``SamModel``.

The files Meta publishes (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``)
are bare state dicts of ``segment_anything.modeling.Sam``:

- ``image_encoder.``: ``patch_embed.proj`` (conv, kernel = patch size), ``pos_embed (1, g, g, D)`` for a
  ``g x g`` patch grid, per block ``blocks.N.norm1/norm2``, ``attn.qkv`` (3D x D), ``attn.proj``,
  ``attn.rel_pos_h/rel_pos_w`` (``2s - 1`` rows of head_dim, ``s`` = window size, or ``g`` in the
  global-attention blocks), ``mlp.lin1/lin2``; ``neck.0`` (1x1 conv), ``neck.1`` (LayerNorm2d),
  ``neck.2`` (3x3 conv), ``neck.3`` (LayerNorm2d);
- ``prompt_encoder.``: ``pe_layer.positional_encoding_gaussian_matrix (2, E/2)`` (a buffer, shared with the
  mask decoder's dense positional encoding), ``point_embeddings.{0..3}``, ``not_a_point_embed``,
  ``mask_downscaling.{0,1,3,4,6}`` (conv, LayerNorm2d, conv, LayerNorm2d, conv), ``no_mask_embed``;
- ``mask_decoder.``: ``iou_token``, ``mask_tokens``, ``transformer.layers.N.`` (``self_attn``,
  ``cross_attn_token_to_image``, ``cross_attn_image_to_token`` with ``q/k/v/out_proj``, ``norm1..4``,
  ``mlp.lin1/lin2``), ``transformer.final_attn_token_to_image``, ``transformer.norm_final_attn``,
  ``output_upscaling.{0,1,3}`` (transposed conv, LayerNorm2d, transposed conv),
  ``output_hypernetworks_mlps.i.layers.{0,1,2}``, ``iou_prediction_head.layers.{0..depth-1}``.

Almost everything about the architecture is in the tensors, including what is usually called
unreadable: the relative-position tables hold ``head_dim`` columns (so the encoder's head count) and
``2s - 1`` rows (so the window size, and which blocks attend globally). Only the mask decoder's head
count (8 in every published size) and, for a file without relative positions, the window layout
need the published values or a keyword.

One detail differs from transformers' own converter: Meta's two-way transformer uses
``nn.LayerNorm``'s default epsilon, 1e-5, where the hub configs say 1e-6; the config written here
says 1e-5, so the converted model reproduces Meta's outputs, not merely approximates them.

SAM 2.1 (``sam2.1_hiera_*.pt``) is not converted here: see :func:`is_meta_sam2` and the error
:func:`load_sam` raises for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import SamConfig

from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.models.convert.common import ConvertedWeights, list_names

if TYPE_CHECKING:
    from transformers import SamModel, SamProcessor

__all__ = ["convert_meta_sam", "is_meta_sam", "is_meta_sam2", "load_sam", "sam_processor"]

SOURCE_FORMAT = "meta-sam"
# Meta's image encoder and the LayerNorm2d of neck, prompt encoder and upscaling use 1e-6 ...
VISION_LAYER_NORM_EPS = 1e-6
# ... the two-way transformer of the mask decoder uses nn.LayerNorm's default.
DECODER_LAYER_NORM_EPS = 1e-5
# Published sizes (segment_anything.build_sam): width -> encoder heads, depth -> global-attention blocks.
PUBLISHED_HEADS = {768: 12, 1024: 16, 1280: 16}
PUBLISHED_GLOBAL_ATTN_INDEXES = {12: (2, 5, 8, 11), 24: (5, 11, 17, 23), 32: (7, 15, 23, 31)}
PUBLISHED_WINDOW_SIZE = 14
PUBLISHED_DECODER_HEADS = 8

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_SAM_MARKERS = ("image_encoder.patch_embed.proj.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                "mask_decoder.iou_token.weight")
_SAM2_MARKERS = ("image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.iou_token.weight")
# Buffers some wrappers save; SamProcessor owns the input normalisation.
_NORMALIZATION_KEYS = ("pixel_mean", "pixel_std")

_ATTN = r"(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_PARAM = r"(weight|bias)"
# (Meta key pattern, HF key template): every key of a Meta SAM matches exactly one pattern. The two MLP
# heads of the mask decoder are renamed separately (their layer names depend on the depth).
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (rf"image_encoder\.patch_embed\.proj\.{_PARAM}", r"vision_encoder.patch_embed.projection.\1"),
    (r"image_encoder\.pos_embed", r"vision_encoder.pos_embed"),
    (rf"image_encoder\.blocks\.(\d+)\.norm([12])\.{_PARAM}", r"vision_encoder.layers.\1.layer_norm\2.\3"),
    (rf"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)\.{_PARAM}", r"vision_encoder.layers.\1.attn.\2.\3"),
    (r"image_encoder\.blocks\.(\d+)\.attn\.(rel_pos_[hw])", r"vision_encoder.layers.\1.attn.\2"),
    (rf"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])\.{_PARAM}", r"vision_encoder.layers.\1.mlp.\2.\3"),
    (r"image_encoder\.neck\.0\.weight", r"vision_encoder.neck.conv1.weight"),
    (rf"image_encoder\.neck\.1\.{_PARAM}", r"vision_encoder.neck.layer_norm1.\1"),
    (r"image_encoder\.neck\.2\.weight", r"vision_encoder.neck.conv2.weight"),
    (rf"image_encoder\.neck\.3\.{_PARAM}", r"vision_encoder.neck.layer_norm2.\1"),
    # Stored once; SamModel ties prompt_encoder.shared_embedding to it.
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", r"shared_image_embedding.positional_embedding"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.weight", r"prompt_encoder.point_embed.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (rf"prompt_encoder\.mask_downscaling\.0\.{_PARAM}", r"prompt_encoder.mask_embed.conv1.\1"),
    (rf"prompt_encoder\.mask_downscaling\.1\.{_PARAM}", r"prompt_encoder.mask_embed.layer_norm1.\1"),
    (rf"prompt_encoder\.mask_downscaling\.3\.{_PARAM}", r"prompt_encoder.mask_embed.conv2.\1"),
    (rf"prompt_encoder\.mask_downscaling\.4\.{_PARAM}", r"prompt_encoder.mask_embed.layer_norm2.\1"),
    (rf"prompt_encoder\.mask_downscaling\.6\.{_PARAM}", r"prompt_encoder.mask_embed.conv3.\1"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.({_ATTN})\.([qkv]_proj|out_proj)\.{_PARAM}",
     r"mask_decoder.transformer.layers.\1.\2.\3.\4"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])\.{_PARAM}",
     r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])\.{_PARAM}",
     r"mask_decoder.transformer.layers.\1.mlp.\2.\3"),
    (rf"mask_decoder\.transformer\.final_attn_token_to_image\.([qkv]_proj|out_proj)\.{_PARAM}",
     r"mask_decoder.transformer.final_attn_token_to_image.\1.\2"),
    (rf"mask_decoder\.transformer\.norm_final_attn\.{_PARAM}", r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    (rf"mask_decoder\.output_upscaling\.0\.{_PARAM}", r"mask_decoder.upscale_conv1.\1"),
    (rf"mask_decoder\.output_upscaling\.1\.{_PARAM}", r"mask_decoder.upscale_layer_norm.\1"),
    (rf"mask_decoder\.output_upscaling\.3\.{_PARAM}", r"mask_decoder.upscale_conv2.\1"),
))
_MLP_HEAD = re.compile(rf"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.(\d+)\.{_PARAM}")
# transformers builds every hypernetwork MLP with three layers.
_HYPERNETWORK_DEPTH = 3


def is_meta_sam(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` looks like a state dict of Meta's ``segment_anything`` ``Sam`` (SAM 1).

    SAM 2 files share the ``image_encoder.`` prefix but hold a Hiera trunk (``image_encoder.trunk.*``)
    and ``sam_prompt_encoder.*`` / ``sam_mask_decoder.*``; they are not SAM 1.
    """
    return all(key in state for key in _SAM_MARKERS)


def is_meta_sam2(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` looks like a Meta SAM 2 / 2.1 state dict (the ``"model"`` entry of ``sam2.1_hiera_*.pt``)."""
    return all(key in state for key in _SAM2_MARKERS)


def convert_meta_sam(
    state: Mapping[str, torch.Tensor],
    *,
    source: str = "",
    num_attention_heads: int | None = None,
    global_attn_indexes: Sequence[int] | None = None,
    window_size: int | None = None,
    decoder_num_attention_heads: int = PUBLISHED_DECODER_HEADS,
) -> ConvertedWeights:
    """Convert a Meta SAM state dict to ``SamModel`` on-disk names, with a ``SamConfig`` read from it.

    Read from the tensors: encoder width, depth, patch size, channels, image size (``pos_embed``
    grid x patch), MLP width, QKV bias, neck channels; with relative positions (every published file)
    also the encoder's head count (width / head_dim of ``rel_pos_h``), the window size and the
    global-attention blocks (their tables span the whole grid); prompt and mask decoder widths, the
    number of point embeddings and mask outputs, the mask-input channels, the two-way transformer's
    depth, MLP width and attention downsampling, and the IoU head's depth and width.

    Args:
        state: the checkpoint's tensors (``torch.load(..., weights_only=True)`` of a Meta ``.pth``).
        source: where ``state`` came from, for messages.
        num_attention_heads: encoder heads. Read from the relative-position tables when present (a
            value given here must agree); otherwise the published value for the width (ViT-B 12,
            ViT-L 16, ViT-H 16), and required for any other width.
        global_attn_indexes: encoder blocks with global attention. Read from the relative-position
            tables when some block is windowed (a value given here must agree); otherwise the
            published value for the depth (B 2,5,8,11; L 5,11,17,23; H 7,15,23,31), and required for
            any other depth.
        window_size: the windowed blocks' window. Read from the relative-position tables when
            present (a value given here must agree); otherwise 14, Meta's value in every size.
        decoder_num_attention_heads: mask-decoder heads, which no tensor records (8 in every size).

    Returns:
        ConvertedWeights with ``arch="sam"``, ``source_format="meta-sam"``; ``dropped`` names saved
        normalisation buffers (``pixel_mean``/``pixel_std``), which belong to the processor.

    Raises:
        DataError: a tensor is missing, unknown, mis-shaped or inconsistent with the others.
        ConfigError: a keyword contradicts the tensors, or a value the tensors cannot tell and no
            published size gives was not passed.
    """
    where = source or "Meta SAM checkpoint"
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{where}: {key!r} is a {type(value).__name__}, expected a tensor")
    if not is_meta_sam(state):
        missing = [k for k in _SAM_MARKERS if k not in state]
        hint = " (this is a SAM 2 checkpoint)" if is_meta_sam2(state) else ""
        raise DataError(f"{where}: not a Meta SAM state dict{hint}; missing {list_names(missing)}; "
                        f"found {list_names(sorted(state))}")

    dropped = {key: ("input normalisation constants: SamProcessor holds them (ImageNet mean/std x 255, the same "
                     "values Meta uses)") for key in _NORMALIZATION_KEYS if key in state}
    model_keys = {k: v for k, v in state.items() if k not in dropped}
    vision = _vision_config(model_keys, where, num_attention_heads=num_attention_heads,
                            global_attn_indexes=global_attn_indexes, window_size=window_size)
    config = SamConfig(
        vision_config=vision,
        # Meta's prompt encoder works in the encoder's input frame and on its embedding grid.
        prompt_encoder_config=_prompt_encoder_config(model_keys, where, image_size=vision["image_size"],
                                                     patch_size=vision["patch_size"]),
        mask_decoder_config=_mask_decoder_config(model_keys, where, num_attention_heads=decoder_num_attention_heads),
    )
    config.architectures = ["SamModel"]
    out = _rename(model_keys, config, where)
    _check_against_model(out, config, where)
    return ConvertedWeights(arch="sam", config=config, state_dict=out, source_format=SOURCE_FORMAT,
                            pretraining=None, dropped=dropped)


def load_sam(path: str | Path) -> SamModel:
    """A transformers ``SamModel`` in eval mode, from an HF directory or a Meta SAM checkpoint file.

    Args:
        path: a transformers directory (``config.json`` with ``model_type`` ``"sam"`` and its
            weights), or Meta's ``sam_vit_{b,l,h}_*.pth`` (read with ``torch.load(weights_only=True)``;
            a ``.safetensors`` file of the same tensors works too).

    Returns:
        The model on the CPU, in eval mode. A Meta file carries no processor config: pair it with
        :func:`sam_processor`.

    Raises:
        MissingFileError: ``path`` (or a file an HF directory needs) does not exist.
        DataError: the file is unreadable, not SAM, or its tensors do not fit one ``SamModel``.
    """
    from transformers import SamModel

    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"SAM checkpoint not found: {path}")
    if path.is_dir():
        return _load_hf_directory(path)
    state = _read_state(path)
    if is_meta_sam2(state):
        raise DataError(f"{path}: a SAM 2 checkpoint; only SAM 1 files (sam_vit_b/l/h_*.pth) and transformers "
                        f"SamModel directories are supported")
    if not is_meta_sam(state):
        raise DataError(f"{path}: not a Meta SAM checkpoint (expected {list_names(list(_SAM_MARKERS))}); "
                        f"found {list_names(sorted(state))}")
    converted = convert_meta_sam(state, source=str(path))
    model, info = SamModel.from_pretrained(None, config=converted.config, state_dict=converted.state_dict,
                                           output_loading_info=True)
    problems = {name: sorted(info[name]) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if info.get(name)}
    if problems:  # _check_against_model rules this out; kept so a transformers change cannot pass silently
        raise DataError(f"{path}: converted tensors do not fit SamModel: {problems}")
    return model.eval()


def sam_processor(image_size: int) -> SamProcessor:
    """The ``SamProcessor`` that does Meta's preprocessing for a SAM with ``image_size`` input.

    Meta resizes the longest side to the encoder's input size, normalises with ImageNet mean/std
    (x 255) and pads right and bottom to a square; ``SamImageProcessor``'s defaults do the same at
    1024 px. Low-resolution mask inputs are a quarter of the input size.

    Args:
        image_size: ``model.config.vision_config.image_size`` (1024 in every published SAM).
    """
    from transformers import SamImageProcessor, SamProcessor

    mask = image_size // 4
    images = SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                               mask_size={"longest_edge": mask}, mask_pad_size={"height": mask, "width": mask})
    return SamProcessor(images)


def _load_hf_directory(path: Path) -> SamModel:
    from transformers import SamModel

    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{path}: a transformers SAM directory needs config.json")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise MissingFileError(f"{path}: no weights (looked for {', '.join(_WEIGHT_FILES)})")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise DataError(f"{config_file}: not a JSON object ({error})") from error
    if model_type != "sam":
        raise DataError(f"{config_file}: model_type={model_type!r}, expected 'sam'")
    from mapsage_ds.models.weights import check_safetensors

    check_safetensors(path)
    return SamModel.from_pretrained(str(path), local_files_only=True).eval()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a bare state dict, or one under ``"model"``/``"state_dict"``."""
    from mapsage_ds.models.weights import read_state_dict

    return read_state_dict(path)


def _vision_config(state: Mapping[str, torch.Tensor], where: str, *, num_attention_heads: int | None,
                   global_attn_indexes: Sequence[int] | None, window_size: int | None) -> dict:
    proj = _tensor(state, "image_encoder.patch_embed.proj.weight", 4, where)
    hidden, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    if proj.shape[3] != patch:
        raise DataError(f"{where}: image_encoder.patch_embed.proj.weight has a non-square kernel {tuple(proj.shape)}")
    depth = _count(state, "image_encoder.blocks.", "norm1.weight", where)
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in state
    if "image_encoder.pos_embed" in state:
        pos = _tensor(state, "image_encoder.pos_embed", 4, where)
        if pos.shape[0] != 1 or pos.shape[1] != pos.shape[2] or pos.shape[3] != hidden:
            raise DataError(f"{where}: image_encoder.pos_embed has shape {tuple(pos.shape)}, "
                            f"expected (1, g, g, {hidden})")
        grid = pos.shape[1]
    elif use_rel_pos:  # without absolute positions the largest table spans the grid
        grid = max((_tensor(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2, where).shape[0] + 1) // 2
                   for i in range(depth))
    else:
        raise DataError(f"{where}: neither image_encoder.pos_embed nor relative positions: the image size is unknown")

    if use_rel_pos:
        heads, window, global_layers = _read_attention_layout(state, depth, hidden, grid, where)
        if num_attention_heads is not None and num_attention_heads != heads:
            raise ConfigError(f"{where}: num_attention_heads={num_attention_heads}, but the relative-position tables "
                              f"have head_dim {hidden // heads}, i.e. {heads} heads")
        if window is None:  # every table spans the grid: windows of the grid size are global attention
            window = grid if window_size is None else window_size
            global_layers = _published_global(global_attn_indexes, depth, where, default=tuple(range(depth)))
        else:
            if window_size is not None and window_size != window:
                raise ConfigError(f"{where}: window_size={window_size}, but the windowed blocks' relative-position "
                                  f"tables say {window}")
            if global_attn_indexes is not None and sorted(global_attn_indexes) != global_layers:
                raise ConfigError(f"{where}: global_attn_indexes={list(global_attn_indexes)}, but the blocks whose "
                                  f"relative-position tables span the {grid}x{grid} grid are {global_layers}")
    else:
        heads = num_attention_heads if num_attention_heads is not None else PUBLISHED_HEADS.get(hidden)
        if heads is None:
            raise ConfigError(f"{where}: width {hidden} is no published SAM size and the checkpoint has no relative "
                              f"positions to read the head count from; pass num_attention_heads")
        if hidden % heads:
            raise ConfigError(f"{where}: num_attention_heads={heads} does not divide the width {hidden}")
        window = PUBLISHED_WINDOW_SIZE if window_size is None else window_size
        global_layers = _published_global(global_attn_indexes, depth, where, default=None)

    lin1 = _tensor(state, "image_encoder.blocks.0.mlp.lin1.weight", 2, where)
    neck = _tensor(state, "image_encoder.neck.0.weight", 4, where)
    return {
        "hidden_size": hidden,
        "output_channels": neck.shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "num_channels": channels,
        "image_size": grid * patch,
        "patch_size": patch,
        "layer_norm_eps": VISION_LAYER_NORM_EPS,
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state,
        "mlp_dim": lin1.shape[0],
        "mlp_ratio": lin1.shape[0] / hidden,
        "use_abs_pos": "image_encoder.pos_embed" in state,
        "use_rel_pos": use_rel_pos,
        "window_size": window,
        "global_attn_indexes": list(global_layers),
        # SamModel's shared positional embedding is built from the vision config.
        "num_pos_feats": _tensor(state, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", 2,
                                 where).shape[1],
    }


def _read_attention_layout(state: Mapping[str, torch.Tensor], depth: int, hidden: int, grid: int,
                           where: str) -> tuple[int, int | None, list[int]]:
    """Heads, window size (None when no block is windowed) and global blocks, from the relative-position tables."""
    head_dims, spans = set(), {}
    for index in range(depth):
        tables = [_tensor(state, f"image_encoder.blocks.{index}.attn.rel_pos_{axis}", 2, where) for axis in "hw"]
        if tables[0].shape != tables[1].shape or tables[0].shape[0] % 2 == 0:
            raise DataError(f"{where}: image_encoder.blocks.{index}.attn.rel_pos_h/w have shapes "
                            f"{tuple(tables[0].shape)}/{tuple(tables[1].shape)}, expected equal (2s - 1, head_dim)")
        head_dims.add(tables[0].shape[1])
        spans[index] = (tables[0].shape[0] + 1) // 2
    if len(head_dims) != 1 or hidden % next(iter(head_dims)):
        raise DataError(f"{where}: relative-position tables have head_dim {sorted(head_dims)}, expected one value "
                        f"dividing the width {hidden}")
    global_layers = [i for i, span in spans.items() if span == grid]
    windows = {span for span in spans.values() if span != grid}
    if len(windows) > 1:
        raise DataError(f"{where}: windowed blocks have different window sizes {sorted(windows)} (relative-position "
                        f"table rows = 2 * window - 1); SamVisionConfig has one window size")
    return hidden // next(iter(head_dims)), (next(iter(windows)) if windows else None), global_layers


def _published_global(given: Sequence[int] | None, depth: int, where: str, *,
                      default: Sequence[int] | None) -> list[int]:
    if given is not None:
        bad = [i for i in given if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"{where}: global_attn_indexes {bad} outside the encoder's {depth} blocks")
        return sorted(given)
    published = PUBLISHED_GLOBAL_ATTN_INDEXES.get(depth, default)
    if published is None:
        raise ConfigError(f"{where}: depth {depth} is no published SAM size and the checkpoint does not show which "
                          f"blocks attend globally; pass global_attn_indexes")
    return list(published)


def _prompt_encoder_config(state: Mapping[str, torch.Tensor], where: str, *, image_size: int,
                           patch_size: int) -> dict:
    gaussian = _tensor(state, "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", 2, where)
    hidden = _tensor(state, "prompt_encoder.no_mask_embed.weight", 2, where).shape[1]
    if gaussian.shape[0] != 2 or 2 * gaussian.shape[1] != hidden:
        raise DataError(f"{where}: prompt_encoder.pe_layer.positional_encoding_gaussian_matrix has shape "
                        f"{tuple(gaussian.shape)}, expected (2, {hidden // 2}) for prompt width {hidden}")
    return {
        "hidden_size": hidden,
        "image_size": image_size,
        "patch_size": patch_size,
        "mask_input_channels": _tensor(state, "prompt_encoder.mask_downscaling.3.weight", 4, where).shape[0],
        "num_point_embeddings": _count(state, "prompt_encoder.point_embeddings.", "weight", where),
        "hidden_act": "gelu",
        "layer_norm_eps": VISION_LAYER_NORM_EPS,
    }


def _mask_decoder_config(state: Mapping[str, torch.Tensor], where: str, *, num_attention_heads: int) -> dict:
    hidden = _tensor(state, "mask_decoder.iou_token.weight", 2, where).shape[1]
    internal = _tensor(state, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight", 2,
                       where).shape[0]
    if hidden % internal:
        raise DataError(f"{where}: cross-attention width {internal} does not divide the decoder width {hidden}")
    if internal % num_attention_heads:
        raise ConfigError(f"{where}: decoder_num_attention_heads={num_attention_heads} does not divide the "
                          f"cross-attention width {internal}")
    depth = _count(state, "mask_decoder.transformer.layers.", "norm1.weight", where)
    iou_depth = _count(state, "mask_decoder.iou_prediction_head.layers.", "weight", where)
    hyper_depth = _count(state, "mask_decoder.output_hypernetworks_mlps.0.layers.", "weight", where)
    if hyper_depth != _HYPERNETWORK_DEPTH:
        raise DataError(f"{where}: hypernetwork MLPs have {hyper_depth} layers; transformers' SamModel builds "
                        f"{_HYPERNETWORK_DEPTH}")
    return {
        "hidden_size": hidden,
        "hidden_act": "relu",
        "mlp_dim": _tensor(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2, where).shape[0],
        "num_hidden_layers": depth,
        "num_attention_heads": num_attention_heads,
        "attention_downsample_rate": hidden // internal,
        "num_multimask_outputs": _tensor(state, "mask_decoder.mask_tokens.weight", 2, where).shape[0] - 1,
        "iou_head_depth": iou_depth,
        "iou_head_hidden_dim": _tensor(state, "mask_decoder.iou_prediction_head.layers.0.weight", 2, where).shape[0],
        "layer_norm_eps": DECODER_LAYER_NORM_EPS,
    }


def _rename(state: Mapping[str, torch.Tensor], config: SamConfig, where: str) -> dict[str, torch.Tensor]:
    """Every tensor under its ``SamModel`` name; unknown keys are an error (a SAM variant this cannot run)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    iou_depth = config.mask_decoder_config.iou_head_depth
    for key, value in state.items():
        head = _MLP_HEAD.fullmatch(key)
        if head:
            module, layer, param = head.group(1), int(head.group(2)), head.group(3)
            depth = iou_depth if module == "iou_prediction_head" else _HYPERNETWORK_DEPTH
            # Meta: layers.0 .. layers.{depth-1}; transformers: proj_in, layers.0 .. layers.{depth-3}, proj_out.
            name = "proj_in" if layer == 0 else "proj_out" if layer == depth - 1 else f"layers.{layer - 1}"
            out[f"mask_decoder.{module}.{name}.{param}"] = value
            continue
        for pattern, template in _RENAMES:
            match = pattern.fullmatch(key)
            if match:
                out[match.expand(template)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise DataError(f"{where}: tensors that are not part of SAM (a variant such as SAM-HQ, or a fine-tune "
                        f"with extra modules?): {list_names(sorted(unknown))}")
    return out


def _check_against_model(out: Mapping[str, torch.Tensor], config: SamConfig, where: str) -> None:
    """Every ``SamModel`` tensor present with its shape, and nothing else (built on the meta device: no memory)."""
    from transformers import SamModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SamModel(config).state_dict().items()}
    for tied in SamModel._tied_weights_keys:
        expected.pop(tied, None)
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    wrong = [f"{k} {tuple(out[k].shape)} (expected {expected[k]})" for k in sorted(set(out) & set(expected))
             if tuple(out[k].shape) != expected[k]]
    if missing or extra or wrong:
        parts = [f"{label}: {list_names(keys)}" for label, keys in
                 (("missing", missing), ("not in SamModel", extra), ("mis-shaped", wrong)) if keys]
        raise DataError(f"{where}: the tensors do not form one SAM ({'; '.join(parts)})")


def _tensor(state: Mapping[str, torch.Tensor], key: str, dim: int, where: str) -> torch.Tensor:
    if key not in state:
        raise DataError(f"{where}: missing tensor {key}")
    value = state[key]
    if value.dim() != dim:
        raise DataError(f"{where}: {key} has shape {tuple(value.shape)}, expected {dim} dimensions")
    return value


def _count(state: Mapping[str, torch.Tensor], prefix: str, suffix: str, where: str) -> int:
    """Number of ``prefix{i}.suffix`` entries, which must be ``0 .. n-1``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + re.escape(suffix))
    found = sorted(int(m.group(1)) for m in map(pattern.fullmatch, state) if m)
    if not found or found != list(range(len(found))):
        raise DataError(f"{where}: {prefix}N.{suffix} should exist for N = 0, 1, ...; found N in {found}")
    return len(found)

