"""Runs that cannot lose work: output-directory ownership, non-finite steps, a full disk, the resume trust check.

Real training runs (one process, in this process), real files, a real tmpfs, real processes
holding locks; nothing here stands in for the file system or DeepSpeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import subprocess_env, tiny_run_config, write_config
from mapsage_ds.cli.finetune import main as finetune
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.errors import CheckpointError, OutputDirectoryError, StorageError, TrainingError
from mapsage_ds.models.export import write_hf_export
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.runtime import checkpoint
from mapsage_ds.training.run_dir import LOCK_FILE, claim_output_dir, read_run_id

pytestmark = pytest.mark.slow
TRAIN = {"max_steps": 3, "save_every": 1, "eval_every": 3, "log_every": 10, "keep_checkpoints": 2}


def run(tmp_path: Path, tree: Path, output: Path, *args: str, train: dict | None = None):
    config = write_config(tmp_path / f"{uuid.uuid4().hex}.yaml",
                          tiny_run_config(tree, output, train={**TRAIN, **(train or {})}))
    return finetune(["--config", str(config), *args])


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (the lock file aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def train_steps(output: Path) -> list[int]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if row["kind"] == "train"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real size-limited file system at ``path`` (needs mount rights, as CI's root has)."""
    path.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test ({result.stderr.strip()}): run the suite as root "
                    f"or in a container with CAP_SYS_ADMIN, as .ci/run does")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_directory_holding_a_run_is_refused_then_resumed_or_overwritten(tmp_path, tiny_tree, world_of_one):
    output = tmp_path / "run"
    run(tmp_path, tiny_tree, output)
    first_id, before = read_run_id(output), snapshot(output)

    with pytest.raises(OutputDirectoryError, match=r"already holds run .*--resume.*--overwrite"):
        run(tmp_path, tiny_tree, output, train={"max_steps": 2})
    assert snapshot(output) == before, "a refused run changed the previous run's files"

    # --resume with a longer schedule continues the same run; its log has every step once.
    run(tmp_path, tiny_tree, output, "--resume", train={"max_steps": 4})
    assert read_run_id(output) == first_id
    assert train_steps(output) == [3, 4]  # log_every=10: the final step of each part is logged

    run(tmp_path, tiny_tree, output, "--overwrite", train={"max_steps": 2})
    assert read_run_id(output) != first_id
    assert train_steps(output) == [2]
    assert checkpoint.latest_tag(output / "checkpoints") == checkpoint.step_tag(2)
    assert not (output / "checkpoints" / checkpoint.step_tag(4)).exists()


def test_resume_cuts_the_log_back_and_removes_an_interrupted_save(tmp_path, tiny_tree, world_of_one):
    output = tmp_path / "run"
    run(tmp_path, tiny_tree, output, train={"log_every": 1, "keep_checkpoints": 3})
    # As after a crash during the step-3 save: 'latest' still names step 2, step 3 is half written.
    checkpoints = output / "checkpoints"
    (checkpoints / "latest").write_text(checkpoint.step_tag(2))
    (checkpoints / checkpoint.step_tag(3) / checkpoint.MANIFEST).unlink()
    run(tmp_path, tiny_tree, output, "--resume")
    assert train_steps(output) == [1, 2, 3]
    assert json.loads((checkpoints / checkpoint.step_tag(3) / checkpoint.MANIFEST).read_text())["step"] == 3


def test_pruning_goes_by_step_number_and_spares_latest_and_best(tmp_path):
    root = tmp_path / "checkpoints"
    steps = [5, 7, 99_999_999, 100_000_000]
    for step in steps:
        (root / checkpoint.step_tag(step)).mkdir(parents=True)
    # By name, step_100000000 sorts before step_99999999 and would be pruned first.
    (root / "latest").write_text(checkpoint.step_tag(100_000_000))
    checkpoint.prune_checkpoints(root, keep=1, protect_steps={5})
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [checkpoint.step_tag(5),
                                                                    checkpoint.step_tag(100_000_000)]


def test_a_live_lock_is_refused_and_a_dead_holders_lock_is_named_and_taken_over(tmp_path):
    output = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mapsage_ds.training.run_dir import claim_output_dir; "
                               "claim_output_dir(sys.argv[1], resume=False, overwrite=False); "
                               "print('held', flush=True); time.sleep(600)", str(output)],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirectoryError, match=rf"in use by another run \(pid {holder.pid} on "):
            claim_output_dir(output, resume=True, overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    owned = claim_output_dir(output, resume=True, overwrite=False)
    try:
        assert any(f"pid {holder.pid}" in note and "no longer running" in note for note in owned.notes)
        assert owned.run_id == read_run_id(output)
    finally:
        owned.release()


def test_misplaced_and_unwritable_output_directories_are_named(tmp_path):
    with pytest.raises(OutputDirectoryError, match="--resume and --overwrite contradict"):
        claim_output_dir(tmp_path / "run", resume=True, overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    with pytest.raises(OutputDirectoryError, match=rf"{a_file} exists and is not a directory"):
        claim_output_dir(a_file, resume=False, overwrite=False)
    with tmpfs(tmp_path / "ro", "1m") as mount:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(OutputDirectoryError, match=rf"{mount / 'run'} cannot be written \(Read-only file system"):
            claim_output_dir(mount / "run", resume=False, overwrite=False)


def test_nonfinite_steps_stop_the_run_and_no_checkpoint_holds_them(tmp_path, tiny_tree, world_of_one):
    # lr=1e6: step 1 throws the weights far out, every later loss is NaN and DeepSpeed skips the update.
    # save_every=1 < log_every=10: the check must not wait for a logging step.
    output = tmp_path / "stop"
    with pytest.raises(TrainingError, match=r"step 2: non-finite loss or gradients .*checkpoints/step_00000001"):
        run(tmp_path, tiny_tree, output, "--set", "optim.lr=1e6", train={"max_steps": 8})
    checkpoints = output / "checkpoints"
    assert checkpoint.latest_tag(checkpoints) == checkpoint.step_tag(1)
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [checkpoint.step_tag(1)]
    checkpoint.verify_checkpoint(checkpoints / checkpoint.step_tag(1), run_id=read_run_id(output))

    output = tmp_path / "skip"
    with pytest.raises(TrainingError, match=r"step 4: 3 of the last 4 .*skipped.*max_skipped_share=0.5"):
        run(tmp_path, tiny_tree, output, "--set", "optim.lr=1e6", "--set", "train.nonfinite=skip",
            "--set", "train.skip_window=4", train={"max_steps": 8, "keep_checkpoints": 8})
    state = checkpoint.latest_tag(output / "checkpoints")
    assert state == checkpoint.step_tag(3)  # step 4 stopped the run before its save


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path, tiny_tree, world_of_one):
    # One checkpoint of the test model is about 0.5 MiB: the first fits, the second does not.
    with tmpfs(tmp_path / "disk", "900k") as disk:
        output = disk / "run"
        with pytest.raises(StorageError) as raised:
            run(tmp_path, tiny_tree, output, train={"max_steps": 4, "keep_checkpoints": 4})
        message = str(raised.value)
        assert "checkpoints/step_0000000" in message and "the file system is full" in message
        assert "a checkpoint of this run takes about" in message
        checkpoints = output / "checkpoints"
        latest = checkpoint.latest_tag(checkpoints)
        folders = sorted(p.name for p in checkpoints.iterdir() if p.is_dir())
        assert folders == [latest], f"partial checkpoints left behind: {folders}"
        assert not [p for p in disk.rglob(".*") if p.name != LOCK_FILE], "staging files left behind"
        checkpoint.verify_checkpoint(checkpoints / latest, run_id=read_run_id(output))

        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        run(tmp_path, tiny_tree, output, "--resume", train={"max_steps": 4, "keep_checkpoints": 4})
        assert checkpoint.latest_tag(checkpoints) == checkpoint.step_tag(4)
        assert (output / "export" / "model.safetensors").is_file()


def test_a_full_disk_during_an_export_keeps_the_previous_export(tmp_path):
    model = build_segformer("test", list(LOVEDA_CLASSES))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.25, 0.25, 0.25)}
    export_bytes = sum(t.numel() * t.element_size() for t in state.values())
    with tmpfs(tmp_path / "disk", f"{(export_bytes * 3 // 2) // 1024}k") as disk:
        write_hf_export(model, state, disk / "export", **stats)
        before = snapshot(disk / "export")
        # The replacement must be staged beside the previous export, which leaves no room for it.
        with pytest.raises(StorageError, match=rf"writing the export {disk / 'export'} failed.* free on that file "
                                               rf"system; the export needs about .*Nothing was replaced"):
            write_hf_export(model, state, disk / "export", **stats)
        assert snapshot(disk / "export") == before
        assert sorted(p.name for p in disk.iterdir()) == ["export"], "staging left behind"


def test_resume_loads_only_this_runs_unchanged_checkpoints(tmp_path, tiny_tree, world_of_one):
    mine, other = tmp_path / "mine", tmp_path / "other"
    run(tmp_path, tiny_tree, mine, train={"max_steps": 2})
    run(tmp_path, tiny_tree, other, train={"max_steps": 2})
    tag = checkpoint.step_tag(2)
    pickled = next((mine / "checkpoints" / tag).glob("*model_states.pt"))
    original = pickled.read_bytes()

    pickled.write_bytes(original + b"\0")
    with pytest.raises(CheckpointError, match=rf"{pickled} changed since the run wrote it"):
        run(tmp_path, tiny_tree, mine, "--resume", train={"max_steps": 3})
    pickled.write_bytes(original)

    # Another run's checkpoint dropped in, with its manifest: refused before DeepSpeed unpickles it.
    shutil.rmtree(mine / "checkpoints" / tag)
    shutil.copytree(other / "checkpoints" / tag, mine / "checkpoints" / tag)
    with pytest.raises(CheckpointError, match=rf"written by run '{read_run_id(other)}', not by the run"):
        run(tmp_path, tiny_tree, mine, "--resume", train={"max_steps": 3})

    # A directory without the run marker is never resumed, whatever its checkpoints.
    (other / "run.json").unlink()
    with pytest.raises(OutputDirectoryError, match="holds no run"):
        run(tmp_path, tiny_tree, other, "--resume", train={"max_steps": 3})
    assert os.path.isdir(other / "checkpoints" / tag)
