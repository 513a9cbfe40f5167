"""Tests of local weight loading (every supported format, key reports, unsafe pickles) and SegFormer sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import SegformerForSemanticSegmentation

from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.errors import ConfigError, DataError, MissingFileError
from mapsage_ds.models import load_matching_weights, read_state_dict
from mapsage_ds.models.segformer import SEGFORMER_SIZES, build_segformer, segformer_config

CLASSES = list(LOVEDA_CLASSES)
EARTHVQA_CLASSES = [*CLASSES, "playground"]  # 8 classes, like EarthVQA
CLASSIFIER = ("decode_head.classifier.weight", "decode_head.classifier.bias")


class NotATensor:
    """Pickled by reference to this module: only an unrestricted unpickler can rebuild it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _model(seed: int, classes: list[str] = CLASSES) -> SegformerForSemanticSegmentation:
    torch.manual_seed(seed)
    model = build_segformer("test", classes)
    # HF zero-initialises biases and sets norms to (1, 0): randomise every float tensor so that
    # two models share no value by accident and an uncopied tensor is always noticed.
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
                if key.endswith("running_var"):  # a variance must stay positive
                    tensor.abs_().add_(0.1)
    return model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def source() -> SegformerForSemanticSegmentation:
    return _model(seed=1)


def _assert_loaded_exactly(report, fresh: nn.Module, source: nn.Module) -> None:
    keys = set(source.state_dict())
    assert sorted(report.matched) == sorted(keys) and len(report.matched) == len(keys)
    assert (report.missing, report.unexpected, report.shape_mismatched) == ([], [], [])
    for key, tensor in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def _save(kind: str, model: nn.Module, folder: Path) -> Path:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if kind == "hf_dir":
        model.save_pretrained(folder / "hf")
        return folder / "hf"
    if kind == "hf_dir_sharded":
        model.save_pretrained(folder / "sharded", max_shard_size="20KB")
        return folder / "sharded"
    if kind == "hf_dir_bin":
        (folder / "bin").mkdir()
        torch.save(state, folder / "bin" / "pytorch_model.bin")
        return folder / "bin"
    if kind == "safetensors":
        save_file(state, folder / "weights.safetensors")
        return folder / "weights.safetensors"
    if kind == "pth":
        torch.save(state, folder / "weights.pth")
        return folder / "weights.pth"
    if kind == "pth_wrapped":
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, folder / "ddp.pth")
        return folder / "ddp.pth"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["hf_dir", "hf_dir_sharded", "hf_dir_bin", "safetensors", "pth", "pth_wrapped"])
def test_every_format_copies_the_weights_exactly(kind: str, source: nn.Module, tmp_path: Path) -> None:
    path = _save(kind, source, tmp_path)
    fresh = _model(seed=2)
    differing = [k for k, v in source.state_dict().items() if v.is_floating_point()
                 and not torch.equal(v, fresh.state_dict()[k])]
    assert len(differing) == sum(v.is_floating_point() for v in source.state_dict().values())

    report = load_matching_weights(fresh, path)

    _assert_loaded_exactly(report, fresh, source)
    assert report.source == str(path)
    assert report.summary().startswith(f"weights from {path}: {len(report.matched)} matched, 0 missing")


def test_sharded_directory_really_has_several_shards(source: nn.Module, tmp_path: Path) -> None:
    path = _save("hf_dir_sharded", source, tmp_path)
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    assert len(read_state_dict(path)) == len(source.state_dict())


def test_save_pretrained_names_are_renamed_to_the_model_names(source: nn.Module, tmp_path: Path) -> None:
    # save_pretrained may write legacy names (transformers 5 does); loading must still match all.
    path = _save("hf_dir", source, tmp_path)
    saved = load_file(str(path / "model.safetensors"))
    assert len(saved) == len(source.state_dict())
    fresh = _model(seed=3)
    _assert_loaded_exactly(load_matching_weights(fresh, path), fresh, source)


def test_loaded_model_computes_the_same_output(source: nn.Module, tmp_path: Path) -> None:
    fresh = _model(seed=4)
    load_matching_weights(fresh, _save("safetensors", source, tmp_path))
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    source.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=image).logits, source(pixel_values=image).logits,
                                   rtol=0, atol=0)


def test_other_number_of_classes_is_shape_mismatched(tmp_path: Path) -> None:
    earthvqa = _model(seed=5, classes=EARTHVQA_CLASSES)
    path = _save("safetensors", earthvqa, tmp_path)
    fresh = _model(seed=6)
    before = _snapshot(fresh)

    report = load_matching_weights(fresh, path)

    assert sorted(report.shape_mismatched) == [
        ("decode_head.classifier.bias", (8,), (7,)),
        ("decode_head.classifier.weight", (8, 16, 1, 1), (7, 16, 1, 1)),
    ]
    assert report.missing == [] and report.unexpected == []
    assert set(report.matched) == set(before) - set(CLASSIFIER)
    after = fresh.state_dict()
    for key in CLASSIFIER:
        assert torch.equal(after[key], before[key]), f"{key} was overwritten"
    for key in report.matched:
        assert torch.equal(after[key], earthvqa.state_dict()[key]), key
    assert "2 shape-mismatched" in report.summary() and "(8, 16, 1, 1)" in report.summary()


def test_extra_keys_are_unexpected_and_absent_keys_missing(source: nn.Module, tmp_path: Path) -> None:
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    dropped = "decode_head.batch_norm.running_mean"
    del state[dropped]
    state["decode_head.aux_classifier.weight"] = torch.zeros(3, 3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    fresh = _model(seed=7)
    before = _snapshot(fresh)

    report = load_matching_weights(fresh, path)

    assert report.missing == [dropped]
    assert report.unexpected == ["decode_head.aux_classifier.weight"]
    assert report.shape_mismatched == []
    assert len(report.matched) == len(before) - 1
    assert torch.equal(fresh.state_dict()[dropped], before[dropped])  # left as initialised
    assert not hasattr(fresh.decode_head, "aux_classifier")


def test_unsafe_pickle_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"weight": torch.zeros(2), "extra": NotATensor()}, path)
    # It is a loadable pickle, just not a safe one.
    assert isinstance(torch.load(path, weights_only=False)["extra"], NotATensor)
    with pytest.raises(DataError, match="weights-only"):
        read_state_dict(path)
    with pytest.raises(DataError):
        load_matching_weights(_model(seed=0), path)


def test_pickle_without_tensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "state_dict": {"lr": 0.1}}, path)
    with pytest.raises(DataError, match="mapping of parameter names to tensors"):
        read_state_dict(path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="absent.safetensors"):
        read_state_dict(tmp_path / "absent.safetensors")
    with pytest.raises(MissingFileError):
        load_matching_weights(_model(seed=0), tmp_path / "absent.pth")


def test_directory_without_weights(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="model.safetensors"):
        read_state_dict(tmp_path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.npz"
    path.write_bytes(b"not weights")
    with pytest.raises(DataError, match="unknown weights format"):
        read_state_dict(path)


# --- SegFormer sizes -----------------------------------------------------------------------------


def test_b5_matches_the_paper() -> None:
    # MiT-B5 (Xie et al., 2021, Table 6): depths 3-6-40-3, widths 64-128-320-512, 768-wide decoder.
    config = segformer_config("b5", CLASSES)
    assert list(config.depths) == [3, 6, 40, 3]
    assert list(config.hidden_sizes) == [64, 128, 320, 512]
    assert config.decoder_hidden_size == 768
    assert config.num_labels == 7
    assert config.id2label == dict(enumerate(CLASSES))
    assert config.label2id == {name: i for i, name in enumerate(CLASSES)}
    assert config.semantic_loss_ignore_index == 255


def test_unknown_size_lists_the_sizes() -> None:
    with pytest.raises(ConfigError) as info:
        segformer_config("b9", CLASSES)
    assert "b9" in str(info.value)
    for size in SEGFORMER_SIZES:
        assert size in str(info.value)


def test_test_size_model_has_one_output_per_class() -> None:
    model = build_segformer("test", EARTHVQA_CLASSES)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.zeros(2, 3, 32, 32)).logits
    # SegFormer predicts at 1/4 of the input resolution.
    assert logits.shape == (2, len(EARTHVQA_CLASSES), 8, 8)
