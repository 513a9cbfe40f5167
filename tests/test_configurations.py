"""The configurations the docs offer, each trained at test size: precisions, offload, activation checkpointing,
gradient accumulation with exact resume, the Hugging Face ``datasets`` source, the 7B recipe's combination.

Most tests prove several claims with one pair of real runs: an uninterrupted run, and a copy of it crashed
after its first checkpoint and resumed with activation checkpointing switched the other way. Recomputing
activations must not change a single bit, and neither must resuming, so the resumed export equals the
uninterrupted one bit for bit and the resumed steps log the same losses.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as HFImage
from safetensors.torch import load_file

from conftest import crashed_copy, launch, tiny_run_config, write_config
from mapsage_ds.builders import FROM_SCRATCH, build_run_model, random_start_warning
from mapsage_ds.cli.evaluate import main as evaluate
from mapsage_ds.cli.finetune import main as finetune
from mapsage_ds.config import load_config
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.data.loveda import LoveDA

pytestmark = pytest.mark.slow
# 4 optimizer steps of 2 micro-batches; the first checkpoint (step 2) is where the copy crashes.
TRAIN = {"max_steps": 4, "grad_accum_steps": 2, "save_every": 2, "eval_every": 100, "log_every": 1}
HF_FEATURES = Features({"image": HFImage(), "mask": HFImage(), "name": Value("string")})
HF_SPLITS = {"train": "Train", "validation": "Val"}


@pytest.fixture(scope="module")
def hf_copies(tiny_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny tree's Train and Val as a ``save_to_disk`` DatasetDict and as parquet files named per split."""
    root = tmp_path_factory.mktemp("hf")
    splits = {}
    for split, folder in HF_SPLITS.items():
        samples = LoveDA(tiny_tree, folder).samples
        splits[split] = Dataset.from_dict({"image": [str(s.image) for s in samples],
                                           "mask": [str(s.mask) for s in samples],
                                           "name": [s.name for s in samples]}, features=HF_FEATURES)
    DatasetDict(splits).save_to_disk(str(root / "saved"))
    (root / "parquet").mkdir()
    for split, data in splits.items():  # the file names Hugging Face's hub exports use
        data.to_parquet(str(root / "parquet" / f"{split}-00000-of-00001.parquet"))
    return {"save_to_disk": root / "saved", "parquet": root / "parquet"}


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["kind"] == "train"}


def assert_same_export(full: Path, resumed: Path) -> None:
    expected = load_file(full / "export" / "model.safetensors")
    got = load_file(resumed / "export" / "model.safetensors")
    assert expected.keys() == got.keys()
    differing = [k for k in expected if not (expected[k] == got[k]).all()]
    assert not differing, f"the resumed run's weights differ from the uninterrupted run's: {differing[:5]}"


def full_and_resumed(tmp_path: Path, config: dict, *, checkpointing: bool) -> tuple[Path, Path]:
    """``config`` run uninterrupted with ``checkpointing``, and crashed at step 2 and resumed with the opposite."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for output, checkpoint_activations, extra in ((full, checkpointing, []),
                                                  (resumed, not checkpointing, ["--resume"])):
        if output == resumed:
            crashed_copy(full, resumed, step=2)
        run_config = {**config, "output_dir": str(output),
                      "train": {**config["train"], "activation_checkpointing": checkpoint_activations}}
        finetune(["--config", str(write_config(tmp_path / f"{uuid.uuid4().hex}.yaml", run_config)), *extra])
    return full, resumed


CASES = {
    # name: (model section, DeepSpeed config, data source)
    "segformer-zero2-fp16-hf_saved": ({"arch": "segformer"}, "zero2_fp16", "save_to_disk"),
    "dinov3-zero3_offload-bf16-hf_parquet": ({"arch": "dinov3"}, "zero3_offload_bf16", "parquet"),
    "segformer-zero3-fp16": ({"arch": "segformer"}, "zero3_fp16", None),
    "dinov3-zero2-bf16": ({"arch": "dinov3"}, "zero2_bf16", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_and_accumulation_resume_bit_for_bit(case, tmp_path, tiny_tree, hf_copies, world_of_one,
                                                           monkeypatch):
    model, deepspeed, source = CASES[case]
    data = {"scenes": "urban"}
    if source is not None:
        data = {"source": "hf", "root": str(hf_copies[source]), "train_split": "train", "val_split": "validation"}
        # Arrow files built from parquet go to the test's folder, not the user's cache.
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    config = tiny_run_config(tiny_tree, tmp_path, model={**model, "pretrained": FROM_SCRATCH}, data=data,
                             train={**TRAIN, "deepspeed": deepspeed})
    full, resumed = full_and_resumed(tmp_path, config, checkpointing=False)

    assert_same_export(full, resumed)
    losses, resumed_losses = train_losses(full), train_losses(resumed)
    assert sorted(losses) == [1, 2, 3, 4] and sorted(resumed_losses) == [1, 2, 3, 4]
    assert all(resumed_losses[step] == losses[step] for step in (3, 4)), (losses, resumed_losses)
    run = json.loads((full / "export" / "metrics.json").read_text())
    assert sum(map(sum, run["confusion"])) > 0
    if source is None:
        return
    # mapsage-evaluate reads the source through the builder training uses: the HF copy of Val scores as the tree.
    scored = {}
    for name, data_args in (("hf", ["--data-root", str(hf_copies[source]), "--set", "data.source=hf",
                                    "--split", "validation"]),
                            ("tree", ["--data-root", str(tiny_tree), "--split", "Val"])):
        report = tmp_path / f"eval_{name}.json"
        evaluate(["--model", str(full / "export"), *data_args, "--output", str(report), "--num-panels", "0",
                  "--output-dir", str(tmp_path / f"eval_{name}")])
        scored[name] = json.loads(report.read_text())
    assert scored["hf"]["split"] == "validation" and scored["hf"]["num_images"] == len(LoveDA(tiny_tree, "Val"))
    assert scored["hf"]["confusion"] == scored["tree"]["confusion"]
    # Validation ran the engine's half-precision copy, evaluation the fp32 export: close, not equal.
    assert abs(scored["hf"]["miou"] - run["miou"]) < 0.02


def test_the_7b_recipe_combination_trains_saves_and_exports_on_two_processes(tmp_path, tiny_tree):
    # ZeRO-3 + bf16 + activation checkpointing + accumulation 2 + unfreezing (75% frozen, then 50% from step 2),
    # as the recipe sets them, on the test-size DINOv3. Resuming across an unfreezing boundary on 2 processes
    # is tests/test_unfreeze.py's; one launch here keeps the suite in its budget.
    overrides = ["model.size=test", f"model.pretrained={FROM_SCRATCH}", "data.crop_size=64", "data.num_workers=0",
                 "optim.warmup_steps=1", "unfreeze.stages=[{at_step: 2, frozen_fraction: 0.5}]",
                 "train.max_steps=3", "train.save_every=2", "train.eval_every=100", "train.log_every=1"]
    recipe = load_config(recipe="dinov3_sat_vit7b_loveda", overrides=[f"data.root={tiny_tree}", *overrides])
    assert (recipe.train.deepspeed, recipe.train.grad_accum_steps, recipe.train.activation_checkpointing) == (
        "zero3_bf16", 2, True)
    assert recipe.unfreeze.initial_frozen_fraction == 0.75

    output_dir = tmp_path / "run"
    output = launch("finetune.py", ["--recipe", "dinov3_sat_vit7b_loveda", "--data-root", str(tiny_tree),
                                    "--output-dir", str(output_dir), *[a for o in overrides for a in ("--set", o)]],
                    nproc=2)
    assert "step 2: unfreezing phase 1" in output and "ZeRO-3, torch.bfloat16" in output
    assert sorted(train_losses(output_dir)) == [1, 2, 3]
    assert sorted(p.name for p in (output_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    exported = load_file(output_dir / "export" / "model.safetensors")
    assert exported and all(t.isfinite().all() for t in exported.values())


def test_a_real_data_recipe_without_weights_warns_once_unless_from_scratch_is_said(tmp_path, tiny_tree,
                                                                                   world_of_one, capfd):
    config = tiny_run_config(tiny_tree, tmp_path / "random", optim={"warmup_steps": 0},
                             train={"max_steps": 1, "eval_every": 100})
    finetune(["--config", str(write_config(tmp_path / "random.yaml", config))])
    err = capfd.readouterr().err
    assert err.count("model.pretrained is not set") == 1, err[-3000:]
    assert "starts from RANDOM weights" in err and f"model.pretrained={FROM_SCRATCH}" in err

    # Said on purpose, or generated data: nothing to warn about, where the run builds its model.
    for overrides in ([f"model.pretrained={FROM_SCRATCH}"], ["data.synthetic={size: 64}"]):
        config = load_config(recipe="segformer_b5_loveda", overrides=["model.size=test", *overrides])
        build_run_model(config, list(LOVEDA_CLASSES), verbose=True)
        assert "RANDOM weights" not in capfd.readouterr().err, overrides
    assert random_start_warning(load_config(recipe="demo")) is None
    for name in ("segformer_b5_loveda", "segformer_b2_imagenet_loveda", "dinov3_sat_vit7b_loveda"):
        assert "RANDOM weights" in random_start_warning(load_config(recipe=name))
