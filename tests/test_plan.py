"""The plan runner: the plan file is checked up front, the phase-2 decision follows the rule, and a reduced
CPU plan runs end to end, is stopped in phase 2 and resumed without repeating finished phases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_sam import save_tiny_sam

from conftest import REPO, subprocess_env, tiny_run_config, write_config
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.report import read_report
from mapsage_ds.tracks.plan_runner import PhaseFailed, PlanRunner
from mapsage_ds.tracks.plan_spec import StabilityRule, read_plan
from mapsage_ds.tracks.stability import instability

EVALUATION = {"split": "Val", "weights": "export", "mode": "whole", "boundary_width": 3, "max_images": 4}


def write_plan(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_plan_file_is_checked_before_anything_runs(tmp_path):
    bad = {"tracks": [{"name": "a", "recipe": "demo", "phase2_recipe": "demo_fulll"},
                      {"name": "a", "recipe": "demo"}],
           "phase2": {"distill": {"teacher_track": "dinov3", "recipe": "demo", "weights": "last"}},
           "tta_sweep": {"flips": ["h", "x"]},
           "ensemble": {"weights": "softmax", "top": -1},
           "refine": {"model": str(tmp_path / "no_sam")},
           "cards": [0, 0]}
    with pytest.raises(ConfigError) as error:
        read_plan(write_plan(tmp_path / "plan.yaml", bad))
    message = str(error.value)
    for expected in ("track name 'a' is used twice", "track a: phase2_recipe: unknown recipe 'demo_fulll'",
                     "teacher_track='dinov3': not a track", "phase2.distill.weights='last'",
                     "tta_sweep: --tta-sweep flips=h,x: expected distinct values among h, v, hv, d4",
                     "ensemble.weights='softmax'", "ensemble.top=-1", "no_sam", "cards [0, 0]"):
        assert expected in message, (expected, message)
    with pytest.raises(ConfigError, match="did you mean 'phase2_recipe'"):
        read_plan(write_plan(tmp_path / "typo.yaml", {"tracks": [{"name": "a", "recipe": "demo",
                                                                  "phase2_recipie": "demo_full"}]}))
    with pytest.raises(ConfigError, match="recipe='demo' has task 'segment': expected a task: distill"):
        read_plan(write_plan(tmp_path / "task.yaml", {"tracks": [{"name": "a", "recipe": "demo"}],
                                                      "phase2": {"distill": {"teacher_track": "a", "recipe": "demo"}}}))


def test_example_plans_are_valid():
    for name in ("plan_v4.yaml", "plan_cpu_demo.yaml"):
        plan = read_plan(REPO / "docs" / name)
        assert plan.tracks and plan.evaluation.split == "Val"
    v4 = read_plan(REPO / "docs" / "plan_v4.yaml")
    assert v4.nproc == 8 and v4.phase2.distill.teacher_track in {t.name for t in v4.tracks}


def test_the_instability_rule_reads_each_condition():
    rule = StabilityRule(max_skipped_steps=0, max_val_drop=0.02, min_val_miou=0.3)
    rows = [{"step": 10, "kind": "train", "skipped_steps": 0}, {"step": 10, "kind": "val", "miou": 0.40},
            {"step": 20, "kind": "train", "skipped_steps": 0}, {"step": 20, "kind": "val", "miou": 0.39}]
    assert instability({"status": "ok"}, rows, rule) == []
    collapsed = rows + [{"step": 30, "kind": "train", "skipped_steps": 3}, {"step": 30, "kind": "val", "miou": 0.25}]
    reasons = instability({"status": "ok"}, collapsed, rule)
    assert len(reasons) == 2 and "skipped 3 optimizer steps" in reasons[0]
    assert "fell from 0.4000 (step 10) to 0.2500 (step 30)" in reasons[1]
    low = [{"step": 10, "kind": "val", "miou": 0.2}]
    assert instability({"status": "ok"}, low, rule) == ["its best validation mIoU 0.2000 stayed below 0.3"]
    failed = {"status": "failed", "failed_phase": "train", "error": "exit status 1: error: step 7: 30 of the last\n.."}
    assert instability(failed, rows, rule) == ["its training failed (exit status 1: error: step 7: 30 of the last)"]
    assert instability(failed, rows, StabilityRule(failed_training=False)) == []


def _runner_after_tracks(tmp_path: Path, plan_data: dict, tracks: dict[str, dict]) -> PlanRunner:
    """A runner whose tracks phase is recorded as done, with each track's status.json and metrics.jsonl."""
    tmp_path.mkdir()
    plan = read_plan(write_plan(tmp_path / "plan.yaml", {"output_dir": str(tmp_path / "out"), **plan_data}))
    runner = PlanRunner(plan, plan_text="", accelerator="cpu")
    rows = []
    for name, facts in tracks.items():
        run = tmp_path / "out" / "tracks" / name / "run"
        run.mkdir(parents=True)
        (run.parent / "status.json").write_text(json.dumps({"name": name, "status": facts.get("status", "ok")}))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts["rows"]))
        if facts.get("best"):
            (run / "best").mkdir()
            (run / "best" / "model.safetensors").write_bytes(b"")
        rows.append({"name": name, "status": "ok", "miou": facts["miou"], "weights": str(run / "export"),
                     "data_root": "/data"})
    rows.sort(key=lambda r: -r["miou"])
    runner.state = {"phases": {"tracks": {"status": "done", "result": {"tracks": rows}}}}
    return runner


def test_phase_two_is_the_champions_recipe_or_distillation_from_an_unstable_teacher(tmp_path):
    tracks = [{"name": "b5", "recipe": "demo", "overrides": ["model.size=test"], "phase2_recipe": "demo_full",
               "phase2_overrides": ["train.max_steps=50"]},
              {"name": "dino", "recipe": "demo", "overrides": ["model.arch=dinov3", "model.size=test"]}]
    plan = {"tracks": tracks, "cards": [0, 1, 2, 3],
            "phase2": {"distill": {"teacher_track": "dino", "recipe": "distill_demo",
                                   "overrides": ["distill.kl=0.5"]}}}
    steady = [{"step": 10, "kind": "val", "miou": 0.30}, {"step": 20, "kind": "val", "miou": 0.31}]
    runner = _runner_after_tracks(tmp_path / "stable", plan, {"b5": {"miou": 0.5, "rows": steady},
                                                              "dino": {"miou": 0.4, "rows": steady, "best": True}})
    status, _, decision = runner._phase_champion()
    assert (status, decision["champion"], decision["mode"], decision["recipe"]) == ("done", "b5", "finetune",
                                                                                    "demo_full")
    track = runner._phase2_track(decision)
    assert (track.name, track.recipe, track.command, track.cards) == ("b5_phase2", "demo_full", "finetune",
                                                                      [0, 1, 2, 3])
    assert track.overrides == ["model.size=test", "train.max_steps=50"]

    collapse = [{"step": 10, "kind": "val", "miou": 0.45}, {"step": 20, "kind": "val", "miou": 0.20}]
    runner = _runner_after_tracks(tmp_path / "unstable", plan, {"b5": {"miou": 0.5, "rows": steady},
                                                                "dino": {"miou": 0.2, "rows": collapse, "best": True}})
    _, note, decision = runner._phase_champion()
    assert decision["mode"] == "distill" and "fell from 0.4500" in note
    track = runner._phase2_track(decision)
    teacher = tmp_path / "unstable" / "out" / "tracks" / "dino" / "run" / "best"
    assert (track.name, track.recipe, track.command) == ("distill_dino", "distill_demo", "distill")
    assert track.overrides == ["distill.kl=0.5", f"teacher.path={json.dumps(str(teacher))}"]

    runner = _runner_after_tracks(tmp_path / "no_weights", plan, {"b5": {"miou": 0.5, "rows": steady},
                                                                  "dino": {"miou": 0.2, "rows": collapse}})
    with pytest.raises(PhaseFailed, match="left no best/ weights to distil from"):
        runner._phase_champion()


def run_plan(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "run_plan.py"), *args], env=subprocess_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=900)


def wait_for(condition, *, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def phases(out: Path) -> dict[str, dict]:
    path = out / "plan_state.json"
    return json.loads(path.read_text())["phases"] if path.is_file() else {}


@pytest.mark.slow
def test_a_reduced_cpu_plan_runs_end_to_end_and_resumes_after_a_stop_without_repeating_phases(tmp_path, tiny_tree):
    train = {"max_steps": 4, "eval_every": 2, "save_every": 2, "log_every": 1}
    segformer = write_config(tmp_path / "segformer.yaml",
                             tiny_run_config(tiny_tree, tmp_path / "unused", train=train, data={"synthetic": None}))
    dinov3 = write_config(tmp_path / "dinov3.yaml",
                          tiny_run_config(tiny_tree, tmp_path / "unused", train=train, data={"synthetic": None},
                                          model={"arch": "dinov3", "size": "test"}))
    out = tmp_path / "plan"
    plan = write_plan(tmp_path / "plan.yaml", {
        "output_dir": str(out), "processes": 1, "evaluation": EVALUATION,
        "health": {"args": ["--only", "1"]},
        "tracks": [{"name": "segformer", "config": str(segformer), "processes": 1, "phase2_recipe": "demo_full"},
                   {"name": "dinov3", "config": str(dinov3), "processes": 1}],
        # The rule's threshold is out of reach of a 4-step model: phase 2 distils, deterministically.
        "phase2": {"distill": {"teacher_track": "dinov3", "recipe": "distill_demo", "config": str(segformer),
                               "overrides": ["train.max_steps=8"], "unstable_when": {"min_val_miou": 0.999}}},
        "tta_sweep": {"scales": [1.0, 1.5], "flips": ["h"]},
        "refine": {"model": str(save_tiny_sam(tmp_path / "sam"))},
        "ensemble": {"top": 2}})

    # Stopped (SIGTERM, as a scheduler does) once phase 2 has written its first checkpoint.
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "run_plan.py"), str(plan)],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        latest = out / "phase2" / "distill_dinov3" / "run" / "checkpoints" / "latest"
        wait_for(lambda: latest.is_file() or process.poll() is not None, timeout=600, what="phase 2's checkpoint")
        os.kill(process.pid, signal.SIGTERM)
        first_output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, first_output[-4000:]
    state = phases(out)
    assert [state[p]["status"] for p in ("health", "tracks", "champion", "phase2")] == ["done"] * 3 + ["running"]
    assert state["champion"]["result"]["mode"] == "distill" and "stayed below 0.999" in state["champion"]["note"]
    kept = {log: log.stat().st_mtime_ns for log in [out / "health" / "health.log", *out.glob("tracks/*/*.log")]}
    assert len(kept) == 5

    resumed = run_plan([str(plan), "--resume"])
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    for phase in ("health", "tracks", "champion"):
        assert f"[{phase}] done in an earlier run" in resumed.stdout
    assert {log: log.stat().st_mtime_ns for log in kept} == kept, "a finished phase ran again"
    state = phases(out)
    assert all(state[p]["status"] == "done" for p in state) and len(state) == 7
    assert state["phase2"]["attempt"] == 2
    assert "resumed from step" in (out / "phase2" / "distill_dinov3" / "train.log").read_text()

    # The report's figures are those of each phase's own evaluation.
    report = json.loads((out / "report.json").read_text())
    board = {row["kind"]: row for row in report["leaderboard"]}
    tracks = {row["name"]: row for row in json.loads((out / "tracks" / "leaderboard.json").read_text())["tracks"]}
    scores = {name: row["miou"] for name, row in tracks.items()} | {"distill_dinov3": board["phase 2"]["miou"]}
    champion = max(scores, key=scores.get)
    assert board["phase 2"]["miou"] == read_report(out / "phase2" / "distill_dinov3" / "eval")["miou"]
    sweep = json.loads((out / "tta_sweep" / "eval" / "tta_sweep.json").read_text())
    assert sweep["protocols"] == 6 and board["tta"]["miou"] == sweep["leaderboard"][0]["miou"]
    assert board["tta"]["entry"].startswith(f"{champion} + TTA ")
    refined = read_report(out / "refine" / "eval")
    # The refinement ran with the protocol the sweep chose: its unrefined score is the sweep's, computed apart.
    assert refined["before_refinement"]["miou"] == sweep["leaderboard"][0]["miou"]
    assert refined["protocol"]["tta_scales"] == sweep["leaderboard"][0]["protocol"]["tta_scales"]
    ensemble = read_report(out / "ensemble" / "eval")
    assert board["ensemble"]["miou"] == ensemble["miou"] and len(ensemble["protocol"]["ensemble"]) == 2
    assert sum(m["weight"] for m in ensemble["protocol"]["ensemble"]) == pytest.approx(1.0, abs=1e-3)
    assert report["leaderboard"][0]["miou"] == max(row["miou"] for row in report["leaderboard"])
    assert report["predict_command"].startswith("mapsage-predict ") and "--input SCENES" in report["predict_command"]
    markdown = (out / "report.md").read_text()
    assert "## Leaderboard" in markdown and "| ensemble |" in markdown and "| tta_sweep | done |" in markdown

    # Another fresh plan into the same directory is refused; a changed plan cannot resume it.
    again = run_plan([str(plan)])
    assert again.returncode == 2 and "already holds run" in again.stderr and "Traceback" not in again.stderr
    changed = write_plan(tmp_path / "changed.yaml", {**yaml.safe_load(plan.read_text()), "ensemble": {"top": 3}})
    refused = run_plan([str(changed), "--resume"])
    assert refused.returncode == 2 and "the plan differs" in refused.stderr and "changed: ensemble" in refused.stderr
