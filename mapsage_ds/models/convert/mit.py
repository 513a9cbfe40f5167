"""Convert MiT / SegFormer checkpoints (NVlabs, mmsegmentation, HF) into HF SegFormer layout.

Three layouts of the same network are in circulation:

- NVlabs (the authors' ``mix_transformer.py``, ``mit_b*.pth`` and full SegFormer checkpoints):
  ``patch_embed{1-4}``, ``block{s}.{j}`` with ``attn.q`` / ``attn.kv``, ``mlp.dwconv.dwconv``,
  ``norm{1-4}``; full checkpoints prefix ``backbone.`` and carry the all-MLP ``decode_head``.
- mmsegmentation (``mit2mmseg.py`` output and mmseg SegFormer checkpoints): ``layers.{s}.0``
  (patch embed), ``layers.{s}.1.{j}`` with ``nn.MultiheadAttention``'s packed ``in_proj`` and a
  1x1-conv FFN, ``layers.{s}.2`` (stage norm).
- Hugging Face: ``segformer.encoder.*`` on disk; transformers 5 renames the modules in memory
  (``stages.{s}.blocks.{j}``, ``q_proj``, ...) and maps the names when loading and saving.

The output always uses the HF on-disk names, which is what ``save_pretrained`` writes and
``from_pretrained`` reads in every transformers version.

What the tensors do not say:

- Attention head counts. MiT uses ``[1, 2, 5, 8]`` in every size (b0-b5); other counts must be
  passed as ``num_attention_heads``.
- Strides. MiT's overlapping patch embeddings use stride 4 for the first stage (7x7 kernel) and 2
  after (3x3 kernels).
- LayerNorm eps. HF's SegFormer hard-codes PyTorch's default 1e-5 in every LayerNorm (its config's
  ``layer_norm_eps`` is not used by the encoder); mmseg uses 1e-6 everywhere and NVlabs 1e-6 in
  the block and stage norms. No HF config value expresses that, so converted models differ from
  the source by the eps alone. Measured on a tiny random MiT with unit-variance input: stage
  outputs (magnitude ~5) differ by at most 3.5e-5 from mmseg's and 2.6e-5 from NVlabs' eps
  pattern, against 2e-6 (rounding) when the eps agree.
- Pretraining data. Every published MiT backbone is ImageNet-1k pretrained, and SegFormer
  checkpoints were initialised from those, so ``pretraining`` is ImageNet for all three layouts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel

from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.models.convert.common import PRETRAINING_IMAGENET, ConvertedWeights, list_names

MIT_NUM_HEADS = (1, 2, 5, 8)
"""MiT's published attention heads per stage, the same for b0-b5."""

_ENC = "segformer.encoder."
_HEAD = "decode_head."

_HF_DISK = re.compile(r"^(segformer\.)?encoder\.(patch_embeddings|block|layer_norm)\.\d+\.")
_HF_MEMORY = re.compile(r"^(segformer\.)?stages\.\d+\.(patch_embeddings|blocks|layer_norm)\.")
_MMSEG = re.compile(r"^(backbone\.)?layers\.\d+\.0\.projection\.weight$")
_NVLABS = re.compile(r"^(backbone\.)?patch_embed1\.proj\.weight$")

_NVLABS_BLOCK = {
    "norm1": "layer_norm_1",
    "norm2": "layer_norm_2",
    "attn.q": "attention.self.query",
    "attn.proj": "attention.output.dense",
    "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm",
    "mlp.fc1": "mlp.dense1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.dense2",
}
_MMSEG_BLOCK = {
    "norm1": "layer_norm_1",
    "norm2": "layer_norm_2",
    "attn.attn.out_proj": "attention.output.dense",
    "attn.sr": "attention.self.sr",
    "attn.norm": "attention.self.layer_norm",
    "ffn.layers.0": "mlp.dense1",
    "ffn.layers.1": "mlp.dwconv.dwconv",
    "ffn.layers.4": "mlp.dense2",
}
_MMSEG_POINTWISE = ("ffn.layers.0", "ffn.layers.4")  # 1x1 convs that HF holds as Linear
# transformers 5 in-memory name -> on-disk name (the inverse of its load-time renaming).
_HF_MEMORY_RENAMES = (
    (re.compile(r"stages\.(\d+)\.patch_embeddings\."), r"encoder.patch_embeddings.\1."),
    (re.compile(r"stages\.(\d+)\.blocks\.(\d+)\."), r"encoder.block.\1.\2."),
    (re.compile(r"stages\.(\d+)\.layer_norm\."), r"encoder.layer_norm.\1."),
    (re.compile(r"attention\.q_proj\."), "attention.self.query."),
    (re.compile(r"attention\.k_proj\."), "attention.self.key."),
    (re.compile(r"attention\.v_proj\."), "attention.self.value."),
    (re.compile(r"attention\.o_proj\."), "attention.output.dense."),
    (re.compile(r"attention\.sequence_reduction\.sequence_reduction\."), "attention.self.sr."),
    (re.compile(r"attention\.sequence_reduction\.layer_norm\."), "attention.self.layer_norm."),
    (re.compile(r"mlp\.fc1\."), "mlp.dense1."),
    (re.compile(r"mlp\.fc2\."), "mlp.dense2."),
    (re.compile(r"layernorm_before\."), "layer_norm_1."),
    (re.compile(r"layernorm_after\."), "layer_norm_2."),
    (re.compile(r"decode_head\.linear_projections\."), "decode_head.linear_c."),
)

_WHY_CLASSIFIER = "ImageNet-1k classification head of the pretrained backbone; segmentation does not use it"
_WHY_MMSEG_HEAD = ("mmseg decode head (SegformerHead: convs.{i} conv+BN, fusion_conv, conv_seg, or another head) "
                   "is not HF's all-MLP SegFormer head; only the backbone is converted")
_WHY_AUX_HEAD = "auxiliary training head; HF SegFormer has none"
_WHY_CONV_SEG = "mmseg BaseDecodeHead's conv_seg, unused by NVlabs' SegFormerHead (linear_pred is its classifier)"
_WHY_OTHER_HEAD = "NVlabs decode head without linear_pred is not the all-MLP SegFormer head"

_Renamed = list[tuple[str, Tensor]]


def _strip_wrapper(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def detect_mit_format(state: Mapping[str, Tensor]) -> str | None:
    """Which MiT / SegFormer layout a state dict is in.

    Args:
        state: tensors by name; ``module.`` (DDP) and ``backbone.`` (segmentor) prefixes are allowed.

    Returns:
        ``"hf"`` (``segformer.encoder.*``, bare ``encoder.*`` or transformers 5 in-memory names),
        ``"mmseg"`` or ``"nvlabs"``; None when it is not a MiT checkpoint.
    """
    keys = [_strip_wrapper(k) for k in state]
    if any(_HF_DISK.match(k) or _HF_MEMORY.match(k) for k in keys):
        return "hf"
    if any(_MMSEG.match(k) for k in keys):
        return "mmseg"
    if any(_NVLABS.match(k) for k in keys):
        return "nvlabs"
    return None


def convert_mit(
    state: Mapping[str, Tensor],
    *,
    num_attention_heads: Sequence[int] | None = None,
    source: str = "",
) -> ConvertedWeights:
    """Convert a MiT backbone or SegFormer checkpoint into HF SegFormer layout.

    The config is read from the tensors: stages, depths, widths, patch-embed kernels, sequence
    reduction ratios (the ``sr`` conv kernel; none means 1), MLP ratios and input channels; for an
    NVlabs or HF checkpoint with the all-MLP decode head also its width and number of labels.

    Args:
        state: the checkpoint's state dict (already taken out of any ``{"state_dict": ...}`` wrapper).
        num_attention_heads: heads per stage; MiT's published ``[1, 2, 5, 8]`` when None.
        source: where the tensors came from, for error messages.

    Returns:
        The HF config, the tensors under HF on-disk names (``segformer.encoder.*``, and
        ``decode_head.*`` for an all-MLP head), and what was dropped and why.

    Raises:
        DataError: the tensors are not a MiT checkpoint, hold unrecognised keys, or do not fit together.
        ConfigError: a head count does not divide its stage's width, or there are no defaults for
            this many stages.
    """
    where = source or "state dict"
    fmt = detect_mit_format(state)
    if fmt is None:
        raise DataError(f"{where}: not a MiT/SegFormer checkpoint (no patch_embed1.*, layers.0.0.projection.* or "
                        f"segformer.encoder.* keys); first keys: {', '.join(list(state)[:5])}")
    rename = {"nvlabs": _rename_nvlabs, "mmseg": _rename_mmseg, "hf": _rename_hf}[fmt]
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dropped: dict[str, str] = {}
    unknown: list[str] = []
    has_nvlabs_head = fmt == "nvlabs" and any(_strip_wrapper(k) == "decode_head.linear_pred.weight" for k in state)
    for key, tensor in state.items():
        result = rename(_strip_wrapper(key), tensor, has_nvlabs_head)
        if result is None:
            unknown.append(key)
        elif isinstance(result, tuple):
            pattern, why = result
            dropped[_pattern_prefix(key) + pattern] = why
        else:
            for new_key, new_tensor in result:
                if new_key in out:
                    raise DataError(f"{where}: keys {origin[new_key]} and {key} both map to {new_key}")
                out[new_key] = new_tensor
                origin[new_key] = key
    if unknown:
        raise DataError(f"{where}: unrecognised keys for a {fmt} MiT checkpoint: {list_names(unknown)}")
    config = _infer_config(out, origin, num_attention_heads, where)
    _check_against_model(out, origin, config, where)
    return ConvertedWeights(arch="segformer", config=config, state_dict=out, source_format=fmt,
                            pretraining=PRETRAINING_IMAGENET, dropped=dropped)


def _pattern_prefix(key: str) -> str:
    """The ``module.`` prefixes of ``key``, so that dropped patterns name source keys."""
    return key[: len(key) - len(_strip_wrapper(key))]


# --- per-layout renaming: a list of (HF key, tensor), a (pattern, reason) to drop, or None if unknown ---


def _rename_nvlabs(key: str, tensor: Tensor, has_head: bool) -> _Renamed | tuple[str, str] | None:
    if key.startswith(_HEAD):
        if not has_head:
            return "decode_head.*", _WHY_OTHER_HEAD
        return _rename_nvlabs_head(key[len(_HEAD):], tensor)
    if key.startswith("auxiliary_head."):
        return "auxiliary_head.*", _WHY_AUX_HEAD
    if m := re.fullmatch(r"(backbone\.)?head\.(weight|bias)", key):
        return f"{m[1] or ''}head.*", _WHY_CLASSIFIER
    key = key.removeprefix("backbone.")
    if m := re.fullmatch(r"patch_embed(\d+)\.(proj|norm)\.(weight|bias)", key):
        part = "proj" if m[2] == "proj" else "layer_norm"
        return [(f"{_ENC}patch_embeddings.{int(m[1]) - 1}.{part}.{m[3]}", tensor)]
    if m := re.fullmatch(r"norm(\d+)\.(weight|bias)", key):
        return [(f"{_ENC}layer_norm.{int(m[1]) - 1}.{m[2]}", tensor)]
    if m := re.fullmatch(r"block(\d+)\.(\d+)\.(.+)\.(weight|bias)", key):
        block = f"{_ENC}block.{int(m[1]) - 1}.{m[2]}."
        if m[3] == "attn.kv":
            key_part, value_part = _split(tensor, 2, key)
            return [(f"{block}attention.self.key.{m[4]}", key_part),
                    (f"{block}attention.self.value.{m[4]}", value_part)]
        if m[3] in _NVLABS_BLOCK:
            return [(f"{block}{_NVLABS_BLOCK[m[3]]}.{m[4]}", tensor)]
    return None


def _rename_nvlabs_head(key: str, tensor: Tensor) -> _Renamed | tuple[str, str] | None:
    if key.startswith("conv_seg."):
        return "decode_head.conv_seg.*", _WHY_CONV_SEG
    if m := re.fullmatch(r"linear_c(\d+)\.proj\.(weight|bias)", key):
        return [(f"{_HEAD}linear_c.{int(m[1]) - 1}.proj.{m[2]}", tensor)]
    if key == "linear_fuse.conv.weight":
        return [(f"{_HEAD}linear_fuse.weight", tensor)]
    if m := re.fullmatch(r"linear_fuse\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)", key):
        return [(f"{_HEAD}batch_norm.{m[1]}", tensor)]
    if m := re.fullmatch(r"linear_pred\.(weight|bias)", key):
        return [(f"{_HEAD}classifier.{m[1]}", tensor)]
    return None


def _rename_mmseg(key: str, tensor: Tensor, has_head: bool) -> _Renamed | tuple[str, str] | None:
    del has_head  # mmseg heads are never HF's
    if key.startswith(_HEAD):
        return "decode_head.*", _WHY_MMSEG_HEAD
    if key.startswith("auxiliary_head."):
        return "auxiliary_head.*", _WHY_AUX_HEAD
    key = key.removeprefix("backbone.")
    if m := re.fullmatch(r"layers\.(\d+)\.0\.(projection|norm)\.(weight|bias)", key):
        part = "proj" if m[2] == "projection" else "layer_norm"
        return [(f"{_ENC}patch_embeddings.{m[1]}.{part}.{m[3]}", tensor)]
    if m := re.fullmatch(r"layers\.(\d+)\.2\.(weight|bias)", key):
        return [(f"{_ENC}layer_norm.{m[1]}.{m[2]}", tensor)]
    if m := re.fullmatch(r"layers\.(\d+)\.1\.(\d+)\.(.+)", key):
        block, rest = f"{_ENC}block.{m[1]}.{m[2]}.", m[3]
        if pm := re.fullmatch(r"attn\.attn\.in_proj_(weight|bias)", rest):
            parts = _split(tensor, 3, key)
            return [(f"{block}attention.self.{name}.{pm[1]}", part)
                    for name, part in zip(("query", "key", "value"), parts)]
        if (pm := re.fullmatch(r"(.+)\.(weight|bias)", rest)) and pm[1] in _MMSEG_BLOCK:
            if pm[1] in _MMSEG_POINTWISE and pm[2] == "weight":
                tensor = _pointwise_to_linear(tensor, key)
            return [(f"{block}{_MMSEG_BLOCK[pm[1]]}.{pm[2]}", tensor)]
    return None


def _rename_hf(key: str, tensor: Tensor, has_head: bool) -> _Renamed | tuple[str, str] | None:
    del has_head
    if re.fullmatch(r"classifier\.(weight|bias)", key):
        return "classifier.*", _WHY_CLASSIFIER
    key = _hf_memory_to_disk(key)
    if key.startswith("encoder."):
        key = "segformer." + key
    if key.startswith(_ENC) or key.startswith(_HEAD):
        return [(key, tensor)]
    return None


def _hf_memory_to_disk(key: str) -> str:
    for pattern, replacement in _HF_MEMORY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def _split(tensor: Tensor, parts: int, key: str) -> list[Tensor]:
    if tensor.shape[0] % parts:
        raise DataError(f"{key}: expected {parts} equal parts stacked along dim 0, got shape {tuple(tensor.shape)}")
    return [part.clone() for part in tensor.chunk(parts, dim=0)]


def _pointwise_to_linear(weight: Tensor, key: str) -> Tensor:
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        return weight.reshape(weight.shape[0], weight.shape[1]).clone()
    if weight.dim() == 2:
        return weight
    raise DataError(f"{key}: expected a 1x1 conv weight (out, in, 1, 1), got shape {tuple(weight.shape)}")


# --- config from the tensors, and a check of every tensor against the model it describes ---


def _infer_config(state: dict[str, Tensor], origin: dict[str, str], heads: Sequence[int] | None,
                  where: str) -> SegformerConfig:
    embed = re.compile(rf"{re.escape(_ENC)}patch_embeddings\.(\d+)\.proj\.weight")
    stages = sorted(int(m[1]) for k in state if (m := embed.fullmatch(k)))
    if stages != list(range(len(stages))) or not stages:
        raise DataError(f"{where}: patch embeddings for stages {stages}; expected 0..n-1")
    depths, hidden, patch, sr, mlp = [], [], [], [], []
    for s in stages:
        proj = state[f"{_ENC}patch_embeddings.{s}.proj.weight"]
        if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
            raise DataError(f"{where}: {origin[f'{_ENC}patch_embeddings.{s}.proj.weight']}: expected a square conv "
                            f"kernel (out, in, k, k), got shape {tuple(proj.shape)}")
        hidden.append(int(proj.shape[0]))
        patch.append(int(proj.shape[-1]))
        blocks = sorted({int(m[1]) for k in state if (m := re.match(rf"{re.escape(_ENC)}block\.{s}\.(\d+)\.", k))})
        if not blocks or blocks != list(range(len(blocks))):
            raise DataError(f"{where}: stage {s} has blocks {blocks}; expected 0..n-1")
        depths.append(len(blocks))
        sr.append(_per_stage(state, origin, where, s, blocks, "attention.self.sr.weight",
                             lambda t: int(t.shape[-1]), default=1))
        mlp.append(_per_stage(state, origin, where, s, blocks, "mlp.dense1.weight",
                              lambda t, width=hidden[-1]: _ratio(t.shape[0], width)))
    heads = _heads(heads, hidden, where)
    extra: dict[str, int] = {}
    if f"{_HEAD}linear_c.0.proj.weight" in state and f"{_HEAD}classifier.weight" in state:
        extra = {"decoder_hidden_size": int(state[f"{_HEAD}linear_c.0.proj.weight"].shape[0]),
                 "num_labels": int(state[f"{_HEAD}classifier.weight"].shape[0])}
    return SegformerConfig(
        num_channels=int(state[f"{_ENC}patch_embeddings.0.proj.weight"].shape[1]),
        num_encoder_blocks=len(stages),
        depths=depths,
        sr_ratios=sr,
        hidden_sizes=hidden,
        patch_sizes=patch,
        strides=[4] + [2] * (len(stages) - 1),  # MiT's rule; strides are not in the weights
        num_attention_heads=heads,
        mlp_ratios=mlp,
        **extra,
    )


def _per_stage(state: dict[str, Tensor], origin: dict[str, str], where: str, stage: int, blocks: list[int],
               suffix: str, read: Callable[[Tensor], int | float], default: int | None = None) -> int | float:
    """One value read from every block of a stage, which must agree."""
    values = {}
    for j in blocks:
        key = f"{_ENC}block.{stage}.{j}.{suffix}"
        values[origin.get(key, key)] = read(state[key]) if key in state else default
    if len(set(values.values())) != 1 or None in values.values():
        raise DataError(f"{where}: blocks of stage {stage}: {suffix} missing or different: {values}")
    return next(iter(values.values()))


def _ratio(width: int, hidden: int) -> int | float:
    return width // hidden if width % hidden == 0 else width / hidden


def _heads(heads: Sequence[int] | None, hidden: list[int], where: str) -> list[int]:
    given = heads is not None
    if heads is None:
        if len(hidden) != len(MIT_NUM_HEADS):
            raise ConfigError(f"{where}: {len(hidden)} stages; MiT's default heads {list(MIT_NUM_HEADS)} are for 4, "
                              f"pass num_attention_heads")
        heads = MIT_NUM_HEADS
    heads = [int(h) for h in heads]
    if len(heads) != len(hidden):
        raise ConfigError(f"num_attention_heads={heads}: expected one per stage, {len(hidden)} stages")
    bad = [f"stage {s}: {h} heads for width {w}" for s, (h, w) in enumerate(zip(heads, hidden)) if h < 1 or w % h]
    if bad:
        origin = "num_attention_heads" if given else f"MiT's default heads {list(MIT_NUM_HEADS)}"
        raise ConfigError(f"{where}: {origin} do not divide the stage widths {hidden} ({'; '.join(bad)}); "
                          f"pass num_attention_heads that do")
    return heads


def _check_against_model(state: dict[str, Tensor], origin: dict[str, str], config: SegformerConfig,
                         where: str) -> None:
    """Compare names and shapes with the HF model the config describes; fill what HF has and we lack."""
    with_head = any(k.startswith(_HEAD) for k in state)
    with torch.device("meta"):
        if with_head:
            expected = SegformerForSemanticSegmentation(config).state_dict()
        else:
            expected = {"segformer." + k: v for k, v in SegformerModel(config).state_dict().items()}
    expected = {_hf_memory_to_disk(k): v for k, v in expected.items()}
    bn_counter = f"{_HEAD}batch_norm.num_batches_tracked"
    if with_head and bn_counter not in state:
        # Checkpoints from before PyTorch 0.4.1 lack the counter. With BatchNorm's default momentum it
        # affects neither the forward pass nor the running-statistics update, so zero is exact.
        state[bn_counter] = torch.zeros((), dtype=torch.long)
        origin[bn_counter] = "(added: num_batches_tracked)"
    if bn_counter in state:
        state[bn_counter] = state[bn_counter].to(torch.long)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(origin[k] for k in set(state) - set(expected))
    mismatched = [f"{origin[k]} {tuple(state[k].shape)} (HF {k} expects {tuple(v.shape)})"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {list_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {list_names(unexpected)}")
    if mismatched:
        problems.append(f"shape-mismatched {list_names(mismatched)}")
    if problems:
        raise DataError(f"{where}: tensors do not form the SegFormer they describe ({config.hidden_sizes=}, "
                        f"{config.depths=}): " + "; ".join(problems))

