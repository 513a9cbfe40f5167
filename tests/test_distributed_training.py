"""Real multi-process DeepSpeed runs on CPU: train, checkpoint, export, reload with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from transformers import SegformerForSemanticSegmentation

from conftest import crashed_copy, launch, tiny_run_config, write_config
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.data.loaders import TransformedDataset
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.transforms import EvalTransform
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.tasks import SegmentationTask

pytestmark = pytest.mark.slow


def _val_metrics(model: torch.nn.Module, tree: Path) -> dict:
    data = TransformedDataset(LoveDA(tree, "Val"), EvalTransform(), seed=0)
    metrics = run_evaluation(SegmentationTask(model), data, device=torch.device("cpu"), rank=0, world_size=1,
                             class_names=list(LOVEDA_CLASSES)).metrics
    return metrics.to_dict()


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_process_training_exports_what_was_trained(tmp_path, tiny_tree, stage, precision):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_run_config(
        tiny_tree, out, train={"deepspeed": f"zero{stage}_{precision}", "save_every": 4, "eval_every": 4}))
    launch("finetune.py", ["--config", str(config)], nproc=2)

    export = out / "export"
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config["id2label"] == {str(i): name for i, name in enumerate(LOVEDA_CLASSES)}
    exported = SegformerForSemanticSegmentation.from_pretrained(str(export)).eval()

    # The export holds the optimizer's fp32 master weights: compare with DeepSpeed's own consolidation.
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
    reference = SegformerForSemanticSegmentation(exported.config).eval()
    reference.load_state_dict({k.removeprefix("model."): v for k, v in consolidated.items()}, strict=True)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(exported(pixel_values=images).logits, reference(pixel_values=images).logits)

    # The run's own final validation (inside the engine, in its precision) matches the reloaded export.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    reported = json.loads((export / "metrics.json").read_text())
    reloaded = _val_metrics(exported.to(dtype), tiny_tree)
    if precision == "fp32":
        assert reloaded["confusion"] == reported["confusion"]
    else:
        # bf16 rounding depends on the kernel (ZeRO-3 runs linear layers through its own matmul + bias),
        # so argmax may flip on a few near-tied pixels; anything more means different weights.
        changed = (torch.tensor(reloaded["confusion"]) - torch.tensor(reported["confusion"])).abs().sum().item()
        assert changed <= 0.01 * torch.tensor(reported["confusion"]).sum().item()
        assert reloaded["miou"] == pytest.approx(reported["miou"], abs=0.02)


def test_zero0_bf16_resumes_exactly_and_exports_deepspeeds_fp32_masters(tmp_path, tiny_tree):
    # One step after the resume: it moves the weights only as the uninterrupted run did if the fp32
    # masters and Adam moments came back from the checkpoint (not, say, re-made from the bf16 weights).
    train = {"deepspeed": "zero0_bf16", "max_steps": 2, "save_every": 1, "eval_every": 2}
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    launch("finetune.py", ["--config", str(write_config(tmp_path / "full.yaml",
                                                        tiny_run_config(tiny_tree, full_dir, train=train)))], nproc=2)
    crashed_copy(full_dir, resumed_dir, step=1)
    launch("finetune.py", ["--config", str(write_config(tmp_path / "resumed.yaml",
                                                        tiny_run_config(tiny_tree, resumed_dir, train=train))),
                           "--resume"], nproc=2)

    full = load_file(full_dir / "export" / "model.safetensors")
    resumed = load_file(resumed_dir / "export" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert not [k for k in full if not torch.equal(full[k], resumed[k])], "the resumed run exported other weights"

    # What DeepSpeed saved at the last step: bf16 module weights and, in its optimizer state, the fp32 masters.
    saved = torch.load(full_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=True)
    exported = SegformerForSemanticSegmentation.from_pretrained(str(full_dir / "export")).state_dict()
    module = {k.removeprefix("model."): v for k, v in saved["module"].items() if k.startswith("model.")}
    assert module.keys() == exported.keys()
    parameters = [name for name in module if name.endswith(("weight", "bias"))]
    for name in parameters:  # the engine computed with the export rounded to bf16
        assert module[name].dtype == torch.bfloat16 and torch.equal(exported[name].bfloat16(), module[name]), name
    masters = [t for group in saved["optimizer"]["fp32_groups"] for t in group]
    trainable = [exported[name] for name in parameters]
    assert len(masters) == len(trainable) > 0  # nothing frozen, no task-only parts in this run
    # Every exported parameter is one of DeepSpeed's fp32 masters, bit for bit (not its bf16 copy).
    unmatched = [t.shape for t in trainable if not any(m.shape == t.shape and torch.equal(m, t) for m in masters)]
    assert not unmatched, unmatched
