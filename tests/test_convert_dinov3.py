"""Meta DINOv3 .pth -> HF DINOv3ViTModel, checked against timm's own DINOv3 (EVA) model and key filter.

Each published size family gets a tiny analogue with the same structure (registers, RoPE, LayerScale,
plain or SwiGLU MLP, the biases the real files have, local_cls_norm where present). Its Meta-layout
state dict is written to a real ``.pth``; timm loads it through ``timm.models.eva.checkpoint_filter_fn``,
our converter writes an HF directory that plain ``DINOv3ViTModel.from_pretrained`` reads, and the
final-normed CLS, register and patch tokens must agree on a non-square input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import timm.models.eva
import torch
from safetensors.torch import save_file
from timm.models.eva import checkpoint_filter_fn
from transformers import DINOv3ViTConfig, DINOv3ViTModel

from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.models.convert.common import PRETRAINING_LVD1689M, PRETRAINING_SAT493M
from mapsage_ds.models.convert.dinov3_meta import (
    convert_meta_dinov3,
    dinov3_size_name,
    is_meta_dinov3,
    pretraining_from_name,
)

ATOL = 1e-4


@dataclass(frozen=True)
class Family:
    """A tiny analogue of one published checkpoint, in Meta's own hub terms (dinov3/hub/backbones.py)."""

    file_name: str
    timm_name: str
    dim: int
    heads: int
    depth: int = 2
    ffn_ratio: float = 4.0
    swiglu_align: int = 0  # 0: plain GELU MLP (fc1/fc2); else SwiGLU (w1/w2/w3) aligned to this
    qkv_bias: bool = True
    mask_k_bias: bool = True
    registers: int = 4
    layerscale: bool = True
    local_cls_norm: bool = False
    patch: int = 16
    rope_base: float = 100.0
    periods_dtype: torch.dtype = torch.float32
    raw_k_bias: bool = False  # non-zero stored K third (masked by bias_mask when mask_k_bias)

    @property
    def hidden(self) -> int:
        """MLP width as Meta's Block/SwiGLUFFN compute it."""
        hidden = int(self.dim * self.ffn_ratio)
        if not self.swiglu_align:
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d % self.swiglu_align)


FAMILIES = {
    "vits16": Family("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "vit_small_patch16_dinov3_qkvb", 64, 4),
    "vits16plus": Family("dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth", "vit_small_plus_patch16_dinov3_qkvb",
                         48, 3, ffn_ratio=6, swiglu_align=8, raw_k_bias=True),
    "vitb16": Family("dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "vit_base_patch16_dinov3_qkvb", 64, 2,
                     registers=2, periods_dtype=torch.bfloat16),
    "vitl16": Family("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "vit_large_patch16_dinov3_qkvb", 64, 4,
                     depth=3, patch=8),
    "vitl16_sat": Family("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", "vit_large_patch16_dinov3_qkvb", 64, 4,
                         local_cls_norm=True, rope_base=37.0),
    "vith16plus": Family("dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth", "vit_huge_plus_patch16_dinov3_qkvb",
                         80, 5, ffn_ratio=6, swiglu_align=8),
    "vit7b16": Family("dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth", "vit_7b_patch16_dinov3", 40, 2,
                      ffn_ratio=3, swiglu_align=64, qkv_bias=False, local_cls_norm=True),
    "vit7b16_sat": Family("dinov3_vit7b16_pretrain_sat493m-a6675841.pth", "vit_7b_patch16_dinov3", 40, 2,
                          ffn_ratio=3, swiglu_align=64, qkv_bias=False, local_cls_norm=True,
                          periods_dtype=torch.bfloat16),
    # Not published: no LayerScale, no registers, no QKV bias -- the converter's other branches.
    "bare": Family("my_dinov3.pth", "vit_small_patch16_dinov3", 32, 2, qkv_bias=False, registers=0,
                   layerscale=False),
}


def meta_state(f: Family, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Meta-layout state dict with non-trivial values everywhere a wrong mapping would show."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rnd(d, scale=0.3), f"{prefix}.bias": rnd(d, scale=0.2)}

    d, hd = f.dim, f.dim // f.heads
    state = {"cls_token": rnd(1, 1, d), "mask_token": rnd(1, d),
             "patch_embed.proj.weight": rnd(d, 3, f.patch, f.patch, scale=0.05),
             "patch_embed.proj.bias": rnd(d, scale=0.2)}
    if f.registers:
        state["storage_tokens"] = rnd(1, f.registers, d)
    # Meta's RopePositionEmbedding._init_weights with `base`
    state["rope_embed.periods"] = (f.rope_base ** (2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2))
                                   ).to(f.periods_dtype)
    for i in range(f.depth):
        b = f"blocks.{i}."
        state |= norm(b + "norm1") | norm(b + "norm2")
        state[b + "attn.qkv.weight"] = rnd(3 * d, d, scale=d**-0.5)
        if f.qkv_bias:
            bias = rnd(3 * d, scale=0.3)
            if not f.raw_k_bias:
                bias[d:2 * d] = 0
            state[b + "attn.qkv.bias"] = bias
            if f.mask_k_bias:
                mask = torch.ones(3 * d)
                mask[d:2 * d] = 0
                state[b + "attn.qkv.bias_mask"] = mask
        state[b + "attn.proj.weight"] = rnd(d, d, scale=d**-0.5)
        state[b + "attn.proj.bias"] = rnd(d, scale=0.1)
        if f.layerscale:
            state[b + "ls1.gamma"] = 0.1 + 0.9 * torch.rand(d, generator=gen)
            state[b + "ls2.gamma"] = 0.1 + 0.9 * torch.rand(d, generator=gen)
        h = f.hidden
        if f.swiglu_align:
            for name, shape in (("w1", (h, d)), ("w2", (h, d)), ("w3", (d, h))):
                state[f"{b}mlp.{name}.weight"] = rnd(*shape, scale=shape[1] ** -0.5)
                state[f"{b}mlp.{name}.bias"] = rnd(shape[0], scale=0.1)
        else:
            state[b + "mlp.fc1.weight"] = rnd(h, d, scale=d**-0.5)
            state[b + "mlp.fc1.bias"] = rnd(h, scale=0.1)
            state[b + "mlp.fc2.weight"] = rnd(d, h, scale=h**-0.5)
            state[b + "mlp.fc2.bias"] = rnd(d, scale=0.1)
    state |= norm("norm")
    if f.local_cls_norm:
        state |= norm("local_cls_norm")
    return state


def timm_model(f: Family, meta: dict[str, torch.Tensor]) -> torch.nn.Module:
    """timm's DINOv3 with the tiny dimensions, loaded through timm's own Meta key filter."""
    extra = {"swiglu_align_to": f.swiglu_align} if f.swiglu_align else {}
    # The registered entry point itself: timm.create_model drops None kwargs (init_values=None: no LayerScale).
    model = getattr(timm.models.eva, f.timm_name)(
        pretrained=False, num_classes=0, embed_dim=f.dim, depth=f.depth, num_heads=f.heads,
        mlp_ratio=f.hidden / f.dim, patch_size=f.patch, num_reg_tokens=f.registers, rope_temperature=f.rope_base,
        init_values=1e-5 if f.layerscale else None, **extra)
    if f.registers:
        filtered = checkpoint_filter_fn(meta, model)
    else:  # timm recognises DINOv3 files by `storage_tokens`; give it an empty one and drop it again
        filtered = checkpoint_filter_fn(meta | {"storage_tokens": torch.zeros(1, 0, f.dim)}, model)
        assert filtered.pop("reg_token").numel() == 0
    model.load_state_dict(filtered, strict=True)
    return model.eval()


def write_and_load_hf(converted, directory: Path) -> DINOv3ViTModel:
    """Write config.json + model.safetensors and read them with plain from_pretrained."""
    converted.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in converted.state_dict.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    model, info = DINOv3ViTModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))


def assert_same_tokens(hf: DINOv3ViTModel, reference: torch.nn.Module, registers: int) -> None:
    x = pixels()
    with torch.no_grad():
        ours = hf(pixel_values=x).last_hidden_state
        theirs = reference.forward_features(x)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours[:, 0], theirs[:, 0], atol=ATOL, rtol=0, msg="CLS token")
    torch.testing.assert_close(ours[:, 1:1 + registers], theirs[:, 1:1 + registers], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[:, 1 + registers:], theirs[:, 1 + registers:], atol=ATOL, rtol=0,
                               msg="patch tokens")


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_converted_checkpoint_matches_timm(family: str, tmp_path: Path) -> None:
    f = FAMILIES[family]
    path = tmp_path / f.file_name
    torch.save(meta_state(f), path)
    meta = torch.load(path, map_location="cpu", weights_only=True)
    assert is_meta_dinov3(meta)
    reference = timm_model(f, meta)

    converted = convert_meta_dinov3(meta, source=str(path))
    hf = write_and_load_hf(converted, tmp_path / "hf")
    assert_same_tokens(hf, reference, f.registers)

    cfg = converted.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size) == (
        f.dim, f.heads, f.depth, f.hidden)
    assert (cfg.patch_size, cfg.num_register_tokens, cfg.rope_theta) == (f.patch, f.registers, f.rope_base)
    assert cfg.use_gated_mlp == bool(f.swiglu_align)
    assert cfg.hidden_act == ("silu" if f.swiglu_align else "gelu")
    assert (cfg.query_bias, cfg.value_bias, cfg.key_bias) == (f.qkv_bias, f.qkv_bias, False)
    assert cfg.layer_norm_eps == 1e-5
    assert cfg.pos_embed_shift is None and cfg.pos_embed_jitter is None and cfg.pos_embed_rescale is None
    assert converted.arch == "dinov3" and converted.source_format == "meta-dinov3"
    expected_pretraining = PRETRAINING_SAT493M if "sat493m" in f.file_name else (
        PRETRAINING_LVD1689M if "lvd1689m" in f.file_name else None)
    assert converted.pretraining == expected_pretraining

    out = converted.state_dict
    torch.testing.assert_close(out["embeddings.mask_token"], meta["mask_token"].reshape(1, 1, -1), atol=0, rtol=0)
    assert out["embeddings.mask_token"].shape == hf.embeddings.mask_token.shape == (1, 1, f.dim)
    assert "rope_embed.periods" in converted.dropped
    assert ("local_cls_norm.weight" in converted.dropped) == f.local_cls_norm
    assert not any(k.startswith("norm.") for k in converted.dropped)
    assert ("blocks.*.attn.qkv.bias_mask" in converted.dropped) == (f.qkv_bias and f.mask_k_bias)
    if f.raw_k_bias:
        assert "masked to zero" in converted.dropped["blocks.*.attn.qkv.bias[K third]"]
    if f.local_cls_norm:  # so that taking local_cls_norm for the final norm changes the tokens above
        assert not torch.equal(meta["local_cls_norm.weight"], meta["norm.weight"])
    torch.testing.assert_close(hf.norm.weight, meta["norm.weight"], atol=0, rtol=0)


def test_unmasked_nonzero_key_bias_is_kept_not_dropped(tmp_path: Path) -> None:
    """A K bias Meta's forward really adds (no bias_mask) becomes HF's key_bias, matching timm given it."""
    f = replace(FAMILIES["vits16"], mask_k_bias=False, raw_k_bias=True)
    meta = meta_state(f, seed=3)
    reference = timm_model(f, meta)
    for i, block in enumerate(reference.blocks):  # timm's filter skips K; its (non-persistent) k_bias takes it
        block.attn.k_bias.copy_(meta[f"blocks.{i}.attn.qkv.bias"][f.dim:2 * f.dim])

    converted = convert_meta_dinov3(meta)
    assert converted.config.key_bias is True
    assert not any("qkv.bias" in k for k in converted.dropped)
    assert_same_tokens(write_and_load_hf(converted, tmp_path), reference, f.registers)


def test_masked_key_bias_is_zero_in_the_output() -> None:
    f = replace(FAMILIES["vits16"], raw_k_bias=True)
    meta = meta_state(f)
    converted = convert_meta_dinov3(meta)
    assert converted.config.key_bias is False
    assert not any(k.endswith("k_proj.bias") for k in converted.state_dict)
    q = converted.state_dict["layer.1.attention.q_proj.bias"]
    torch.testing.assert_close(q, meta["blocks.1.attn.qkv.bias"][: f.dim], atol=0, rtol=0)


def test_uninitialised_bias_mask_is_refused() -> None:
    meta = meta_state(FAMILIES["vits16"])
    meta["blocks.1.attn.qkv.bias_mask"] = torch.full_like(meta["blocks.1.attn.qkv.bias_mask"], math.nan)
    with pytest.raises(DataError, match=r"blocks\.1\.attn\.qkv\.bias_mask"):
        convert_meta_dinov3(meta)


@pytest.mark.parametrize("key", ["blocks.1.mlp.fc2.weight", "blocks.0.ls2.gamma", "blocks.1.attn.qkv.bias_mask",
                                 "norm.bias", "rope_embed.periods"])
def test_missing_tensor_is_named(key: str) -> None:
    meta = meta_state(FAMILIES["vits16"])
    del meta[key]
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        convert_meta_dinov3(meta, source="dinov3_vits16.pth")


def test_missing_block_is_named() -> None:
    meta = {k: v for k, v in meta_state(FAMILIES["vitl16"]).items() if not k.startswith("blocks.1.")}
    with pytest.raises(DataError, match=r"blocks\.1\b"):
        convert_meta_dinov3(meta)


def test_unknown_and_mismatched_tensors_are_named() -> None:
    meta = meta_state(FAMILIES["vits16"])
    with pytest.raises(DataError, match=r"head\.weight"):
        convert_meta_dinov3(meta | {"head.weight": torch.zeros(3, 64)})
    with pytest.raises(DataError, match=r"cls_norm"):
        convert_meta_dinov3(meta | {"cls_norm.weight": torch.ones(64), "cls_norm.bias": torch.zeros(64)})
    wider = dict(meta, **{"blocks.1.mlp.fc1.weight": torch.zeros(128, 64)})
    with pytest.raises(DataError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(128, 64\)"):
        convert_meta_dinov3(wider)
    mixed = meta | {"blocks.1.mlp.w1.weight": torch.zeros(256, 64)}
    with pytest.raises(DataError, match=r"SwiGLU"):
        convert_meta_dinov3(mixed)
    with pytest.raises(DataError, match=r"mask_token"):
        convert_meta_dinov3(dict(meta, mask_token=torch.zeros(2, 64)))


def test_rope_periods_that_no_base_explains_are_refused() -> None:
    meta = meta_state(FAMILIES["vitb16"])  # head_dim 32: 8 periods, stored in bfloat16
    periods = meta["rope_embed.periods"].float()
    periods[3] *= 1.05
    with pytest.raises(DataError, match=r"rope_embed\.periods"):
        convert_meta_dinov3(dict(meta, **{"rope_embed.periods": periods}))
    # min/max-period parametrisation that is not base ** (4 i / head_dim): periods[0] != 1
    shifted = 2.0 * meta["rope_embed.periods"].float()
    with pytest.raises(DataError, match=r"rope_embed\.periods"):
        convert_meta_dinov3(dict(meta, **{"rope_embed.periods": shifted}))


def test_detection() -> None:
    meta = meta_state(FAMILIES["vit7b16"])
    assert is_meta_dinov3(meta)
    prefixed = {f"teacher.backbone.{k}": v for k, v in meta.items()}
    assert not is_meta_dinov3(prefixed)
    with pytest.raises(DataError, match=r"teacher\.backbone\."):
        convert_meta_dinov3(prefixed)
    hf = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64)).state_dict()
    assert not is_meta_dinov3(hf)
    dinov2 = {k: v for k, v in meta.items() if k not in ("rope_embed.periods", "storage_tokens")}
    dinov2["pos_embed"] = torch.zeros(1, 197, 40)
    assert not is_meta_dinov3(dinov2)


@pytest.mark.parametrize(("name", "expected"), [
    ("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", PRETRAINING_LVD1689M),
    ("dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth", PRETRAINING_LVD1689M),
    ("dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", PRETRAINING_SAT493M),
    ("dinov3_vit7b16_pretrain_sat493m-a6675841.pth", PRETRAINING_SAT493M),
    ("/weights/sat493m/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", PRETRAINING_LVD1689M),
    ("facebook/dinov3-vitl16-pretrain-sat493m", PRETRAINING_SAT493M),
    ("DINOv3_ViTL16_SAT493M.pth", PRETRAINING_SAT493M),
    ("backbone.pth", None),
    ("sat493m_vs_lvd1689m.pth", None),
])
def test_pretraining_from_name(name: str, expected: str | None) -> None:
    assert pretraining_from_name(name) == expected


def test_explicit_pretraining_is_checked() -> None:
    meta = meta_state(FAMILIES["bare"])
    assert convert_meta_dinov3(meta, pretraining=PRETRAINING_SAT493M).pretraining == PRETRAINING_SAT493M
    with pytest.raises(ConfigError, match="imagenet"):
        convert_meta_dinov3(meta, pretraining="imagenet")
    with pytest.raises(ConfigError, match="sat493m"):
        convert_meta_dinov3(meta, pretraining=PRETRAINING_LVD1689M,
                            source="dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth")


# Meta's hub arguments (embed_dim, depth, heads, ffn_ratio, SwiGLU alignment, qkv_bias) against the sizes
# transformers' own DINOv3 conversion publishes (hidden, heads, layers, intermediate, gated).
PUBLISHED = {
    "vits16": ((384, 12, 6, 4, 0, True), (384, 6, 12, 1536, False)),
    "vits16plus": ((384, 12, 6, 6, 8, True), (384, 6, 12, 1536, True)),
    "vitb16": ((768, 12, 12, 4, 0, True), (768, 12, 12, 3072, False)),
    "vitl16": ((1024, 24, 16, 4, 0, True), (1024, 16, 24, 4096, False)),
    "vith16plus": ((1280, 32, 20, 6, 8, True), (1280, 20, 32, 5120, True)),
    "vit7b16": ((4096, 40, 32, 3, 64, False), (4096, 32, 40, 8192, True)),
}


@pytest.mark.parametrize("size", list(PUBLISHED), ids=list(PUBLISHED))
def test_published_sizes_give_the_published_configs(size: str) -> None:
    """Full-size shapes on the meta device (no memory): the config and size name read from them."""
    (dim, depth, heads, ratio, align, qkv_bias), (hidden, n_heads, layers, inter, gated) = PUBLISHED[size]
    f = Family(f"dinov3_{size}_pretrain_lvd1689m.pth", "", dim, heads, depth=depth, ffn_ratio=ratio,
               swiglu_align=align, qkv_bias=qkv_bias, local_cls_norm=size == "vit7b16",
               periods_dtype=torch.bfloat16)
    with torch.device("meta"):
        shapes = meta_state(replace(f, depth=1))
    real = {"rope_embed.periods", "blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.bias_mask"}
    meta = {k: v for k, v in shapes.items() if k not in real and not k.startswith("blocks.")}
    d = dim
    periods = (100.0 ** (2 * torch.arange(d // heads // 4) / (d // heads // 2))).to(torch.bfloat16)
    meta["rope_embed.periods"] = periods
    for i in range(depth):
        for k, v in shapes.items():
            if k.startswith("blocks.0.") and k not in real:
                meta[f"blocks.{i}." + k.removeprefix("blocks.0.")] = v
        if qkv_bias:
            meta[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * d)
            meta[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])

    converted = convert_meta_dinov3(meta)
    cfg = converted.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.intermediate_size,
            cfg.use_gated_mlp) == (hidden, n_heads, layers, inter, gated)
    assert (cfg.patch_size, cfg.num_register_tokens, cfg.rope_theta, cfg.key_bias) == (16, 4, 100.0, False)
    assert (cfg.query_bias, cfg.value_bias, cfg.proj_bias, cfg.mlp_bias) == (qkv_bias, qkv_bias, True, True)
    assert dinov3_size_name(cfg) == size
    assert converted.state_dict["layer.0.attention.q_proj.weight"].shape == (d, d)


def test_size_name_of_other_configs() -> None:
    assert dinov3_size_name(DINOv3ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=256)) is None
    vits = DINOv3ViTConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=12, intermediate_size=1536)
    assert dinov3_size_name(vits) == "vits16"
    assert dinov3_size_name(object()) is None
