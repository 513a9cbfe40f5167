"""Resume continues a run exactly; evaluation agrees across process counts; both launchers work."""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from conftest import REPO, crashed_copy, launch, tiny_run_config, write_config

pytestmark = pytest.mark.slow


def test_resume_mid_epoch_on_two_nodes_reproduces_the_uninterrupted_run(tmp_path, tiny_tree):
    # 2 batches per epoch and rank: the crash at step 3 is mid-epoch 2. Loader workers on, as in real runs:
    # the resumed run's workers (forked once, prefetching across epochs) must draw the very same batches.
    data = {"num_workers": 2}
    train = {"max_steps": 6, "save_every": 3, "eval_every": 3, "keep_checkpoints": 2}
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full_cfg = write_config(tmp_path / "full.yaml", tiny_run_config(tiny_tree, full_dir, data=data, train=train))
    launch("finetune.py", ["--config", str(full_cfg)], nproc=2, launcher="deepspeed")

    crashed_copy(full_dir, resumed_dir, step=3)
    resumed_cfg = write_config(tmp_path / "resumed.yaml",
                               tiny_run_config(tiny_tree, resumed_dir, data=data, train=train))
    # Resumed on two "nodes" (two torchrun agents over loopback, one process each): the shared run
    # directory is all a multi-node resume needs.
    output = launch("finetune.py", ["--config", str(resumed_cfg), "--resume"], nproc=2, launcher="torchrun-nodes")
    ranks = [json.loads(line.split("] ", 1)[1]) for line in output.splitlines()
             if line.startswith("[mapsage_ds.runtime.accelerator] ")]
    assert sorted((r["rank"], r["local_rank"], r["world_size"]) for r in ranks) == [(0, 0, 2), (1, 0, 2)]

    full = load_file(full_dir / "export" / "model.safetensors")
    resumed = load_file(resumed_dir / "export" / "model.safetensors")
    assert full.keys() == resumed.keys()
    mismatched = [k for k in full if not (full[k] == resumed[k]).all()]
    assert not mismatched, f"weights differ after resume: {mismatched[:5]}"
    rows = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # each step once
    assert sorted(p.name for p in (resumed_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]


def test_resume_without_checkpoint_is_an_error(tmp_path, tiny_tree):
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_tree, tmp_path / "empty"))
    with pytest.raises(pytest.fail.Exception, match="no checkpoint"):
        launch("finetune.py", ["--config", str(config), "--resume"], nproc=1, launcher="python")


def test_evaluation_is_identical_on_one_and_two_processes(tmp_path, tiny_tree):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_tree, run, train={"max_steps": 2}))
    launch("finetune.py", ["--config", str(config)], nproc=1, launcher="python")
    results = {}
    # Urban only: 3 validation images, an uneven split over 2 ranks.
    for nproc, launcher in ((1, "python"), (2, "torchrun")):
        output = tmp_path / f"eval_{nproc}.json"
        launch("evaluate.py", ["--model", str(run / "export"), "--data-root", str(tiny_tree), "--scenes", "urban",
                               "--output", str(output)], nproc=nproc, launcher=launcher)
        results[nproc] = json.loads(output.read_text())
    assert results[1]["confusion"] == results[2]["confusion"]
    assert results[1]["miou"] == results[2]["miou"]
    assert sum(map(sum, results[1]["confusion"])) > 0


def test_finetune_main_smoke(tmp_path, tiny_tree, monkeypatch):
    """scripts/finetune.py main(argv) in this process: one process, no launcher."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # registered for restoring, then removed: main() forms its own world
        monkeypatch.delenv(key)
    spec = importlib.util.spec_from_file_location("finetune_script", REPO / "scripts" / "finetune.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_tree, tmp_path / "run", train={"max_steps": 2}))
    metrics = script.main(["--config", str(config), "--set", "train.eval_every=1"])
    assert 0.0 <= metrics.miou <= 1.0
    assert (tmp_path / "run" / "config.yaml").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [1, 2]
    assert list((tmp_path / "run" / "tensorboard").iterdir())
