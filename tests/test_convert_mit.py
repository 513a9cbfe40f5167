"""MiT / SegFormer conversion (NVlabs, mmsegmentation, HF) and the safe checkpoint loader.

The reference is mmsegmentation 1.2.2's own ``MixVisionTransformer``: its stage outputs on random
weights must equal those of a plain ``transformers.SegformerModel`` loaded from the converted,
saved directory. NVlabs checkpoints are derived from the same weights by NVlabs' key names.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import mit_reference
import numpy as np
import pytest
import torch
from mit_reference import (
    NUMPY1_PICKLE,
    TINY,
    TINY_HIDDEN,
    NVLabsMLPHead,
    build_reference,
    mmseg_segmentor,
    mmseg_to_nvlabs,
    nvlabs_head_logits,
    randomize_,
    write_mmengine_training_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import SegformerForImageClassification, SegformerForSemanticSegmentation, SegformerModel

from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.models.convert.common import PRETRAINING_IMAGENET, ConvertedWeights
from mapsage_ds.models.convert.mit import convert_mit, detect_mit_format
from mapsage_ds.models.convert.safe_pickle import HistoryBuffer, load_checkpoint

HEADS = TINY["num_heads"]


def require_mmseg() -> type[torch.nn.Module]:
    """mmseg's MiT class; the tests that need the reference skip, loudly, where it cannot be imported."""
    try:
        return mit_reference.mmseg_mit_class()
    except ImportError as error:  # pragma: no cover - depends on the test extra being installed
        pytest.skip(f"mmsegmentation 1.2.2's MiT cannot be imported (test extra missing?): {error}")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    # Not square, so a height/width mix-up shows.
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(pixels):
    """mmseg MiT with mmseg's own LayerNorm eps (1e-6), and its four stage outputs."""
    require_mmseg()
    model = build_reference(eps=1e-6)
    with torch.no_grad():
        return model, model(pixels)


@pytest.fixture(scope="module")
def reference_hf_eps(pixels):
    """The same weights with LayerNorm eps 1e-5 (what HF SegFormer hard-codes), and its outputs."""
    require_mmseg()
    model = build_reference(eps=1e-5)
    with torch.no_grad():
        return model, model(pixels)


def save_hf(converted: ConvertedWeights, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    converted.config.save_pretrained(directory)
    tensors = {k: v.contiguous() for k, v in converted.state_dict.items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def hf_features(directory: Path, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model, info = SegformerModel.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(pixels, output_hidden_states=True).hidden_states


def assert_features_close(got, want, atol: float) -> None:
    assert len(got) == len(want) == 4
    for stage, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, (stage, a.shape, b.shape)
        diff = (a - b).abs().max().item()
        assert diff < atol, f"stage {stage}: max |HF - mmseg| = {diff:.3g}"


def assert_tiny_config(converted: ConvertedWeights, fmt: str) -> None:
    cfg = converted.config
    assert converted.arch == "segformer" and converted.source_format == fmt
    assert converted.pretraining == PRETRAINING_IMAGENET
    assert cfg.num_encoder_blocks == 4 and cfg.num_channels == 3
    assert list(cfg.depths) == TINY["num_layers"]
    assert list(cfg.hidden_sizes) == TINY_HIDDEN
    assert list(cfg.sr_ratios) == TINY["sr_ratios"]
    assert list(cfg.patch_sizes) == [7, 3, 3, 3] and list(cfg.strides) == [4, 2, 2, 2]
    assert list(cfg.mlp_ratios) == [4, 4, 4, 4]
    assert list(cfg.num_attention_heads) == HEADS


def unwrap(loaded: object) -> dict[str, torch.Tensor]:
    return loaded["state_dict"] if "state_dict" in loaded else loaded


# --- mmsegmentation checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bare", "segmentor", "mmengine_training"])
def test_mmseg_checkpoint_matches_mmseg_forward(kind, reference, pixels, tmp_path):
    model, want = reference
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"{kind}.pth"
    if kind == "mmengine_training":
        pytest.importorskip("mmengine")
    if kind == "bare":
        torch.save(backbone, path)
    else:
        segmentor = mmseg_segmentor(model, channels=32, num_classes=7)
        if kind == "segmentor":
            torch.save({"meta": {"CLASSES": ("a", "b")}, "state_dict": segmentor.state_dict()}, path)
        else:
            write_mmengine_training_checkpoint(path, segmentor)

    state = unwrap(load_checkpoint(path))
    assert detect_mit_format(state) == "mmseg"
    converted = convert_mit(state, num_attention_heads=HEADS, source=str(path))
    assert_tiny_config(converted, "mmseg")
    assert all(k.startswith("segformer.encoder.") for k in converted.state_dict)
    if kind != "bare":
        assert "decode_head.*" in converted.dropped and "SegformerHead" in converted.dropped["decode_head.*"]
    assert_features_close(hf_features(save_hf(converted, tmp_path / "hf"), pixels), want, atol=1e-4)


def test_layernorm_eps_is_the_only_difference(reference_hf_eps, pixels, tmp_path):
    # With the reference's eps set to HF's 1e-5, what is left is float rounding.
    model, want = reference_hf_eps
    converted = convert_mit(model.state_dict(), num_attention_heads=HEADS)
    assert_features_close(hf_features(save_hf(converted, tmp_path / "hf"), pixels), want, atol=1e-5)


def test_wrong_mapping_would_be_caught(reference_hf_eps, pixels, tmp_path):
    # Negative control: swapping key and value of one block moves the output far beyond the tolerance.
    model, want = reference_hf_eps
    converted = convert_mit(model.state_dict(), num_attention_heads=HEADS)
    block = "segformer.encoder.block.3.0.attention.self."
    for kind in ("weight", "bias"):
        sd = converted.state_dict
        sd[f"{block}key.{kind}"], sd[f"{block}value.{kind}"] = sd[f"{block}value.{kind}"], sd[f"{block}key.{kind}"]
    got = hf_features(save_hf(converted, tmp_path / "hf"), pixels)
    assert (got[3] - want[3]).abs().max() > 1e-2


def test_b0_shaped_checkpoint_needs_no_head_override(pixels, tmp_path):
    # mmseg's mit_b0 layout (widths 32/64/160/256, heads 1/2/5/8): the published defaults apply.
    mit_cls = require_mmseg()
    model = randomize_(mit_cls(embed_dims=32, num_heads=[1, 2, 5, 8], num_layers=[1, 1, 1, 1]), seed=3).eval()
    with torch.no_grad():
        want = model(pixels)
    converted = convert_mit(model.state_dict())
    assert list(converted.config.num_attention_heads) == [1, 2, 5, 8]
    assert list(converted.config.hidden_sizes) == [32, 64, 160, 256]
    assert_features_close(hf_features(save_hf(converted, tmp_path / "hf"), pixels), want, atol=1e-4)


# --- NVlabs checkpoints ---------------------------------------------------------------------------


def test_nvlabs_imagenet_backbone_matches_mmseg_forward(reference, pixels, tmp_path):
    model, want = reference
    state = mmseg_to_nvlabs(model.state_dict())
    gen = torch.Generator().manual_seed(9)
    state["head.weight"], state["head.bias"] = torch.randn(1000, 128, generator=gen), torch.randn(1000, generator=gen)
    path = tmp_path / "mit_tiny.pth"
    torch.save(state, path)

    loaded = load_checkpoint(path)
    assert detect_mit_format(loaded) == "nvlabs"
    converted = convert_mit(loaded, num_attention_heads=HEADS, source=str(path))
    assert_tiny_config(converted, "nvlabs")
    assert "ImageNet" in converted.dropped["head.*"]
    assert not any("head" in k for k in converted.state_dict)
    assert_features_close(hf_features(save_hf(converted, tmp_path / "hf"), pixels), want, atol=1e-4)


def nvlabs_full_checkpoint(model, num_batches_tracked: bool = True) -> tuple[dict, dict]:
    head = randomize_(NVLabsMLPHead(TINY_HIDDEN, embed=24, num_classes=5), seed=11).state_dict()
    if not num_batches_tracked:
        del head["linear_fuse.bn.num_batches_tracked"]
    state = {f"backbone.{k}": v for k, v in mmseg_to_nvlabs(model.state_dict()).items()}
    state.update({f"decode_head.{k}": v for k, v in head.items()})
    return state, head


def test_nvlabs_segformer_decode_head_matches_hand_computed_head(reference_hf_eps, pixels, tmp_path):
    model, features = reference_hf_eps
    state, head = nvlabs_full_checkpoint(model)
    path = tmp_path / "segformer.b0.512x512.ade.160k.pth"
    torch.save({"meta": {"CLASSES": tuple("abcde")}, "state_dict": state}, path)

    converted = convert_mit(unwrap(load_checkpoint(path)), num_attention_heads=HEADS, source=str(path))
    assert converted.config.decoder_hidden_size == 24 and converted.config.num_labels == 5
    assert set(converted.dropped) == {"decode_head.conv_seg.*"}
    counter = converted.state_dict["decode_head.batch_norm.num_batches_tracked"]
    assert counter.dtype == torch.long and counter.item() == 17
    directory = save_hf(converted, tmp_path / "hf")
    segmenter, info = SegformerForSemanticSegmentation.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = segmenter.eval()(pixels, output_hidden_states=True)
    assert_features_close(out.hidden_states, features, atol=1e-5)
    want = nvlabs_head_logits(head, list(features))
    assert out.logits.shape == want.shape == (2, 5, 16, 24)
    assert (out.logits - want).abs().max() < 1e-4


def test_nvlabs_head_without_batch_counter_gets_zero(reference_hf_eps):
    state, _ = nvlabs_full_checkpoint(reference_hf_eps[0], num_batches_tracked=False)
    converted = convert_mit(state, num_attention_heads=HEADS)
    counter = converted.state_dict["decode_head.batch_norm.num_batches_tracked"]
    assert counter.dtype == torch.long and counter.item() == 0


# --- Hugging Face checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_config(reference_hf_eps):
    config = convert_mit(reference_hf_eps[0].state_dict(), num_attention_heads=HEADS).config
    config.decoder_hidden_size, config.num_labels = 24, 6
    return config


def test_hf_on_disk_and_in_memory_names_pass_through(hf_config, tmp_path):
    model = randomize_(SegformerForSemanticSegmentation(hf_config), seed=4)
    model.save_pretrained(tmp_path / "seg")
    on_disk = load_file(str(tmp_path / "seg" / "model.safetensors"))
    in_memory = model.state_dict()
    assert any(k.startswith("segformer.stages.") for k in in_memory)  # transformers 5 renames in memory
    for state in (on_disk, in_memory):
        assert detect_mit_format(state) == "hf"
        converted = convert_mit(state, num_attention_heads=HEADS)
        assert converted.source_format == "hf" and not converted.dropped
        assert set(converted.state_dict) == set(on_disk)
        for key, value in on_disk.items():
            assert torch.equal(converted.state_dict[key], value), key
        cfg = converted.config
        assert (cfg.decoder_hidden_size, cfg.num_labels) == (24, 6)
        assert list(cfg.hidden_sizes) == TINY_HIDDEN and list(cfg.depths) == TINY["num_layers"]


def test_hf_bare_encoder_and_classifier(hf_config, tmp_path):
    SegformerModel(hf_config).save_pretrained(tmp_path / "bare")
    bare = load_file(str(tmp_path / "bare" / "model.safetensors"))
    assert all(k.startswith("encoder.") for k in bare)
    converted = convert_mit(bare, num_attention_heads=HEADS)
    assert set(converted.state_dict) == {f"segformer.{k}" for k in bare}

    SegformerForImageClassification(hf_config).save_pretrained(tmp_path / "cls")
    classifier = load_file(str(tmp_path / "cls" / "model.safetensors"))
    converted = convert_mit(classifier, num_attention_heads=HEADS)
    assert "classifier.*" in converted.dropped
    assert all(k.startswith("segformer.encoder.") for k in converted.state_dict)


# --- format detection and bad input ---------------------------------------------------------------


def test_detect_mit_format_prefixes(reference_hf_eps):
    mmseg = reference_hf_eps[0].state_dict()
    nvlabs = mmseg_to_nvlabs(mmseg)
    for prefix in ("", "backbone.", "module.", "module.backbone."):
        assert detect_mit_format({prefix + k: v for k, v in mmseg.items()}) == "mmseg"
        assert detect_mit_format({prefix + k: v for k, v in nvlabs.items()}) == "nvlabs"
    assert detect_mit_format({"module.segformer.encoder.block.0.0.layer_norm_1.weight": torch.ones(2)}) == "hf"
    assert detect_mit_format({"embeddings.patch_embeddings.weight": torch.ones(2), "layer.0.norm1.weight":
                              torch.ones(2)}) is None
    assert detect_mit_format({}) is None


def test_wrapped_prefixes_convert_identically(reference_hf_eps):
    mmseg = reference_hf_eps[0].state_dict()
    plain = convert_mit(mmseg, num_attention_heads=HEADS).state_dict
    wrapped = convert_mit({f"module.backbone.{k}": v for k, v in mmseg.items()}, num_attention_heads=HEADS).state_dict
    assert plain.keys() == wrapped.keys() and all(torch.equal(plain[k], wrapped[k]) for k in plain)


def test_head_count_validation(reference_hf_eps):
    state = reference_hf_eps[0].state_dict()
    with pytest.raises(ConfigError, match=r"default heads \[1, 2, 5, 8\].*stage 2: 5 heads for width 64"):
        convert_mit(state)  # the tiny widths 16/32/64/128 are not MiT's
    with pytest.raises(ConfigError, match=r"num_attention_heads.*stage 2: 3 heads for width 64"):
        convert_mit(state, num_attention_heads=[1, 2, 3, 8])
    with pytest.raises(ConfigError, match="one per stage, 4 stages"):
        convert_mit(state, num_attention_heads=[1, 2, 4])
    with pytest.raises(ConfigError, match="0 heads"):
        convert_mit(state, num_attention_heads=[1, 2, 0, 8])
    assert list(convert_mit(state, num_attention_heads=[16, 2, 4, 8]).config.num_attention_heads) == [16, 2, 4, 8]


def test_unrecognised_and_inconsistent_tensors(reference_hf_eps):
    state = dict(reference_hf_eps[0].state_dict())
    with pytest.raises(DataError, match=r"ckpt\.pth: unrecognised keys.*layers\.0\.1\.0\.attn\.gamma"):
        convert_mit({**state, "layers.0.1.0.attn.gamma": torch.ones(16)}, num_attention_heads=HEADS,
                    source="ckpt.pth")
    bad = dict(state)
    bad["layers.1.1.1.attn.attn.in_proj_weight"] = torch.zeros(97, 32)
    with pytest.raises(DataError, match=r"layers\.1\.1\.1\.attn\.attn\.in_proj_weight.*3 equal parts"):
        convert_mit(bad, num_attention_heads=HEADS)
    bad = dict(state)
    bad["layers.1.1.1.attn.attn.in_proj_weight"] = torch.zeros(99, 32)
    with pytest.raises(DataError, match=r"shape-mismatched layers\.1\.1\.1\.attn\.attn\.in_proj_weight"):
        convert_mit(bad, num_attention_heads=HEADS)
    bad = {k: v for k, v in state.items() if k != "layers.2.1.0.norm2.weight"}
    with pytest.raises(DataError, match=r"missing segformer\.encoder\.block\.2\.0\.layer_norm_2\.weight"):
        convert_mit(bad, num_attention_heads=HEADS)
    bad = {k: v for k, v in state.items() if not k.startswith("layers.1.1.0.")}
    with pytest.raises(DataError, match=r"stage 1 has blocks \[1\]"):
        convert_mit(bad, num_attention_heads=HEADS)
    with pytest.raises(DataError, match="not a MiT/SegFormer checkpoint"):
        convert_mit({"conv.weight": torch.ones(1)})


# --- the safe loader ------------------------------------------------------------------------------


def test_mmengine_training_checkpoint_needs_and_gets_the_allow_list(reference_hf_eps, tmp_path):
    pytest.importorskip("mmengine")
    model = reference_hf_eps[0]
    path = tmp_path / "iter_3.pth"
    write_mmengine_training_checkpoint(path, mmseg_segmentor(model, channels=32, num_classes=7))
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert {"mmengine.logging.history_buffer.HistoryBuffer", "builtins.getattr", "numpy.ndarray"} <= unsafe
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)

    checkpoint = load_checkpoint(path)
    assert set(checkpoint) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    loss = checkpoint["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(loss, HistoryBuffer) and loss.log_history.shape == (3,) and loss.mean() > 0
    assert checkpoint["message_hub"]["runtime_info"]["iter"] == 3
    first_moment = checkpoint["optimizer"]["state"][0]["exp_avg"]
    assert first_moment.shape == model.state_dict()["layers.0.0.projection.weight"].shape
    assert first_moment.abs().sum() > 0
    assert checkpoint["param_schedulers"][0]["last_step"] == 3
    assert torch.equal(checkpoint["state_dict"]["backbone.layers.3.2.weight"], model.state_dict()["layers.3.2.weight"])


class Sneaky:
    """A class outside the allow-list."""

    def __init__(self) -> None:
        self.payload = 1


class OpensAFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


class ReachesThroughGetattr:
    def __reduce__(self):
        return getattr, (np.ndarray, "tofile")


@pytest.mark.parametrize("payload, offending", [
    (argparse.Namespace(lr=0.1), "argparse.Namespace"),
    (Sneaky(), "Sneaky"),
    ("open", "io.open"),
    (ReachesThroughGetattr(), "builtins.getattr(ndarray, 'tofile')"),
])
def test_other_globals_are_refused_with_the_resave_command(payload, offending, tmp_path):
    marker = tmp_path / "was_executed"
    if payload == "open":
        payload = OpensAFile(marker)
    path = tmp_path / "untrusted.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": payload}, path)
    with pytest.raises(DataError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and offending in message
    assert "weights_only=False" in message and "['state_dict']" in message and "untrusted_state_dict.pth" in message
    assert "trust" in message
    assert not marker.exists()


def test_numpy1_module_names_load(tmp_path):
    path = tmp_path / "numpy1.pth"
    values = {"state_dict": {"w": torch.arange(4.0)},
              "meta": {"array": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float64(2.5),
                       "count": np.int64(7), "dtype": np.dtype("int16")}}
    torch.save(values, path, pickle_module=NUMPY1_PICKLE)
    with zipfile.ZipFile(path) as archive:
        raw = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"numpy.core.multiarray" in raw and b"numpy._core" not in raw

    loaded = load_checkpoint(path)
    meta = loaded["meta"]
    assert np.array_equal(meta["array"], values["meta"]["array"]) and meta["array"].dtype == np.float32
    assert meta["scalar"] == 2.5 and isinstance(meta["scalar"], np.float64)
    assert meta["count"] == 7 and meta["dtype"] == np.dtype("int16")
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))


def test_plain_state_dict_and_bad_files(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))

    with pytest.raises(MissingFileError, match="absent.pth"):
        load_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(DataError, match="directory"):
        load_checkpoint(tmp_path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.pth: not a readable torch checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02this is not a checkpoint" * 8)
    with pytest.raises(DataError, match="garbage.pth: not a readable torch checkpoint"):
        load_checkpoint(garbage)
