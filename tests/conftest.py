"""Shared fixtures: tiny generated LoveDA trees, tiny configs, and a launcher for real multi-process runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from mapsage_ds.data.synthetic import SyntheticSpec, ensure_synthetic_tree
from mapsage_ds.runtime.launchers import without_world_variables
from mapsage_ds.runtime.network import free_port

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
# The data-validation cache of the session's generated trees stays out of the user's ~/.cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="mapsage-tests-cache-")
TINY_SPEC = SyntheticSpec(size=128, train_per_scene=4, val_per_scene=3, test_per_scene=1, nodata_fraction=0.5, seed=3)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: real multi-process DeepSpeed runs (CI runs them too)")


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated LoveDA-format tree of real PNG files (64×64 tiles), shared by the session."""
    return ensure_synthetic_tree(tmp_path_factory.mktemp("loveda") / "tree", TINY_SPEC)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A random test-size SegFormer written as a MapSage export (no training needed)."""
    from mapsage_ds.data.classes import LOVEDA_CLASSES
    from mapsage_ds.models.export import write_hf_export
    from mapsage_ds.models.segformer import build_segformer

    torch.manual_seed(0)
    model = build_segformer("test", list(LOVEDA_CLASSES))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return write_hf_export(model, state, tmp_path_factory.mktemp("export") / "export",
                           image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))


def tiny_run_config(data_root: Path, output_dir: Path, **sections: dict) -> dict:
    """A run config (as a dict) with the test-size SegFormer and a few steps on ``data_root``."""
    config = {
        "data": {"root": str(data_root), "crop_size": 64, "num_workers": 0},
        "model": {"size": "test"},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 4, "micro_batch_size": 2, "deepspeed": "zero2_fp32",
                  "eval_every": 2, "save_every": 2, "log_every": 1},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def write_config(path: Path, config: dict) -> Path:
    """Write a config dict as a YAML file for ``--config``."""
    path.write_text(yaml.safe_dump(config))
    return path


def crashed_copy(run_dir: Path, copy: Path, *, step: int) -> Path:
    """``run_dir`` copied to ``copy`` as a crash right after its step-``step`` checkpoint would leave it.

    'latest' names that checkpoint, later ones count as half written, the log runs ahead of the
    checkpoint, and there is no export yet. A resumed run must end as ``run_dir`` did.
    """
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "export")
    (copy / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    return copy


def subprocess_env() -> dict[str, str]:
    """Environment of launched processes: one thread each (2 cores), shared op build cache."""
    # Launched worlds are the test's own, even when pytest itself runs inside an MPI or SLURM job.
    env = without_world_variables(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    return env


def launch(script: str, args: list[str], *, nproc: int, launcher: str = "torchrun", timeout: int = 600) -> str:
    """Run ``scripts/{script}`` on ``nproc`` CPU processes; returns its output, fails the test on error.

    ``launcher="torchrun-nodes"`` starts ``nproc`` torchrun agents as ``nproc`` nodes of one process
    each (``--nnodes N --node_rank r``), meeting over loopback as nodes meet over the network.
    """
    path = str(REPO / "scripts" / script)
    if launcher == "torchrun-nodes":
        return _launch_nodes(path, args, nodes=nproc, timeout=timeout)
    if nproc == 1 and launcher == "python":
        command = [sys.executable, path, *args]
    elif launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   path, *args]
    elif launcher == "deepspeed":
        command = [str(Path(sys.executable).with_name("deepspeed")), f"--num_gpus={nproc}",
                   f"--master_port={free_port()}", path, *args]
    else:
        raise ValueError(launcher)
    result = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{output[-6000:]}")
    return output




def _launch_nodes(path: str, args: list[str], *, nodes: int, timeout: int) -> str:
    port = free_port()
    commands = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
                 f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", path, *args]
                for rank in range(nodes)]
    agents = [subprocess.Popen(command, env=subprocess_env(), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for command in commands]
    outputs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    output = "\n".join(outputs)
    failed = [(rank, agent.returncode) for rank, agent in enumerate(agents) if agent.returncode != 0]
    if failed:
        pytest.fail(f"torchrun nodes {failed} failed:\n{output[-6000:]}")
    return output


WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clear_world(monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    """Remove the launcher variables (and ``extra``) for this test; they are restored when it ends.

    Each is set before it is removed, so that monkeypatch restores it even when a command run in
    this process (``setup_distributed``) sets it meanwhile.
    """
    for key in (*WORLD_VARIABLES, *extra):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


@pytest.fixture
def world_of_one(monkeypatch):
    """No launcher variables: main() forms its own world of one in this process."""
    clear_world(monkeypatch)


@pytest.fixture
def one_process_world(world_of_one):
    """A DeepSpeed world of one process inside the test process (as plain `python script.py` forms)."""
    from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed

    ctx = setup_distributed("cpu")
    try:
        yield ctx
    finally:
        teardown_distributed()
