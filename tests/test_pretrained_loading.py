"""Starting weights from every checkpoint source: identity -> normalisation, strict loading, sizes, ZeRO 1-3.

Checkpoints are tiny random models written to ``tmp_path`` in the layouts users hold. Every float
tensor is randomised (norms and biases included) so that a tensor that is not copied, or copied to
the wrong place, is always noticed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DINOv3ViTModel, SegformerForSemanticSegmentation, SegformerModel

from conftest import launch, tiny_run_config, write_config
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.health.normalisation import check_normalisation
from mapsage_ds.health.result import Status
from mapsage_ds.models.convert.sources import read_pretrained, write_hf_directory
from mapsage_ds.models.dinov3 import dinov3_config
from mapsage_ds.models.factory import build_model, head_test
from mapsage_ds.models.normalization import decide_normalization
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.models.weights import load_pretrained_state, to_module_names
from mapsage_ds.runtime.engine import fill_ds_config, read_ds_config

CLASSES = list(LOVEDA_CLASSES)
EIGHT_CLASSES = [*CLASSES, "playground"]
SATELLITE = ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143))  # DINOv3 SAT-493M (Siméoni et al., 2025)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSIFIER = ("decode_head.classifier.weight", "decode_head.classifier.bias")


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
                if key.endswith("running_var"):
                    tensor.abs_().add_(0.1)


def _segformer_dir(folder: Path, *, size: str = "test", classes: list[str] = CLASSES, seed: int = 1) -> Path:
    model = build_segformer(size, classes)
    _randomise(model, seed)
    model.save_pretrained(folder)
    return folder


def _dinov3_dir(folder: Path, *, seed: int = 2) -> Path:
    backbone = DINOv3ViTModel._from_config(dinov3_config("test"))
    _randomise(backbone, seed)
    backbone.save_pretrained(folder)
    return folder


def _config_only(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov3_vit", **fields}))
    return folder


def _zero3_config() -> dict:
    return fill_ds_config(read_ds_config("zero3_fp32"), micro_batch_size=1, grad_accum_steps=1, world_size=1,
                          grad_clip=1.0)


# ----------------------------------------------------------------------------------------------
# Normalisation follows the checkpoint's identity


NORMALISATION_TABLE = [
    # (arch, relative path of the checkpoint, config.json fields or None for a file, override, stats, reason part)
    ("dinov3", "dinov3-vitl16-pretrain-sat493m", {}, None, SATELLITE, "directory name dinov3-vitl16-pretrain-sat493m"),
    ("dinov3", "dinov3-vitl16-pretrain-lvd1689m", {}, None, IMAGENET, "directory name dinov3-vitl16-pretrain-lvd1689m"),
    ("dinov3", "weights", {"_name_or_path": "facebook/dinov3-vit7b16-pretrain-sat493m"}, None, SATELLITE,
     "_name_or_path facebook/dinov3-vit7b16-pretrain-sat493m"),
    ("dinov3", "weights", {"mapsage_pretraining": "lvd1689m"}, None, IMAGENET, "mapsage_pretraining: lvd1689m"),
    ("dinov3", "models--facebook--dinov3-vits16-pretrain-lvd1689m/snapshots/0123abcd", {}, None, IMAGENET,
     "models--facebook--dinov3-vits16-pretrain-lvd1689m"),
    ("dinov3", "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", None, None, SATELLITE,
     "file name dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"),
    ("dinov3", "dinov3-vitl16-pretrain-sat493m", {}, {"mean": [0.5, 0.4, 0.3], "std": [0.1, 0.2, 0.3]},
     ((0.5, 0.4, 0.3), (0.1, 0.2, 0.3)), "override"),
    ("segformer", "mit_b5.pth", None, None, IMAGENET, "ImageNet"),
    ("segformer", "segformer-b2-finetuned-ade-512-512", {"model_type": "segformer"}, None, IMAGENET, "ImageNet"),
]


@pytest.mark.parametrize("arch,relative,fields,override,stats,reason", NORMALISATION_TABLE,
                         ids=[f"row{i}" for i in range(len(NORMALISATION_TABLE))])
def test_normalisation_table(tmp_path, arch, relative, fields, override, stats, reason):
    path = tmp_path / relative
    if fields is None:
        path.write_bytes(b"")  # only the name is read
    else:
        _config_only(path, **fields)
    decision = decide_normalization(arch=arch, pretrained=str(path), override=override)
    assert (decision.mean, decision.std) == stats
    assert reason in decision.reason
    # The health check judges the pipeline against the same decision.
    assert check_normalisation(arch=arch, pretrained=str(path), normalize=Normalize(*stats),
                               override=override).status is Status.PASS
    other = IMAGENET if stats != IMAGENET else SATELLITE
    assert check_normalisation(arch=arch, pretrained=str(path), normalize=Normalize(*other),
                               override=override).status is Status.FAIL


def test_a_dinov3_checkpoint_of_unknown_identity_asks_for_model_normalization(tmp_path):
    path = _config_only(tmp_path / "weights")
    with pytest.raises(ConfigError, match="model.normalization"):
        decide_normalization(arch="dinov3", pretrained=str(path))
    result = check_normalisation(arch="dinov3", pretrained=str(path), normalize=Normalize(*SATELLITE))
    assert result.status is Status.FAIL and "model.normalization" in result.fix
    with pytest.raises(ConfigError, match=r"model.normalization.std=\[0.2, 0.2\]"):
        decide_normalization(arch="dinov3", pretrained=str(path), override={"mean": [0, 0, 0], "std": [0.2, 0.2]})


def test_health_check_passes_on_a_sat_checkpoint_whose_preprocessor_config_says_imagenet(tmp_path):
    # transformers' DINOv3 converter writes ImageNet statistics even for the satellite models.
    folder = _dinov3_dir(tmp_path / "dinov3-vittest-pretrain-sat493m")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(IMAGENET_MEAN),
                                                                 "image_std": list(IMAGENET_STD)}))
    built = build_model(arch="dinov3", size="test", class_names=CLASSES, pretrained=str(folder))
    assert (built.normalize.mean, built.normalize.std) == SATELLITE
    assert built.normalization.pretraining == "sat493m"
    assert check_normalisation(arch="dinov3", pretrained=str(folder), normalize=built.normalize).status is Status.PASS
    wrong = check_normalisation(arch="dinov3", pretrained=str(folder), normalize=Normalize(*IMAGENET))
    assert wrong.status is Status.FAIL and wrong.message.startswith("ImageNet statistics on a dinov3 backbone")


# ----------------------------------------------------------------------------------------------
# Strict loading: every backbone tensor, head tensors of another class count skipped and listed


def test_b0_weights_into_mini_are_refused_naming_both_sizes_and_the_keys(tmp_path):
    b0 = _segformer_dir(tmp_path / "mit_b0", size="b0")
    with pytest.raises(ConfigError) as info:
        build_model(arch="segformer", size="mini", class_names=CLASSES, pretrained=str(b0))
    message = str(info.value)
    assert "model.size='mini'" in message and "depths [2, 2, 2, 2] hidden [32, 64, 160, 256] (b0)" in message
    # The loader itself, given a model of another size, names the tensors instead of training from scratch.
    mini = build_model(arch="segformer", size="mini", class_names=CLASSES).module
    converted = read_pretrained(b0)
    is_head = head_test(build_model(arch="segformer", size="mini", class_names=CLASSES).layer_id)
    with pytest.raises(DataError, match=r"backbone keys missing or shape-mismatched: \d+ missing, \d+ shape-") as info:
        load_pretrained_state(mini, to_module_names(converted.state_dict, mini), source=str(b0), is_head=is_head)
    # b0's first stage is 32 wide, mini's 16: the message names the tensors with both shapes.
    assert re.search(r"segformer\.stages\.0\.blocks\.0\.\S+ checkpoint \(32, 32\) vs model \(16, 16\)",
                     str(info.value))


@pytest.mark.parametrize("zero3", [False, True], ids=["plain", "zero3"])
def test_a_removed_backbone_tensor_is_an_error_naming_it(tmp_path, zero3, request):
    if zero3:
        request.getfixturevalue("one_process_world")
    folder = _segformer_dir(tmp_path / "hf")
    weights = load_file(folder / "model.safetensors")
    removed = next(k for k in weights if k.endswith("block.1.0.attention.self.key.weight"))
    save_file({k: v for k, v in weights.items() if k != removed}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"1 missing, 0 shape-mismatched") as info:
        build_model(arch="segformer", size="test", class_names=CLASSES, pretrained=str(folder),
                    ds_config=_zero3_config() if zero3 else None)
    # named as the model calls it (transformers 5: stages.1.blocks.0.attention.k_proj)
    assert re.search(r"missing: segformer\.stages\.1\.blocks\.0\.attention\.\S*k\S*\.weight$", str(info.value))


def test_a_dinov3_block_missing_is_an_error_naming_its_keys(tmp_path):
    folder = _dinov3_dir(tmp_path / "dinov3-vittest-pretrain-lvd1689m")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("layer.2.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(DataError, match="backbone keys missing") as info:
        build_model(arch="dinov3", size="test", class_names=CLASSES, pretrained=str(folder))
    assert "backbone.model.layer.2.norm1.weight" in str(info.value)


@pytest.mark.parametrize("zero3", [False, True], ids=["plain", "zero3"])
def test_a_head_of_another_class_count_is_skipped_and_listed(tmp_path, zero3, request, capsys):
    if zero3:
        request.getfixturevalue("one_process_world")
    folder = _segformer_dir(tmp_path / "ade", classes=EIGHT_CLASSES)
    source = load_file(folder / "model.safetensors")
    built = build_model(arch="segformer", size="test", class_names=CLASSES, pretrained=str(folder),
                        ds_config=_zero3_config() if zero3 else None, verbose=True)
    report = built.report
    assert sorted(report.head_skipped) == [("decode_head.classifier.bias", (8,), (7,)),
                                           ("decode_head.classifier.weight", (8, 16, 1, 1), (7, 16, 1, 1))]
    assert report.missing == [] and report.shape_mismatched == [] and report.unexpected == []
    printed = capsys.readouterr().out
    assert "head tensors skipped (2" in printed and "decode_head.classifier.weight checkpoint (8, 16, 1, 1)" in printed
    loaded = _gathered_state(built.module)
    on_disk = SegformerForSemanticSegmentation(built.module.config)
    on_disk.load_state_dict(loaded)
    by_disk_name = {k: v for k, v in _disk_state(on_disk).items()}
    for key, tensor in source.items():
        if key not in CLASSIFIER:
            assert torch.equal(by_disk_name[key], tensor), key


def _gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return {k: v.clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(params):
        return {k: v.clone() for k, v in module.state_dict().items()}


def _disk_state(model: SegformerForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """The model's tensors under the names save_pretrained writes (hub layout)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return load_file(Path(folder) / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# Architecture from the checkpoint: size auto, named size as a cross-check


def test_segformer_size_auto_takes_the_checkpoint_architecture(tmp_path):
    folder = _segformer_dir(tmp_path / "hf", size="mini")
    built = build_model(arch="segformer", size="auto", class_names=CLASSES, pretrained=str(folder))
    config = built.module.config
    assert (list(config.depths), list(config.hidden_sizes), list(config.num_attention_heads)) == (
        [1, 1, 2, 1], [16, 32, 64, 128], [1, 2, 4, 8])
    assert config.num_labels == 7 and built.num_layers == 5
    assert built.report.head_skipped == [] and len(built.report.matched) == len(load_file(folder / "model.safetensors"))


def test_dinov3_size_auto_and_cross_check(tmp_path):
    folder = _dinov3_dir(tmp_path / "dinov3-vittest-pretrain-sat493m")
    built = build_model(arch="dinov3", size="auto", class_names=CLASSES, pretrained=str(folder))
    assert built.module.backbone.config.hidden_size == 32 and built.num_layers == 4
    with pytest.raises(ConfigError, match=r"model.size='vitl16' .*hidden_size 32.*\(test\); set model.size=test"):
        build_model(arch="dinov3", size="vitl16", class_names=CLASSES, pretrained=str(folder))
    with pytest.raises(ConfigError, match="model.arch='segformer' but .* is a dinov3 checkpoint"):
        build_model(arch="segformer", size="auto", class_names=CLASSES, pretrained=str(folder))


def _nvlabs_state(hf: SegformerForSemanticSegmentation) -> dict[str, torch.Tensor]:
    """NVlabs' original MiT key layout, written from the published key rules (docs/weights.md)."""
    disk = _disk_state(hf)
    out = {}
    for s in range(4):
        enc = "segformer.encoder."
        out[f"patch_embed{s + 1}.proj.weight"] = disk[f"{enc}patch_embeddings.{s}.proj.weight"]
        out[f"patch_embed{s + 1}.proj.bias"] = disk[f"{enc}patch_embeddings.{s}.proj.bias"]
        out[f"patch_embed{s + 1}.norm.weight"] = disk[f"{enc}patch_embeddings.{s}.layer_norm.weight"]
        out[f"patch_embed{s + 1}.norm.bias"] = disk[f"{enc}patch_embeddings.{s}.layer_norm.bias"]
        out[f"norm{s + 1}.weight"] = disk[f"{enc}layer_norm.{s}.weight"]
        out[f"norm{s + 1}.bias"] = disk[f"{enc}layer_norm.{s}.bias"]
        for j in range(hf.config.depths[s]):
            hf_block, nv = f"{enc}block.{s}.{j}.", f"block{s + 1}.{j}."
            for kind in ("weight", "bias"):
                pairs = {"norm1": "layer_norm_1", "attn.q": "attention.self.query",
                         "attn.proj": "attention.output.dense", "norm2": "layer_norm_2", "mlp.fc1": "mlp.dense1",
                         "mlp.dwconv.dwconv": "mlp.dwconv.dwconv", "mlp.fc2": "mlp.dense2"}
                if hf.config.sr_ratios[s] > 1:
                    pairs.update({"attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm"})
                for theirs, ours in pairs.items():
                    out[f"{nv}{theirs}.{kind}"] = disk[f"{hf_block}{ours}.{kind}"]
                out[f"{nv}attn.kv.{kind}"] = torch.cat([disk[f"{hf_block}attention.self.key.{kind}"],
                                                        disk[f"{hf_block}attention.self.value.{kind}"]])
    return out


def test_an_nvlabs_training_checkpoint_loads_into_the_named_size(tmp_path):
    source = build_segformer("test", CLASSES)
    _randomise(source, 5)
    path = tmp_path / "mit_test.pth"
    torch.save({"state_dict": _nvlabs_state(source), "meta": {"epoch": 3}}, path)
    built = build_model(arch="segformer", size="test", class_names=CLASSES, pretrained=str(path))
    assert built.report.missing and all(k.startswith("decode_head.") for k in built.report.missing)
    expected = _disk_state(source)
    loaded = _disk_state(built.module)
    encoder = [k for k in expected if k.startswith("segformer.encoder.")]
    assert encoder and all(torch.equal(loaded[k], expected[k]) for k in encoder)


# ----------------------------------------------------------------------------------------------
# The converted directory


def test_write_hf_directory_round_trips_through_plain_transformers(tmp_path):
    source = _segformer_dir(tmp_path / "src")
    converted = read_pretrained(source)
    decision = decide_normalization(arch="segformer", pretrained=str(source))
    write_hf_directory(converted, tmp_path / "out", normalization=decision)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mapsage_pretraining"] == "imagenet"
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == (list(IMAGENET[0]), list(IMAGENET[1]))
    assert "ImageNet" in processor["mapsage_normalization"]["reason"]
    reloaded = SegformerModel.from_pretrained(str(tmp_path / "out"))
    original = SegformerModel.from_pretrained(str(source))
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        write_hf_directory(converted, tmp_path / "out", normalization=decision)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging left behind


# ----------------------------------------------------------------------------------------------
# One optimizer step at a negligible learning rate, 2 processes, ZeRO-1/2/3: export == pretrained


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("arch", ["segformer", "dinov3"])
def test_one_step_from_a_converted_directory_exports_the_pretrained_weights(tmp_path, tiny_tree, arch, stage):
    if arch == "segformer":
        source = _segformer_dir(tmp_path / "mit-test-ade", classes=EIGHT_CLASSES)
        size, expected_stats = "test", IMAGENET
    else:
        source = _dinov3_dir(tmp_path / "dinov3-vittest-pretrain-sat493m")
        size, expected_stats = "auto", SATELLITE
    converted = read_pretrained(source)
    write_hf_directory(converted, tmp_path / "converted", normalization=decide_normalization(
        arch=arch, pretrained=str(source)))
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_run_config(
        tiny_tree, out, model={"arch": arch, "size": size},
        optim={"lr": 1e-12, "weight_decay": 0.0, "warmup_steps": 0},
        train={"max_steps": 1, "deepspeed": f"zero{stage}_fp32", "eval_every": 1, "save_every": 1}))
    output = launch("finetune.py", ["--config", str(config), "--set", f"model.pretrained={tmp_path / 'converted'}"],
                    nproc=2)
    assert re.search(r"weights from \S+/converted: \d+ matched, \d+ missing, 0 unexpected, 0 shape-mismatched", output)

    pretrained = load_file(tmp_path / "converted" / "model.safetensors")
    exported = load_file(out / "export" / "model.safetensors")
    if arch == "segformer":
        assert "head tensors skipped (2" in output and "decode_head.classifier.weight" in output
        # Batch-norm statistics move in train mode and the classifier was re-initialised (7 classes, not 8).
        compared = [k for k in pretrained if k not in CLASSIFIER and ".batch_norm.running" not in k
                    and not k.endswith("num_batches_tracked")]
    else:
        assert "missing (left as initialised): head." in output  # the fusion head is not in a backbone checkpoint
        compared = list(pretrained)
    assert len(compared) > 20 and set(compared) <= set(exported)
    for key in compared:
        torch.testing.assert_close(exported[key], pretrained[key], rtol=0, atol=1e-6, msg=key)
    processor = json.loads((out / "export" / "preprocessor_config.json").read_text())
    assert (tuple(processor["image_mean"]), tuple(processor["image_std"])) == expected_stats
    assert processor["mapsage_normalization"]["pretraining"] == ("imagenet" if arch == "segformer" else "sat493m")


def test_a_copied_directory_keeps_its_identity_through_the_config_field(tmp_path):
    source = _dinov3_dir(tmp_path / "dinov3-vittest-pretrain-lvd1689m")
    write_hf_directory(read_pretrained(source), tmp_path / "converted",
                       normalization=decide_normalization(arch="dinov3", pretrained=str(source)))
    shutil.rmtree(source)  # the name that said "web" is gone; config.json still says it
    built = build_model(arch="dinov3", size="test", class_names=CLASSES, pretrained=str(tmp_path / "converted"))
    assert (built.normalize.mean, built.normalize.std) == IMAGENET
    assert "mapsage_pretraining: lvd1689m" in built.normalization.reason


# ----------------------------------------------------------------------------------------------
# Meta DINOv3 files and the conversion command


def test_a_meta_sat_file_loads_directly_with_satellite_statistics(tmp_path):
    from test_convert_dinov3 import FAMILIES, meta_state

    family = FAMILIES["vitl16_sat"]
    meta = meta_state(family, seed=3)
    path = tmp_path / family.file_name
    torch.save(meta, path)
    built = build_model(arch="dinov3", size="auto", class_names=CLASSES, pretrained=str(path))
    assert (built.normalize.mean, built.normalize.std) == SATELLITE
    assert f"file name {family.file_name}" in built.normalization.reason
    assert built.module.backbone.config.hidden_size == family.dim and built.num_layers == family.depth
    # Every backbone tensor is the converter's (HF on-disk names once saved).
    expected = read_pretrained(path).state_dict
    loaded = {k.removeprefix("backbone."): v for k, v in built.module.state_dict().items() if k.startswith("backbone.")}
    on_disk = to_module_names(expected, built.module.backbone)
    assert set(on_disk) == set(loaded)
    for key, tensor in on_disk.items():
        assert torch.equal(loaded[key], tensor), key
    with pytest.raises(ConfigError, match=r"model.size='test' .* \(no preset\); set model.size=auto"):
        build_model(arch="dinov3", size="test", class_names=CLASSES, pretrained=str(path))


def test_convert_command_writes_a_directory_plain_transformers_loads(tmp_path, capsys):
    from test_convert_dinov3 import FAMILIES, meta_state

    from mapsage_ds.cli.convert import main

    family = FAMILIES["vitl16"]  # web (LVD-1689M)
    path = tmp_path / family.file_name
    torch.save(meta_state(family, seed=4), path)
    main([str(path), str(tmp_path / "dinov3-web")])
    printed = capsys.readouterr().out
    assert "meta-dinov3 layout" in printed and "dropped rope_embed.periods" in printed
    hf = DINOv3ViTModel.from_pretrained(str(tmp_path / "dinov3-web"))
    expected = read_pretrained(path).state_dict
    saved = load_file(tmp_path / "dinov3-web" / "model.safetensors")
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert hf.config.hidden_size == family.dim
    processor = json.loads((tmp_path / "dinov3-web" / "preprocessor_config.json").read_text())
    assert (tuple(processor["image_mean"]), tuple(processor["image_std"])) == IMAGENET
    assert processor["mapsage_normalization"]["pretraining"] == "lvd1689m"
    assert "rope_embed.periods" in json.loads((tmp_path / "dinov3-web" / "mapsage_dropped.json").read_text())

    # A MiT file through the same command: NVlabs layout in a training-checkpoint wrapper.
    source = build_segformer("test", CLASSES)
    _randomise(source, 6)
    torch.save({"state_dict": _nvlabs_state(source)}, tmp_path / "mit.pth")
    main([str(tmp_path / "mit.pth"), str(tmp_path / "mit"), "--num-attention-heads", "1,1,1,1"])
    reloaded = _disk_state(SegformerModel.from_pretrained(str(tmp_path / "mit")))
    original = _disk_state(source)
    assert all(torch.equal(reloaded[k], original[k]) for k in reloaded if k.startswith("segformer.encoder."))
    with pytest.raises(ConfigError, match="already exists"):
        main([str(tmp_path / "mit.pth"), str(tmp_path / "mit")])
