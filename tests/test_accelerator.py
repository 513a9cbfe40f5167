"""Device detection, overrides, LOCAL_RANK binding and the loud failures of ``mapsage_ds.runtime.accelerator``.

GCU cases run against the stand-in ``torch_gcu`` of ``tests/fake_torch_gcu`` (and the old
XLA-style one of ``tests/fake_torch_gcu_legacy``), put on the import path per test and unimported
afterwards. CUDA is absent here; where the detection order needs it present,
``torch.cuda.is_available`` is patched, the only stand-in for CUDA in these tests.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import pytest
import torch
from deepspeed.accelerator import real_accelerator

from conftest import REPO, subprocess_env
from mapsage_ds.errors import AcceleratorError
from mapsage_ds.runtime.accelerator import (
    bind_local_device,
    check_card_selection,
    detect_accelerator,
    install_deepspeed_accelerator,
)

FAKE_TORCH_GCU = REPO / "tests" / "fake_torch_gcu"
LEGACY_TORCH_GCU = REPO / "tests" / "fake_torch_gcu_legacy"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("MAPSAGE_ACCELERATOR", "TOPS_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "FAKE_GCU_DEVICE_COUNT"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def vendor(monkeypatch):
    """``vendor(path)`` makes the ``torch_gcu`` under ``path`` importable; it is unimported after the test.

    The stand-in's ``eccl`` process-group backend stays registered in this process (torch cannot
    unregister one); the missing-backend test therefore runs in a subprocess.
    """
    def install(path):
        monkeypatch.syspath_prepend(str(path))
        importlib.invalidate_caches()

    previous = real_accelerator.ds_accelerator
    yield install
    real_accelerator.ds_accelerator = previous
    for name in ("torch_gcu", "torch.gcu"):
        sys.modules.pop(name, None)
    if hasattr(torch, "gcu"):
        delattr(torch, "gcu")


def gcu_accelerator():
    from mapsage_ds.runtime.gcu import GCUAccelerator

    return GCUAccelerator()


def test_detection_order_is_gcu_then_cuda_then_cpu(vendor, monkeypatch):
    assert detect_accelerator() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect_accelerator() == "cuda"
    vendor(FAKE_TORCH_GCU)
    assert detect_accelerator() == "gcu"


def test_argument_overrides_environment_overrides_detection(vendor, monkeypatch):
    vendor(FAKE_TORCH_GCU)
    monkeypatch.setenv("MAPSAGE_ACCELERATOR", "cpu")
    assert detect_accelerator() == "cpu"
    assert detect_accelerator("gcu") == "gcu"
    monkeypatch.setenv("MAPSAGE_ACCELERATOR", "gcu")
    assert detect_accelerator() == "gcu"
    assert detect_accelerator("cpu") == "cpu"


def test_unknown_accelerator_is_an_error(monkeypatch):
    with pytest.raises(AcceleratorError, match=r"--accelerator: unknown accelerator 'tpu'.*gcu, cuda, cpu"):
        detect_accelerator("tpu")
    monkeypatch.setenv("MAPSAGE_ACCELERATOR", "npu")
    with pytest.raises(AcceleratorError, match="MAPSAGE_ACCELERATOR: unknown accelerator 'npu'"):
        detect_accelerator()


def test_requested_device_that_is_absent_is_an_error():
    with pytest.raises(AcceleratorError, match="torch_gcu package is not installed.*PyTorch-2 torch_gcu"):
        detect_accelerator("gcu")
    if not torch.cuda.is_available():
        with pytest.raises(AcceleratorError, match=r"'cuda' was requested but torch.cuda.is_available\(\) is False"):
            detect_accelerator("cuda")


def test_torch_gcu_without_cards_is_an_error_unless_another_device_is_chosen(vendor, monkeypatch):
    vendor(FAKE_TORCH_GCU)
    monkeypatch.setenv("FAKE_GCU_DEVICE_COUNT", "0")
    with pytest.raises(AcceleratorError, match=r"is_available\(\) is False.*--accelerator cpu"):
        detect_accelerator()
    with pytest.raises(AcceleratorError, match=r"is_available\(\) is False"):
        detect_accelerator("gcu")
    assert detect_accelerator("cpu") == "cpu"


def test_older_xla_torch_gcu_is_refused(vendor):
    vendor(LEGACY_TORCH_GCU)
    for requested in (None, "gcu"):
        with pytest.raises(AcceleratorError, match=r"torch_gcu 1\.10\.0 .*XLA-style.*older T20 stack.*PyTorch-2"):
            detect_accelerator(requested)


def test_each_local_rank_binds_its_own_card(vendor, monkeypatch):
    vendor(FAKE_TORCH_GCU)
    monkeypatch.setenv("FAKE_GCU_DEVICE_COUNT", "4")
    accel = gcu_accelerator()
    for local_rank in (2, 0, 3, 1):
        device, index = bind_local_device(accel, local_rank)
        assert index == local_rank == accel.current_device() == torch.gcu.current_device()
        assert device == torch.device("cpu")  # the stand-in keeps tensors on the host


def test_local_rank_beyond_the_visible_cards_is_an_error(vendor, monkeypatch):
    vendor(FAKE_TORCH_GCU)
    monkeypatch.setenv("FAKE_GCU_DEVICE_COUNT", "8")
    monkeypatch.setenv("TOPS_VISIBLE_DEVICES", "2,5")
    accel = gcu_accelerator()
    assert bind_local_device(accel, 1)[1] == 1
    with pytest.raises(AcceleratorError, match=r"LOCAL_RANK=2 but only 2 gcu device\(s\) .*TOPS_VISIBLE_DEVICES=2,5"):
        bind_local_device(accel, 2)


def test_card_selection_the_gcu_runtime_would_ignore_is_an_error(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")  # what `deepspeed --include localhost:4,5` sets
    with pytest.raises(AcceleratorError, match="set TOPS_VISIBLE_DEVICES=4,5 and launch with --num_gpus 2"):
        check_card_selection("gcu")
    check_card_selection("cuda")
    monkeypatch.setenv("TOPS_VISIBLE_DEVICES", "4,5")
    check_card_selection("gcu")
    monkeypatch.delenv("TOPS_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # what `deepspeed --num_gpus 2` sets
    check_card_selection("gcu")


def test_gcu_accelerator_is_a_complete_deepspeed_accelerator(vendor, monkeypatch):
    vendor(FAKE_TORCH_GCU)
    monkeypatch.setenv("FAKE_GCU_DEVICE_COUNT", "2")
    accel = gcu_accelerator()
    real_accelerator._validate_accelerator(accel)
    assert not type(accel).__abstractmethods__
    assert (accel._name, accel.communication_backend_name()) == ("gcu", "eccl")
    assert accel.visible_devices_envs() == ["TOPS_VISIBLE_DEVICES"]
    env = {}
    accel.set_visible_devices_envs(env, [4, 5])
    assert env == {"TOPS_VISIBLE_DEVICES": "4,5"}
    assert accel.create_op_builder("FusedAdamBuilder") is None and accel.get_op_builder("CPUAdamBuilder") is None
    assert accel.device_count() == 2 and accel.is_available()
    assert torch.bfloat16 in accel.supported_dtypes()
    assert accel.total_memory(0) > 0 and accel.memory_allocated(1) == 0
    # Stand-in: tensors on the host, which is a synchronous device.
    assert accel.current_device_name() == "cpu" and accel.on_accelerator(torch.zeros(1))
    assert accel.is_synchronized_device()
    # RNG calls reach torch.gcu's per-card generator.
    accel.set_device(1)
    accel.manual_seed(7)
    state = accel.get_rng_state()
    first = torch.rand(4, generator=accel.default_generator(1))
    accel.set_rng_state(state)
    assert torch.equal(torch.rand(4, generator=accel.default_generator(1)), first)
    assert accel.initial_seed() == 7


def test_installing_gcu_makes_deepspeed_report_it(vendor):
    vendor(FAKE_TORCH_GCU)
    installed = install_deepspeed_accelerator("gcu")
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator() is installed and type(installed).__name__ == "GCUAccelerator"


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = subprocess_env()
    environment.update(PYTHONPATH=str(FAKE_TORCH_GCU), **env)
    return subprocess.run([sys.executable, "-c", code], env=environment, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_missing_collective_backend_is_an_error():
    result = _run_python("from mapsage_ds.runtime.accelerator import setup_distributed; setup_distributed()",
                         MAPSAGE_ACCELERATOR="gcu", FAKE_GCU_ECCL="0", FAKE_GCU_DEVICE_COUNT="1")
    assert result.returncode != 0
    assert "AcceleratorError: collective backend 'eccl' is not available" in result.stderr, result.stderr[-3000:]


RANK_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from mapsage_ds.runtime.accelerator import setup_distributed
ctx = setup_distributed()
indices = [None] * ctx.world_size
dist.all_gather_object(indices, ctx.device_index)
total = torch.tensor([ctx.rank + 1.0], device=ctx.device)
dist.all_reduce(total)
sys.stdout.write("RESULT " + json.dumps({"rank": ctx.rank, "indices": indices, "sum": total.item(),
                                         "backend": dist.get_backend()}) + "\n")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_torchrun_ranks_bind_distinct_cards_and_reduce_over_eccl(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    environment = subprocess_env()
    environment.update(PYTHONPATH=str(FAKE_TORCH_GCU), MAPSAGE_ACCELERATOR="gcu", FAKE_GCU_DEVICE_COUNT="2")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=environment, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    results = [json.loads(match) for match in re.findall(r"RESULT (\{[^{}]*\})", result.stdout)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r == {"rank": r["rank"], "indices": [0, 1], "sum": 3.0, "backend": "eccl"}


def test_gcu_exports_enflame_variables_and_compiles_as_enflame_advises(vendor, monkeypatch):
    from torch._dynamo.backends import registry

    from mapsage_ds.runtime.gcu import default_compile_backend

    vendor(FAKE_TORCH_GCU)
    monkeypatch.setenv("FAKE_GCU_DEVICE_COUNT", "2")
    monkeypatch.delenv("TORCHGCU_INDUCTOR_ENABLE", raising=False)
    accel = gcu_accelerator()
    exported = accel.export_envs()
    for name in ("ECCL_SOCKET_IFNAME", "TOPS_VISIBLE_DEVICES", "TORCH_ECCL_AVOID_RECORD_STREAMS",
                 "TORCHGCU_INDUCTOR_ENABLE", "PYTORCH_GCU_ALLOC_CONF", "EFRT_STREAM_SYNC_USE_POLLING"):
        assert name.startswith(tuple(exported)), name
    assert not "NCCL_DEBUG".startswith(tuple(exported))
    # No Enflame graph compiler here and Inductor not switched on: eager graph capture.
    assert accel.get_compile_backend() == "eager"
    assert default_compile_backend({"TORCHGCU_INDUCTOR_ENABLE": "1"}) == "inductor"
    assert default_compile_backend({"TORCHGCU_INDUCTOR_ENABLE": "0"}) == "eager"
    registry.register_backend(lambda gm, inputs: gm, name="topsgraph")  # what DeepLink dicp registers
    try:
        assert default_compile_backend({"TORCHGCU_INDUCTOR_ENABLE": "1"}) == "topsgraph"
        assert gcu_accelerator().get_compile_backend() == "topsgraph"
    finally:
        registry._BACKENDS.pop("topsgraph", None)
        registry._COMPILER_FNS.pop("topsgraph", None)
    accel.set_compile_backend("inductor")
    assert accel.get_compile_backend() == "inductor"
    with pytest.raises(AcceleratorError, match="compile backend 'tops_nope' is not available for gcu"):
        accel.set_compile_backend("tops_nope")
