"""An installed copy works on its own: the wheel carries ds_configs/, the recipes and the console scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel and installed into a target directory (not the source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    # A copy of the source tree, so that no build/ left behind by another build can leak into the wheel.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "runs", "data",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(source)], check=True)
    (wheel,) = (root / "dist").glob("mapsage_ds-*.whl")
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    return target


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = str(target)
    return env


def test_the_wheel_holds_the_resources_and_imports_from_its_install(installed, tmp_path):
    code = ("import mapsage_ds, json; from mapsage_ds.runtime.engine import ds_config_names, read_ds_config; "
            "from mapsage_ds.config import recipe_names; "
            "print(json.dumps([mapsage_ds.__file__, ds_config_names(), recipe_names(), "
            "read_ds_config('zero2_fp32')['zero_optimization']['stage']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed), check=True,
                         capture_output=True, text=True).stdout
    module_file, configs, recipes, stage = json.loads(out.strip().splitlines()[-1])
    assert Path(module_file).is_relative_to(installed)
    assert {f"zero{s}_{p}" for s in (1, 2, 3) for p in ("fp32", "bf16", "fp16")} <= set(configs)
    assert "demo" in recipes and stage == 2
    assert sorted(p.name for p in (installed / "bin").iterdir()) == sorted(
        f"mapsage-{c}" for c in ("finetune", "distill", "evaluate", "predict", "plan", "health", "tracks",
                                 "leaderboard", "convert", "run-plan"))


def test_mapsage_finetune_from_an_empty_directory_runs_to_an_export(installed, tmp_path):
    result = subprocess.run([str(installed / "bin" / "mapsage-finetune"), "--recipe", "demo",
                             "--set", "train.max_steps=2",
                             # The demo warms up for 20 steps, and a warmup must fit inside the run.
                             "--set", "optim.warmup_steps=1"],
                            cwd=tmp_path, env=_env(installed), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    export = tmp_path / "runs" / "demo" / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    assert json.loads((export / "metrics.json").read_text())["step"] == 2
    assert (tmp_path / "data" / "demo_loveda").is_dir()  # generated beside the run, not in the source tree
