"""scripts/health_check.py on 2 real processes: devices and collectives checked across ranks, exit codes, JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env, tiny_run_config, write_config
from mapsage_ds.health import CHECK_NAMES

pytestmark = pytest.mark.slow
FAKE_TORCH_GCU = REPO / "tests" / "fake_torch_gcu"
SMALL = ["--matmul-size", "64", "--collective-mb", "0.25", "--sample", "4"]


def run_health(args: list[str], *, env: dict[str, str] | None = None) -> tuple[int, str]:
    """torchrun 2 processes of health_check.py; returns its exit status and output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "scripts" / "health_check.py"), *args]
    result = subprocess.run(command, env={**subprocess_env(), **(env or {})}, cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def by_name(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["results"]}


def test_all_checks_pass_on_two_gcu_standin_ranks(tmp_path, tiny_tree):
    config = write_config(tmp_path / "run.yaml", tiny_run_config(tiny_tree, tmp_path / "run",
                                                                 eval={"boundary_width": 3}))
    tracks = tmp_path / "tracks.yaml"
    tracks.write_text("evaluation: {boundary_width: 3}\ntracks: []\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_TORCH_GCU), os.environ.get("PYTHONPATH")])),
           "MAPSAGE_ACCELERATOR": "gcu", "FAKE_GCU_DEVICE_COUNT": "2"}
    code, output = run_health(["--config", str(config), "--expect-device", "gcu", "--final-eval", str(tracks),
                               "--overfit-steps", "40", "--overfit-lr", "2e-2", "--overfit-images", "1",
                               "--overfit-miou", "0.3", *SMALL], env=env)
    assert code == 0, output[-6000:]
    report = json.loads((tmp_path / "run" / "health_check.json").read_text())
    results = by_name(report)
    assert list(results) == list(CHECK_NAMES)
    assert report["ok"] and report["world_size"] == 2 and report["backend"] == "eccl"
    assert not [r for r in results.values() if r["status"] == "FAIL"]
    # One printed line per check, then the summary.
    printed = [line for line in output.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")]
    assert [line.split()[1] for line in printed] == list(CHECK_NAMES)

    devices = results["preflight.devices"]
    assert devices["status"] == "PASS"
    assert sorted(r["device_index"] for r in devices["details"]["ranks"]) == [0, 1]
    assert {r["device_type"] for r in devices["details"]["ranks"]} == {"gcu"}
    collectives = results["preflight.collectives"]
    assert collectives["status"] == "PASS" and collectives["details"]["busbw_gbps"]["all_reduce"] > 0
    assert {r["backend"] for r in collectives["details"]["ranks"]} == {"eccl"}
    assert results["3.overfit"]["details"]["ratio"] >= 2


def test_a_cpu_fallback_fails_the_device_and_collective_checks(tmp_path, tiny_tree):
    config = write_config(tmp_path / "run.yaml", tiny_run_config(tiny_tree, tmp_path / "run"))
    report_path = tmp_path / "health.json"
    code, output = run_health(["--config", str(config), "--expect-device", "gcu", "--only", "preflight",
                               "--report", str(report_path), *SMALL], env={"MAPSAGE_ACCELERATOR": "cpu"})
    assert code == 1, output[-6000:]
    results = by_name(json.loads(report_path.read_text()))
    assert list(results) == [name for name in CHECK_NAMES if name.startswith("preflight.")]
    assert results["preflight.devices"]["status"] == "FAIL"
    assert "expected gcu" in results["preflight.devices"]["message"]
    assert results["preflight.collectives"]["status"] == "FAIL"
    assert "expected eccl" in results["preflight.collectives"]["message"]
    assert results["preflight.data_files"]["status"] == "PASS"
