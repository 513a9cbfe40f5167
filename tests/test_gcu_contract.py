"""Contract test of the GCU accelerator: a real 2-process ZeRO-2 run against the stand-in ``torch_gcu``.

The stand-in (``tests/fake_torch_gcu``) keeps tensors on the CPU and runs ``eccl`` on gloo, so
this proves what ``mapsage_ds`` and DeepSpeed do with the ``torch.gcu`` API and the ``eccl``
backend name, not that kernels or collectives work on Enflame cards (see docs/accelerators.md).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from safetensors.torch import load_file

from conftest import REPO, launch, tiny_run_config, write_config
from mapsage_ds.runtime.accelerator import REPORT_PREFIX

pytestmark = pytest.mark.slow
FAKE_TORCH_GCU = REPO / "tests" / "fake_torch_gcu"


def rank_reports(output: str) -> dict[int, dict]:
    """The ``[mapsage_ds.runtime.accelerator]`` report of each rank, by rank."""
    reports = [json.loads(match) for match in re.findall(re.escape(REPORT_PREFIX) + r"(\{[^{}]*\})", output)]
    by_rank = {report["rank"]: report for report in reports}
    assert len(by_rank) == len(reports), f"a rank reported twice: {reports}"
    return by_rank


def test_zero2_training_on_two_processes_runs_on_the_gcu_accelerator(tmp_path, tiny_tree, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_TORCH_GCU), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MAPSAGE_ACCELERATOR", "gcu")
    monkeypatch.setenv("FAKE_GCU_DEVICE_COUNT", "2")
    monkeypatch.delenv("TOPS_VISIBLE_DEVICES", raising=False)
    run = tmp_path / "run"
    train = {"max_steps": 2, "eval_every": 2, "save_every": 2, "deepspeed": "zero2_fp32"}
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_tree, run, train=train))

    output = launch("finetune.py", ["--config", str(config)], nproc=2, launcher="deepspeed")

    reports = rank_reports(output)
    assert sorted(reports) == [0, 1]
    for rank, report in reports.items():
        assert report["deepspeed_accelerator"] == "mapsage_ds.runtime.gcu.GCUAccelerator", report
        assert report["deepspeed_accelerator_name"] == "gcu"
        assert report["backend"] == "eccl"
        assert report["local_rank"] == report["device_index"] == report["current_device"] == rank
        assert report["device_count"] == 2
        # The stand-in keeps tensors on the host and says so in its version; a real card reads gcu:N.
        assert report["vendor_version"].endswith("+standin") and report["device"] == "cpu"
    assert "2 process(es)" in output and "ZeRO-2" in output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    weights = load_file(run / "export" / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
