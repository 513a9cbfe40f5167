"""Distillation: the teacher stays outside the task, the cache equals the live teacher, and a real 2-process run.

The in-process tests use a tiny DINOv3 teacher built and exported here; the 2-process DeepSpeed
run trains its own tiny DINOv3 teacher first (the demo's ``teacher.bootstrap``), then distils it
into a tiny SegFormer, and a second run trains from the teacher cache.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import SegformerForSemanticSegmentation

from conftest import launch, tiny_run_config, write_config
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loaders import TrainSampler, TrainStream, TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.mixing import MixCollate
from mapsage_ds.data.transforms import ColorJitter, TrainTransform
from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.losses import build_loss
from mapsage_ds.losses.distill import DistillationLoss
from mapsage_ds.models import build_model
from mapsage_ds.models.export import write_hf_export
from mapsage_ds.models.factory import load_exported
from mapsage_ds.tasks import DistillationTask
from mapsage_ds.tasks.distill import FeatureProjection
from mapsage_ds.tasks.teacher import FrozenTeacher
from mapsage_ds.tasks.teacher_cache import TeacherCache, fill_teacher_cache, is_complete

CPU = torch.device("cpu")
CLASSES = list(LOVEDA_CLASSES)


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory) -> Path:
    """A randomly initialised DINOv3 "test" segmenter, exported like a trained one."""
    torch.manual_seed(0)
    built = build_model(arch="dinov3", size="test", class_names=CLASSES, drop_path_rate=0.0)
    state = {k: v.detach().float().clone() for k, v in built.module.state_dict().items()}
    return write_hf_export(built.module, state, tmp_path_factory.mktemp("teacher") / "export",
                           image_mean=built.normalize.mean, image_std=built.normalize.std)


def _student():
    torch.manual_seed(1)
    return build_model(arch="segformer", size="test", class_names=CLASSES, drop_path_rate=0.0)


def _stream(tree: Path, normalize) -> TrainStream:
    """A stream with crops, flips, rotations, colour jitter and CutMix/MixUp: what the cache must match."""
    transform = TrainTransform(crop_size=64, hflip=True, vflip=True, rot90=True, color_jitter=ColorJitter(),
                               normalize=normalize)
    data = TransformedDataset(LoveDA(tree, "Train", scenes="both"), transform, seed=5)
    sampler = TrainSampler(len(data), rank=0, world_size=1, batch_size=2, seed=5)
    return TrainStream(data, sampler, num_workers=0, collate_fn=MixCollate(mixup=0.3, cutmix=0.3))


def _task(model, teacher, projection) -> DistillationTask:
    return DistillationTask(model, teacher=teacher, projection=projection, ignore_index=IGNORE_INDEX,
                            distill_loss=DistillationLoss(kl=1.0, temperature=2.0, feature=0.5),
                            loss=build_loss(ignore_index=IGNORE_INDEX), supervised_weight=0.5)


def test_the_teacher_stays_outside_the_task_and_gets_no_gradient(teacher_export):
    student = _student()
    teacher = FrozenTeacher.load(teacher_export, input_normalize=student.normalize, device=CPU,
                                 dtype=torch.float32, features=True)
    task = _task(student.module, teacher, FeatureProjection(16, teacher.feature_dim))
    teacher_tensors = {id(p) for p in teacher.model.parameters()} | {id(b) for b in teacher.model.buffers()}
    assert not teacher_tensors & {id(t) for t in task.state_dict(keep_vars=True).values()}
    assert not teacher_tensors & {id(p) for p in task.parameters()}
    assert all(not name.startswith(("teacher", "frozen_teacher")) for name, _ in task.named_modules())
    task.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 7, (2, 64, 64))}
    outputs = task(batch)
    outputs["loss"].backward()
    assert {"loss_ce", "loss_kl", "loss_feature", "loss_supervised"} <= set(outputs)
    assert all(p.grad is None for p in teacher.model.parameters())
    assert task.projection.conv.weight.grad is not None
    assert teacher.check_unchanged() == teacher.digest_at_load
    with pytest.raises(ConfigError, match="nn.Module"):
        _task(student.module, teacher.model, None)


def test_training_from_the_cache_gives_the_same_losses_as_the_live_teacher(teacher_export, tiny_tree, tmp_path):
    student = _student()
    teacher = FrozenTeacher.load(teacher_export, input_normalize=student.normalize, device=CPU,
                                 dtype=torch.float32, features=True)
    stream, steps = _stream(tiny_tree, student.normalize), 6  # 4 batches per epoch: crosses an epoch
    fingerprint = {"teacher": teacher.digest_at_load, "batches": steps}
    fill_teacher_cache(teacher, stream, cache_dir=tmp_path / "cache", rank=0, num_batches=steps,
                       fingerprint=fingerprint, batches_per_shard=4)
    assert stream.state_dict() == {"epoch": 0, "batch_in_epoch": 0}
    assert len(list((tmp_path / "cache" / "rank00000").glob("shard_*.safetensors"))) == 2
    assert is_complete(tmp_path / "cache", rank=0, fingerprint=fingerprint)
    assert not is_complete(tmp_path / "cache", rank=0, fingerprint={**fingerprint, "batches": 7})
    cache = TeacherCache(tmp_path / "cache", rank=0, device=CPU)
    assert len(cache) == steps

    torch.manual_seed(2)
    projection = FeatureProjection(16, teacher.feature_dim)
    losses = {}
    for name, source in (("live", teacher), ("cache", cache)):
        task = _task(copy.deepcopy(student.module), source, copy.deepcopy(projection))
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-2)
        stream.load_state_dict({"epoch": 0, "batch_in_epoch": 0})
        torch.manual_seed(3)  # the decode head's dropout draws the same masks in both runs
        losses[name] = []
        for _ in range(steps):
            batch = next(stream)
            if name == "cache":
                live, cached = teacher(batch), cache(batch)
                assert torch.equal(live.logits, cached.logits) and torch.equal(live.features, cached.features)
            outputs = task(batch)
            optimizer.zero_grad()
            outputs["loss"].backward()
            optimizer.step()
            losses[name].append({k: v.item() for k, v in outputs.items() if k.startswith("loss")})
    assert losses["cache"] == losses["live"]
    assert losses["live"][-1]["loss_kl"] != losses["live"][0]["loss_kl"]  # it did train

    stale = next(stream)
    with pytest.raises(DataError, match="no entry"):  # batch 7 was never cached
        cache(stale)
    stream.load_state_dict({"epoch": 0, "batch_in_epoch": 0})
    batch = next(stream)
    batch["image"] = batch["image"].flip(-1)  # same key, other pixels
    batch["image"][0, 0, 0, 0] += 1.0
    with pytest.raises(DataError, match="stale"):
        cache(batch)


def _digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over name, dtype, shape and raw bytes of every tensor, names sorted (the run's convention)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _agreement(student, student_normalize, teacher, teacher_normalize, images) -> float:
    """Share of labelled validation pixels where the student's class equals the teacher's."""
    agree = total = 0
    with torch.no_grad():
        for sample in images:
            image, valid = sample["image"][None], sample["mask"] != IGNORE_INDEX
            size = image.shape[-2:]
            predictions = []
            for model, normalize in ((student, student_normalize), (teacher, teacher_normalize)):
                logits = model(pixel_values=normalize(image[0])[None]).logits
                logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                predictions.append(logits.argmax(1)[0])
            agree += int((predictions[0] == predictions[1])[valid].sum())
            total += int(valid.sum())
    return agree / total


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == "train"]


DISTILL = {"supervised": 0.5, "kl": 1.0, "temperature": 2.0, "feature": 0.5, "feature_loss": "cosine"}
TRAIN = {"max_steps": 24, "eval_every": 24, "save_every": 2, "keep_checkpoints": 20}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, tiny_tree) -> Path:
    """2 processes: bootstrap a tiny DINOv3 teacher, then distil it into a tiny SegFormer (live teacher)."""
    root = tmp_path_factory.mktemp("distill")
    config = tiny_run_config(tiny_tree, root / "live", train=TRAIN, optim={"lr": 1e-2})
    config.update(task="distill", distill=DISTILL,
                  teacher={"bootstrap": {"size": "test", "max_steps": 16, "lr": 3e-3}})
    launch("distill.py", ["--config", str(write_config(root / "live.yaml", config))], nproc=2)
    return root / "live"


@pytest.mark.slow
def test_two_process_distillation_run(live_run, tiny_tree):
    teacher_dir = live_run / "teacher" / "export"
    # The teacher: bitwise what was loaded at the end of training, and never inside the student's files.
    check = json.loads((live_run / "teacher_check.json").read_text())
    teacher, teacher_normalize = load_exported(teacher_dir)
    assert check["digest_at_load"] == check["digest_at_end"] == _digest(teacher.state_dict())
    exported = load_file(live_run / "export" / "model.safetensors")
    checkpoint = torch.load(live_run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)["module"]
    assert not [k for k in exported if "teacher" in k or "projection" in k or k.startswith(("backbone", "head."))]
    assert sorted(k for k in checkpoint if not k.startswith("model.")) == ["projection.conv.bias",
                                                                            "projection.conv.weight"]

    # The distillation parts fall.
    records = _train_records(live_run)
    assert [r["step"] for r in records] == list(range(1, TRAIN["max_steps"] + 1))
    for part in ("loss_kl", "loss_feature"):
        first, last = [sum(r[part] for r in chunk) / 4 for chunk in (records[:4], records[-4:])]
        assert last < 0.8 * first, (part, first, last)

    # The export is a plain SegFormer; it agrees with the teacher more than the student did early on.
    student = SegformerForSemanticSegmentation.from_pretrained(str(live_run / "export")).eval()
    early = SegformerForSemanticSegmentation.from_pretrained(str(live_run / "export")).eval()
    early.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint.items() if k.startswith("model.")})
    normalize = load_exported(live_run / "export")[1]
    images = LoveDA(tiny_tree, "Val", scenes="both")
    teacher.eval()
    start = _agreement(early, normalize, teacher, teacher_normalize, images)
    end = _agreement(student, normalize, teacher, teacher_normalize, images)
    assert end > start + 0.05, (start, end)


@pytest.mark.slow
def test_two_process_run_from_the_teacher_cache_gives_the_same_losses(live_run, tiny_tree, tmp_path):
    # Checkpoints only at the end: saving does not touch the training trajectory.
    config = tiny_run_config(tiny_tree, tmp_path / "cached", train={**TRAIN, "save_every": TRAIN["max_steps"]},
                             optim={"lr": 1e-2})
    config.update(task="distill", distill=DISTILL,
                  teacher={"path": str(live_run / "teacher" / "export"), "offload_features": True})
    launch("distill.py", ["--config", str(write_config(tmp_path / "cached.yaml", config))], nproc=2)
    for rank in (0, 1):
        assert list((tmp_path / "cached" / "teacher_cache" / f"rank{rank:05d}").glob("shard_*.safetensors"))
    assert json.loads((tmp_path / "cached" / "teacher_check.json").read_text())["unchanged"]
    live, cached = _train_records(live_run), _train_records(tmp_path / "cached")
    for a, b in zip(live, cached, strict=True):
        for key in ("loss", "loss_kl", "loss_feature", "loss_ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
