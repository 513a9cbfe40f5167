"""Tracks: the file is checked up front; two tracks train concurrently, are scored alike, and survive a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, subprocess_env, tiny_run_config, write_config
from mapsage_ds.config import load_config
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.report import read_report
from mapsage_ds.health import Status
from mapsage_ds.health.consistency import check_evaluation_consistency, read_final_eval
from mapsage_ds.tracks.launch import launch_command, train_args
from mapsage_ds.tracks.spec import TracksConfig, TrackSpec, read_tracks_config

EVALUATION = {"split": "Val", "mode": "slide", "tile": 96, "stride": 64, "boundary_width": 3, "max_images": 4}


def write_tracks(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_tracks_file_is_checked_before_anything_runs(tmp_path):
    overlapping = {"tracks": [{"name": "a", "recipe": "demo", "cards": [0, 1, 2, 3]},
                              {"name": "a", "recipe": "demo", "cards": [3, 4]},
                              {"name": "c", "cards": [5], "processes": 2}],
                   "evaluation": {"split": "Test", "stride": 1024, "tile": 512}}
    with pytest.raises(ConfigError) as error:
        read_tracks_config(write_tracks(tmp_path / "t.yaml", overlapping))
    message = str(error.value)
    for expected in ("card 3 is in tracks a and a", "track name 'a' is used twice", "track c: give a recipe",
                     "track c: processes=2 but 1 cards", "evaluation.split='Test'", "stride"):
        assert expected in message, message
    with pytest.raises(ConfigError, match="did you mean 'overrides'"):
        read_tracks_config(write_tracks(tmp_path / "u.yaml", {"tracks": [{"name": "a", "recipe": "demo",
                                                                          "override": ["x=1"]}]}))


def test_card_groups_become_the_runtime_variable_and_a_port_per_track():
    gcu = launch_command("finetune", ["--recipe", "demo"], nproc=4, cards=[4, 5, 6, 7], accelerator="gcu",
                         launcher="deepspeed", master_port=29511)
    assert gcu.env["TOPS_VISIBLE_DEVICES"] == "4,5,6,7" and "--num_gpus=4" in gcu.command
    assert "--master_port=29511" in gcu.command and not any(a.startswith("--include") for a in gcu.command)
    torchrun = launch_command("evaluate", [], nproc=4, cards=[4, 5, 6, 7], accelerator="gcu",
                              launcher="torchrun", master_port=29512)
    assert torchrun.env["TOPS_VISIBLE_DEVICES"] == "4,5,6,7" and "--nproc_per_node=4" in torchrun.command
    assert "--master_port=29512" in torchrun.command
    cpu = launch_command("finetune", [], nproc=1, cards=None, accelerator="cpu", launcher="deepspeed",
                         master_port=29513)
    assert "--num_gpus=1" in cpu.command and cpu.env == {"MAPSAGE_ACCELERATOR": "cpu"}
    with pytest.raises(ConfigError, match="processes: N"):
        launch_command("finetune", [], nproc=2, cards=[0, 1], accelerator="cpu", launcher="torchrun",
                       master_port=29514)


def test_a_track_validates_with_the_leaderboard_protocol(tmp_path, tiny_tree):
    tracks = write_tracks(tmp_path / "t.yaml", {"evaluation": EVALUATION, "tracks": [{"name": "a", "recipe": "demo"}]})
    config = read_tracks_config(tracks)
    args = train_args(config.tracks[0], config, tmp_path / "run")
    overrides = [value for flag, value in zip(args, args[1:]) if flag == "--set"]
    resolved = load_config(recipe="demo", overrides=[*overrides, f"data.root={tiny_tree}"])
    final, source = read_final_eval(tracks)
    assert check_evaluation_consistency(resolved.eval, final, final_source=source).status is Status.PASS
    assert (resolved.eval.mode, resolved.eval.tile, resolved.eval.boundary_width) == ("slide", 96, 3)


def test_example_tracks_files_are_valid():
    for name in ("tracks.yaml", "tracks_cpu_demo.yaml"):
        config = read_tracks_config(REPO / "docs" / name)
        assert isinstance(config, TracksConfig) and all(isinstance(t, TrackSpec) for t in config.tracks)


def run_tracks(args: list[str]) -> tuple[int, str]:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "run_tracks.py"), *args], env=subprocess_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.slow
def test_two_tracks_run_concurrently_are_scored_alike_and_survive_a_failing_track(tmp_path, tiny_tree):
    train = {"max_steps": 2, "eval_every": 2, "save_every": 2}
    configs = [write_config(tmp_path / f"{n}.yaml", tiny_run_config(tiny_tree, tmp_path / "unused", train=train,
                                                                      optim={"lr": lr, "warmup_steps": 0}))
               for n, lr in (("a", 1e-3), ("b", 3e-3))]
    out = tmp_path / "tracks"
    tracks = write_tracks(tmp_path / "tracks.yaml", {
        "output_dir": str(out), "evaluation": EVALUATION,
        "tracks": [{"name": "a", "config": str(configs[0]), "processes": 1},
                   {"name": "b", "config": str(configs[1]), "processes": 1},
                   {"name": "broken", "config": str(configs[0]), "data_root": str(tmp_path / "no_such_root")}]})

    code, output = run_tracks([str(tracks)])
    assert code == 1, output[-4000:]  # one track failed
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {row["name"]: row for row in board["tracks"]}
    assert [row["name"] for row in board["tracks"]][-1] == "broken"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["failed_phase"] == "train"
    assert "error: LoveDA root not found" in rows["broken"]["error"] and "no_such_root" in rows["broken"]["error"]

    statuses = {name: json.loads((out / name / "status.json").read_text()) for name in ("a", "b")}
    ports = {s["master_port"] for s in statuses.values()}
    assert len(ports) == 2
    # Concurrent: each track started training before the other finished it.
    starts = {n: s["started"] for n, s in statuses.items()}
    ends = {n: s["started"] + s["train_wall_s"] for n, s in statuses.items()}
    assert starts["a"] < ends["b"] and starts["b"] < ends["a"]
    for name in ("a", "b"):
        row = rows[name]
        assert row["status"] == "ok" and row["train_wall_s"] > 0 and row["processes"] == 1
        assert (out / name / "train.log").is_file() and (out / name / "eval.log").is_file()
        # The leaderboard holds the numbers of the track's own evaluation report, done with the one protocol,
        # and the track's validation during training used the same protocol.
        report = read_report(out / name / "eval")
        assert row["miou"] == report["miou"] and list(row["iou"].values()) == report["iou"]
        assert report["protocol"] == {"mode": "slide", "tile": 96, "stride": 64, "tta_scales": [1.0], "tta_flip": [],
                                      "window_batch_size": 8, "batch_size": 1, "max_images": 4, "boundary_width": 3,
                                      "boundary_dilation_ratio": 0.02, "ensemble": [], "refine": None}
        assert report["boundary"]["width"] == 3 and report["num_images"] == 4
        resolved = yaml.safe_load((out / name / "run" / "config.yaml").read_text())
        assert resolved["eval"]["mode"] == "slide" and resolved["eval"]["tile"] == 96
    markdown = (out / "leaderboard.md").read_text()
    assert "| broken | FAILED (train)" in markdown and "slide 96/64" in markdown
    assert markdown.index("/a/run/export") > 0 and markdown.index("/b/run/export") > 0

    # Rebuild the leaderboard from the existing runs: evaluated again, same numbers.
    before = {name: rows[name]["miou"] for name in ("a", "b")}
    code, output = run_tracks([str(tracks), "--leaderboard-only"])
    assert code == 1, output[-4000:]
    again = {row["name"]: row for row in json.loads((out / "leaderboard.json").read_text())["tracks"]}
    assert {name: again[name]["miou"] for name in ("a", "b")} == before
    assert again["a"]["train_wall_s"] == rows["a"]["train_wall_s"]
    assert again["broken"]["failed_phase"] == "eval" and "no trained weights" in again["broken"]["error"]
