"""Meta's original DINOv3 ``.pth`` checkpoints, converted to Hugging Face ``DINOv3ViTModel`` layout.

The files Meta publishes (``dinov3_vits16_pretrain_lvd1689m-*.pth`` ... ``dinov3_vit7b16_pretrain_sat493m-*.pth``)
are bare state dicts of ``dinov3.models.vision_transformer.DinoVisionTransformer``, loaded there with
``strict=True``, so their keys carry no prefix:

- ``cls_token (1, 1, D)``, ``storage_tokens (1, R, D)`` (register tokens, placed after CLS),
  ``mask_token (1, D)``, ``patch_embed.proj`` (conv, kernel = patch size), ``rope_embed.periods``
  (buffer of length head_dim / 4), ``norm`` (the final norm);
- per block ``blocks.N.``: ``norm1``, ``attn.qkv`` (3D x D, Q/K/V in thirds) with ``attn.qkv.bias`` and
  ``attn.qkv.bias_mask`` (multiplied into the bias in Meta's forward; its K third is 0),
  ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1/fc2`` (GELU) or ``mlp.w1/w2/w3`` (SwiGLU:
  ``silu(w1 x) * w2 x`` then ``w3``; S+, H+ and 7B), ``ls2.gamma``;
- ``local_cls_norm`` in ViT-L SAT-493M and both 7B files: a norm for the CLS/register tokens of local
  crops, used only in training.

Everything about the architecture is read from the tensors; the one thing they cannot tell is the
LayerNorm epsilon, which is 1e-5 in every published file (Meta's ``layernormbf16``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import torch
from transformers import DINOv3ViTConfig

from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.models.convert.common import PRETRAINING_LVD1689M, PRETRAINING_SAT493M, ConvertedWeights, list_names

SOURCE_FORMAT = "meta-dinov3"
LAYER_NORM_EPS = 1e-5

_REQUIRED_TOP = ("cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                 "norm.bias", "rope_embed.periods")
_OPTIONAL_TOP = ("storage_tokens",)
_TRAINING_ONLY_TOP = ("local_cls_norm.weight", "local_cls_norm.bias")
_UNTIED_CLS_NORM = ("cls_norm.weight", "cls_norm.bias")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
_PLAIN_MLP = ("mlp.fc1", "mlp.fc2")
_GATED_MLP = ("mlp.w1", "mlp.w2", "mlp.w3")
_BLOCK_SUFFIXES = frozenset(
    ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.qkv.bias",
     "attn.qkv.bias_mask", "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "ls2.gamma"]
    + [f"{layer}.{kind}" for layer in _PLAIN_MLP + _GATED_MLP for kind in ("weight", "bias")])
# Published sizes: (patch, hidden, layers, heads, intermediate, gated) -> name in Meta's file names. The
# SwiGLU width is Meta's int(D * ffn_ratio * 2 / 3) rounded up to 8 (S+, L+, H+) or 64 (7B).
_PUBLISHED_SIZES = {
    (16, 384, 12, 6, 1536, False): "vits16",
    (16, 384, 12, 6, 1536, True): "vits16plus",
    (16, 768, 12, 12, 3072, False): "vitb16",
    (16, 1024, 24, 16, 4096, False): "vitl16",
    (16, 1024, 24, 16, 4096, True): "vitl16plus",
    (16, 1280, 32, 20, 5120, True): "vith16plus",
    (16, 4096, 40, 32, 8192, True): "vit7b16",
}
_SHOWN_KEYS = 10


def is_meta_dinov3(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` looks like a Meta DINOv3 ViT state dict (as published: keys without a prefix).

    DINOv2 files share ``cls_token``/``blocks.N.attn.qkv`` but have ``pos_embed`` and neither
    ``rope_embed.periods`` nor ``storage_tokens``.
    """
    has_qkv = any(k.startswith("blocks.") and k.endswith(".attn.qkv.weight") for k in state)
    return (has_qkv and "cls_token" in state and "pos_embed" not in state
            and ("rope_embed.periods" in state or "storage_tokens" in state))


def pretraining_from_name(name: str) -> str | None:
    """The pretraining data named in a checkpoint's file name, or None when it names none (or both).

    Args:
        name: a file name or path (``dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth``) or hub id
            (``facebook/dinov3-vitl16-pretrain-sat493m``); only the last path component is read.

    Returns:
        ``PRETRAINING_SAT493M``, ``PRETRAINING_LVD1689M`` or None.
    """
    base = PurePath(str(name)).name.lower()
    found = [p for p in (PRETRAINING_SAT493M, PRETRAINING_LVD1689M) if p in base]
    return found[0] if len(found) == 1 else None


def dinov3_size_name(config: Any) -> str | None:
    """The published size (``vits16`` ... ``vit7b16``) whose architecture ``config`` has, or None."""
    try:
        key = (config.patch_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
               config.intermediate_size, bool(config.use_gated_mlp))
    except AttributeError:
        return None
    if isinstance(key[0], (list, tuple)):
        if len(set(key[0])) != 1:
            return None
        key = (key[0][0],) + key[1:]
    return _PUBLISHED_SIZES.get(key)


def convert_meta_dinov3(state: Mapping[str, torch.Tensor], *, pretraining: str | None = None,
                        source: str = "") -> ConvertedWeights:
    """Convert a Meta DINOv3 ViT state dict to ``DINOv3ViTModel`` on-disk names, with its config.

    The config is read from the tensors: width, depth, patch size and channels, register tokens,
    head size (``rope_embed.periods`` has head_dim / 4 entries), MLP kind and width, which biases
    exist, and the RoPE base (fitted to the stored periods and checked against them). RoPE training
    augmentations (shift/jitter/rescale) are off, so train-mode forwards stay deterministic.

    The QKV bias is taken as Meta's forward uses it, ``bias * bias_mask``. When its K third is zero
    in every block (every published file) it is dropped and ``key_bias=False``; a non-zero K bias is
    kept (``key_bias=True``), never dropped.

    Args:
        state: the checkpoint's tensors (as loaded with ``torch.load(..., weights_only=True)``).
        pretraining: ``PRETRAINING_SAT493M`` or ``PRETRAINING_LVD1689M``; default: read from ``source``.
        source: where ``state`` came from, for messages (and the pretraining, when not given).

    Returns:
        ConvertedWeights with ``arch="dinov3"`` and ``source_format="meta-dinov3"``; ``dropped``
        lists the training-only and recomputed tensors and why.

    Raises:
        DataError: a tensor is missing, unknown, mis-shaped or inconsistent with the others, or the
            stored values cannot be represented by ``DINOv3ViTModel`` without changing its outputs.
        ConfigError: ``pretraining`` is not a DINOv3 pretraining name, or contradicts ``source``.
    """
    where = source or "Meta DINOv3 checkpoint"
    pretraining = _resolve_pretraining(pretraining, source)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{where}: {key!r} is a {type(value).__name__}, expected a tensor")
    _check_prefix(state, where)

    blocks, unknown = _group_keys(state)
    if unknown:
        if any(k in state for k in _UNTIED_CLS_NORM):
            raise DataError(f"{where}: has {', '.join(k for k in _UNTIED_CLS_NORM if k in state)} (a separate "
                            f"inference norm for CLS/register tokens, untie_cls_and_patch_norms); DINOv3ViTModel "
                            f"applies one final norm to all tokens and cannot reproduce it")
        raise DataError(f"{where}: unknown tensors for a Meta DINOv3 ViT: {list_names(unknown)}")
    missing = [k for k in _REQUIRED_TOP if k not in state]
    if missing:
        raise DataError(f"{where}: missing tensors {list_names(missing)}")

    dropped: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    dims = _read_embeddings(state, where, out)
    hidden = dims["hidden"]
    head_dim = 4 * dims["n_periods"]
    if hidden % head_dim:
        raise DataError(f"{where}: rope_embed.periods has {dims['n_periods']} entries, so head_dim = {head_dim}, "
                        f"which does not divide the width {hidden}")
    rope_theta, rope_note = _rope_theta(state["rope_embed.periods"], head_dim, where)
    dropped["rope_embed.periods"] = rope_note

    layout = _block_layout(state, blocks, hidden, where)
    key_bias = _convert_blocks(state, blocks, layout, hidden, out, dropped, where)

    out["norm.weight"] = _vector(state, "norm.weight", hidden, where)
    out["norm.bias"] = _vector(state, "norm.bias", hidden, where)
    for key in _TRAINING_ONLY_TOP:
        if key in state:
            _vector(state, key, hidden, where)
            dropped[key] = ("training-only norm for the CLS/register tokens of local crops "
                            "(untie_global_and_local_cls_norm); inference uses the final 'norm'")

    config = DINOv3ViTConfig(
        patch_size=dims["patch"],
        hidden_size=hidden,
        intermediate_size=layout["intermediate"],
        num_hidden_layers=len(blocks),
        num_attention_heads=hidden // head_dim,
        hidden_act="silu" if layout["gated"] else "gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        rope_theta=rope_theta,
        num_channels=dims["channels"],
        query_bias=layout["qkv_bias"],
        key_bias=key_bias,
        value_bias=layout["qkv_bias"],
        proj_bias=layout["proj_bias"],
        mlp_bias=layout["mlp_bias"],
        layerscale_value=1.0,
        use_gated_mlp=layout["gated"],
        num_register_tokens=dims["registers"],
        pos_embed_shift=None,
        pos_embed_jitter=None,
        pos_embed_rescale=None,
    )
    config.architectures = ["DINOv3ViTModel"]
    return ConvertedWeights(arch="dinov3", config=config, state_dict=out, source_format=SOURCE_FORMAT,
                            pretraining=pretraining, dropped=dropped)


def _resolve_pretraining(pretraining: str | None, source: str) -> str | None:
    known = (PRETRAINING_SAT493M, PRETRAINING_LVD1689M)
    if pretraining is not None and pretraining not in known:
        raise ConfigError(f"pretraining={pretraining!r} is not a DINOv3 pretraining; expected one of {known}")
    named = pretraining_from_name(source) if source else None
    if pretraining is not None and named is not None and named != pretraining:
        raise ConfigError(f"pretraining={pretraining!r} contradicts the file name {source!r}, which says {named!r}")
    return pretraining if pretraining is not None else named


def _check_prefix(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Published files have bare keys; a wrapped training checkpoint gets a pointed message."""
    if "cls_token" in state:
        return
    prefixed = [k for k in state if k.endswith(".cls_token")]
    if prefixed:
        prefix = prefixed[0][: -len("cls_token")]
        raise DataError(f"{where}: keys carry the prefix {prefix!r} ({prefixed[0]!r}); Meta's published files have "
                        f"none -- extract the backbone's tensors and strip {prefix!r} first")


def _group_keys(state: Mapping[str, torch.Tensor]) -> tuple[dict[int, dict[str, str]], list[str]]:
    """Block index -> {suffix: key}, and the keys that belong nowhere."""
    known_top = set(_REQUIRED_TOP + _OPTIONAL_TOP + _TRAINING_ONLY_TOP)
    blocks: dict[int, dict[str, str]] = {}
    unknown = []
    for key in state:
        match = _BLOCK_KEY.fullmatch(key)
        if match and match.group(2) in _BLOCK_SUFFIXES:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = key
        elif key not in known_top:
            unknown.append(key)
    return dict(sorted(blocks.items())), unknown


def _read_embeddings(state: Mapping[str, torch.Tensor], where: str, out: dict[str, torch.Tensor]) -> dict[str, int]:
    cls_token = state["cls_token"]
    if cls_token.dim() != 3 or cls_token.shape[:2] != (1, 1):
        raise DataError(f"{where}: cls_token has shape {tuple(cls_token.shape)}, expected (1, 1, D)")
    hidden = cls_token.shape[2]
    proj = state["patch_embed.proj.weight"]
    if proj.dim() != 4 or proj.shape[0] != hidden or proj.shape[2] != proj.shape[3]:
        raise DataError(f"{where}: patch_embed.proj.weight has shape {tuple(proj.shape)}, expected "
                        f"({hidden}, channels, patch, patch)")
    out["embeddings.cls_token"] = cls_token
    out["embeddings.patch_embeddings.weight"] = proj
    out["embeddings.patch_embeddings.bias"] = _vector(state, "patch_embed.proj.bias", hidden, where)

    mask_token = state["mask_token"]
    if mask_token.numel() != hidden or mask_token.shape[-1] != hidden or mask_token.dim() > 3:
        raise DataError(f"{where}: mask_token has shape {tuple(mask_token.shape)}, expected (1, {hidden})")
    out["embeddings.mask_token"] = mask_token.reshape(1, 1, hidden)  # Meta (1, D), HF (1, 1, D)

    registers = state.get("storage_tokens")
    if registers is None:
        registers = cls_token.new_zeros((1, 0, hidden))
    elif registers.dim() != 3 or registers.shape[0] != 1 or registers.shape[2] != hidden:
        raise DataError(f"{where}: storage_tokens has shape {tuple(registers.shape)}, expected (1, R, {hidden})")
    out["embeddings.register_tokens"] = registers

    periods = state["rope_embed.periods"]
    if periods.dim() != 1 or periods.numel() == 0:
        raise DataError(f"{where}: rope_embed.periods has shape {tuple(periods.shape)}, expected (head_dim / 4,)")
    return {"hidden": hidden, "channels": proj.shape[1], "patch": proj.shape[2], "registers": registers.shape[1],
            "n_periods": periods.numel()}


def _rope_theta(periods: torch.Tensor, head_dim: int, where: str) -> tuple[float, str]:
    """The RoPE base whose periods (as HF recomputes them) equal the stored ones, and a note saying so.

    Meta: ``periods[i] = base ** (2 i / (head_dim / 2))``; HF: ``1 / inv_freq`` with ``inv_freq =
    1 / rope_theta ** arange(0, 1, 4 / head_dim)`` -- the same exponents i / (head_dim / 4).
    """
    n = periods.numel()
    stored = periods.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(stored).all()) or bool((stored <= 0).any()):
        raise DataError(f"{where}: rope_embed.periods holds non-positive or non-finite values: {stored.tolist()}")
    if len(torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)) != n:
        raise DataError(f"{where}: head_dim {head_dim} gives HF a RoPE table of a different length than the "
                        f"{n} stored periods")
    # Meta's published files hold periods rounded to bfloat16 (timm notes the same); allow that rounding.
    as_bf16 = stored.to(torch.bfloat16).to(torch.float64)
    if periods.dtype in (torch.bfloat16, torch.float16) or bool((as_bf16 == stored).all()):
        rtol, precision = 2.0**-8 + 1e-6, "bfloat16-rounded"
    else:
        rtol, precision = 1e-5, "float32"
    exponents = torch.arange(n, dtype=torch.float64) / n
    if n > 1:
        fitted = math.exp(float((exponents * stored.log()).sum() / (exponents * exponents).sum()))
        candidates = [float(round(fitted)), float(f"{fitted:.6g}")] if fitted >= 0.5 else [float(f"{fitted:.6g}")]
    else:
        candidates = [DINOv3ViTConfig().rope_theta]  # one period is base ** 0 = 1 for every base
    errors = []
    for theta in candidates:
        recomputed = 1 / (1 / theta ** torch.arange(0, 1, 4 / head_dim, dtype=torch.float32)).to(torch.float64)
        rel = float(((stored - recomputed).abs() / recomputed).max())
        if rel <= rtol:
            return theta, (f"recomputed by DINOv3ViTModel from rope_theta={theta:g} (head_dim {head_dim}); matches "
                           f"the {n} stored {precision} periods to a relative {rel:.1e}")
        errors.append(f"base {theta:g}: {[round(v, 6) for v in recomputed.tolist()]} (relative error {rel:.1e})")
    raise DataError(f"{where}: rope_embed.periods {[round(v, 6) for v in stored.tolist()]} do not follow "
                    f"base ** (4 i / head_dim) for head_dim {head_dim}, which is all DINOv3ViTModel can compute; "
                    f"best fits: {'; '.join(errors)}")


def _block_layout(state: Mapping[str, torch.Tensor], blocks: dict[int, dict[str, str]], hidden: int,
                  where: str) -> dict[str, Any]:
    """The structure every block shares, with every block checked against it."""
    if not blocks:
        raise DataError(f"{where}: no transformer blocks (blocks.N.*)")
    indices = list(blocks)
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise DataError(f"{where}: blocks are not numbered 0..{indices[-1]}: no tensors for "
                        f"{', '.join(f'blocks.{i}' for i in gaps)}")
    present = set().union(*(set(suffixes) for suffixes in blocks.values()))
    plain = any(s.startswith(_PLAIN_MLP) for s in present)
    gated = any(s.startswith(_GATED_MLP) for s in present)
    if plain and gated:
        raise DataError(f"{where}: blocks mix a plain MLP (mlp.fc1/fc2) and a SwiGLU MLP (mlp.w1/w2/w3)")
    mlp_layers = _GATED_MLP if gated else _PLAIN_MLP
    qkv_bias = "attn.qkv.bias" in present
    if "attn.qkv.bias_mask" in present and not qkv_bias:
        raise DataError(f"{where}: attn.qkv.bias_mask without attn.qkv.bias")
    expected = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "norm2.weight",
                "norm2.bias"] + [f"{layer}.weight" for layer in mlp_layers]
    mlp_bias = any(f"{layer}.bias" in present for layer in mlp_layers)
    expected += [f"{layer}.bias" for layer in mlp_layers] if mlp_bias else []
    optional = ["attn.qkv.bias", "attn.qkv.bias_mask", "attn.proj.bias", "ls1.gamma", "ls2.gamma"]
    expected += [s for s in optional if s in present]
    if ("ls1.gamma" in present) != ("ls2.gamma" in present):
        expected += ["ls1.gamma", "ls2.gamma"]
    expected = list(dict.fromkeys(expected))
    missing = [f"blocks.{i}.{s}" for i, suffixes in blocks.items() for s in expected if s not in suffixes]
    if missing:
        raise DataError(f"{where}: missing tensors {list_names(missing)}")
    stray = sorted(f"blocks.{i}.{s}" for i, suffixes in blocks.items() for s in suffixes if s not in expected)
    if stray:
        raise DataError(f"{where}: tensors that do not fit the {'SwiGLU' if gated else 'plain'} MLP blocks: "
                        f"{list_names(stray)}")
    first = state[blocks[0][f"{mlp_layers[0]}.weight"]]
    if first.dim() != 2:
        raise DataError(f"{where}: blocks.0.{mlp_layers[0]}.weight has shape {tuple(first.shape)}, expected 2-D")
    return {"gated": gated, "mlp_layers": mlp_layers, "intermediate": first.shape[0], "qkv_bias": qkv_bias,
            "mask": "attn.qkv.bias_mask" in present, "proj_bias": "attn.proj.bias" in present,
            "mlp_bias": mlp_bias, "layerscale": "ls1.gamma" in present}


def _convert_blocks(state: Mapping[str, torch.Tensor], blocks: dict[int, dict[str, str]], layout: dict[str, Any],
                    hidden: int, out: dict[str, torch.Tensor], dropped: dict[str, str], where: str) -> bool:
    """Write every block's tensors under HF names; returns whether a (non-zero) K bias is kept."""
    inter = layout["intermediate"]
    k_biases: dict[int, torch.Tensor] = {}
    raw_k_nonzero = False
    for i in blocks:
        src, dst = f"blocks.{i}.", f"layer.{i}."
        for norm in ("norm1", "norm2"):
            out[f"{dst}{norm}.weight"] = _vector(state, f"{src}{norm}.weight", hidden, where)
            out[f"{dst}{norm}.bias"] = _vector(state, f"{src}{norm}.bias", hidden, where)
        # Slices are cloned: q/k/v views of one storage read as tied weights to save_pretrained.
        qkv = _matrix(state, f"{src}attn.qkv.weight", (3 * hidden, hidden), where)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}attention.{name}.weight"] = qkv[j * hidden:(j + 1) * hidden].clone()
        if layout["qkv_bias"]:
            bias = _vector(state, f"{src}attn.qkv.bias", 3 * hidden, where)
            raw_k_nonzero |= bool((bias[hidden:2 * hidden] != 0).any())
            if layout["mask"]:
                mask = _vector(state, f"{src}attn.qkv.bias_mask", 3 * hidden, where)
                if not bool(torch.isfinite(mask).all()):
                    raise DataError(f"{where}: {src}attn.qkv.bias_mask holds non-finite values (an uninitialised "
                                    f"mask); Meta's forward would produce NaN")
                bias = bias * mask.to(bias.dtype)  # what LinearKMaskedBias adds
            out[f"{dst}attention.q_proj.bias"] = bias[:hidden].clone()
            out[f"{dst}attention.v_proj.bias"] = bias[2 * hidden:].clone()
            k_biases[i] = bias[hidden:2 * hidden].clone()
        out[f"{dst}attention.o_proj.weight"] = _matrix(state, f"{src}attn.proj.weight", (hidden, hidden), where)
        if layout["proj_bias"]:
            out[f"{dst}attention.o_proj.bias"] = _vector(state, f"{src}attn.proj.bias", hidden, where)
        for ls, name in (("ls1", "layer_scale1"), ("ls2", "layer_scale2")):
            if layout["layerscale"]:
                out[f"{dst}{name}.lambda1"] = _vector(state, f"{src}{ls}.gamma", hidden, where)
            else:  # no LayerScale in Meta's block is a scale of one in HF's
                out[f"{dst}{name}.lambda1"] = torch.ones_like(out[f"{dst}norm1.weight"])
        if layout["gated"]:
            names = {"mlp.w1": ("gate_proj", (inter, hidden)), "mlp.w2": ("up_proj", (inter, hidden)),
                     "mlp.w3": ("down_proj", (hidden, inter))}
        else:
            names = {"mlp.fc1": ("up_proj", (inter, hidden)), "mlp.fc2": ("down_proj", (hidden, inter))}
        for layer, (name, shape) in names.items():
            out[f"{dst}mlp.{name}.weight"] = _matrix(state, f"{src}{layer}.weight", shape, where)
            if layout["mlp_bias"]:
                out[f"{dst}mlp.{name}.bias"] = _vector(state, f"{src}{layer}.bias", shape[0], where)

    key_bias = any(bool((b != 0).any()) for b in k_biases.values())
    if key_bias:
        for i, b in k_biases.items():
            out[f"layer.{i}.attention.k_proj.bias"] = b
    elif k_biases:
        masked = " (the stored values are non-zero, masked to zero by bias_mask)" if raw_k_nonzero else ""
        dropped["blocks.*.attn.qkv.bias[K third]"] = (f"the K bias is zero in every block{masked}; "
                                                      f"DINOv3ViTModel has key_bias=False")
    if layout["mask"]:
        dropped["blocks.*.attn.qkv.bias_mask"] = ("multiplied into attn.qkv.bias before splitting it into "
                                                  "q_proj/k_proj/v_proj biases, as Meta's forward does")
    return key_bias


def _vector(state: Mapping[str, torch.Tensor], key: str, size: int, where: str) -> torch.Tensor:
    value = state[key]
    if tuple(value.shape) != (size,):
        raise DataError(f"{where}: {key} has shape {tuple(value.shape)}, expected ({size},)")
    return value


def _matrix(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, int], where: str) -> torch.Tensor:
    value = state[key]
    if tuple(value.shape) != shape:
        raise DataError(f"{where}: {key} has shape {tuple(value.shape)}, expected {shape}")
    return value

