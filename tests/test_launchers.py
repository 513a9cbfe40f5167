"""Ranks from MPI and SLURM launchers (``mapsage_ds.runtime.launchers``), in unit tests and real processes.

The unit tests read environments given as dicts. The process tests start real Python processes
with only a launcher's variables (no ``RANK``/``WORLD_SIZE``/``MASTER_*``), as ``mpirun`` or
``srun`` would, and check the ``[mapsage_ds.runtime.accelerator]`` line of each rank; one test runs
the fine-tuning script under a real ``mpirun -np 2`` (Debian's ``openmpi-bin``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, subprocess_env, tiny_run_config, write_config
from mapsage_ds.errors import AcceleratorError, ConfigError
from mapsage_ds.runtime.accelerator import REPORT_PREFIX
from mapsage_ds.runtime.launchers import (
    FAMILIES,
    LOOPBACK,
    PORT_BASE,
    PORT_SPAN,
    deepspeed_env_lines,
    derived_port,
    first_host,
    launcher_world,
    world_environment,
    write_deepspeed_env,
)

FAKE_TORCH_GCU = REPO / "tests" / "fake_torch_gcu"
LAUNCHER_PREFIXES = ("OMPI_", "MV2_", "PMI_", "MPI_LOCAL", "SLURM", "PMIX_")


def ompi(rank: int, size: int, local_rank: int, local_size: int, job: str = "4242") -> dict[str, str]:
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(size),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
            "OMPI_MCA_ess_base_jobid": job}


def slurm(rank: int, ntasks: int, local_id: int, nodes: int, nodelist: str = "gpu[07-08]", job: str = "81",
          node: str | None = None) -> dict[str, str]:
    env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(local_id),
           "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0"}
    if node is not None:
        env["SLURMD_NODENAME"] = node
    return env


# --- parsing each launcher's variables ---------------------------------------------------------------------------

def test_each_family_gives_rank_local_rank_and_world_size():
    cases = {
        "openmpi": (ompi(5, 16, 1, 8), (5, 1, 16, False)),
        "mvapich": ({"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4", "MV2_COMM_WORLD_LOCAL_RANK": "3",
                     "MV2_COMM_WORLD_LOCAL_SIZE": "4"}, (3, 3, 4, True)),
        "pmi": ({"PMI_RANK": "9", "PMI_SIZE": "12", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}, (9, 1, 12, False)),
        "slurm": (slurm(10, 16, 2, 2), (10, 2, 16, False)),
    }
    for name, (environ, expected) in cases.items():
        world = launcher_world(environ)
        assert world.launcher == name
        assert (world.rank, world.local_rank, world.world_size, world.single_node) == expected, name
    assert launcher_world({"PATH": "/usr/bin", "SLURM_JOB_ID": "7"}) is None  # an allocation, not a task


def test_slurm_step_variables_win_over_the_allocation():
    # Inside an allocation of 8 tasks, `srun -n 2 -N 1` starts a step of 2.
    environ = {**slurm(1, 8, 1, 2), "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
    world = launcher_world(environ)
    assert (world.rank, world.world_size, world.single_node) == (1, 2, True)


def test_the_most_specific_launcher_wins():
    # mpirun inside a SLURM allocation: the OpenMPI ranks are the processes, SLURM's describe the allocation.
    environ = {**slurm(0, 8, 0, 2), **ompi(1, 2, 1, 2)}
    world = launcher_world(environ)
    assert (world.launcher, world.rank, world.world_size) == ("openmpi", 1, 2)


@pytest.mark.parametrize(("environ", "message"), [
    (ompi(2, 2, 0, 1), r"OMPI_COMM_WORLD_RANK=2 with OMPI_COMM_WORLD_SIZE=2: the rank must be below"),
    (ompi(0, 2, 2, 2), r"OMPI_COMM_WORLD_LOCAL_RANK=2, OMPI_COMM_WORLD_LOCAL_SIZE=2.*local rank < ranks on this node"),
    (ompi(0, 2, 0, 3), r"OMPI_COMM_WORLD_LOCAL_SIZE=3, OMPI_COMM_WORLD_SIZE=2"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, r"OMPI_COMM_WORLD_RANK='0' is set but OMPI_COMM_WORLD_SIZE is not"),
    ({**ompi(0, 2, 0, 2), "OMPI_COMM_WORLD_SIZE": "two"}, r"OMPI_COMM_WORLD_SIZE='two'.*non-negative integer"),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, r"PMI_RANK=1 of PMI_SIZE=2 but MPI_LOCALRANKID is not set"),
    ({"PMI_RANK": "-1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}, r"PMI_RANK='-1'"),
    (slurm(0, 2, 0, 3), r"SLURM_NNODES=3 with SLURM_NTASKS=2: expected 1..world size nodes"),
    (slurm(0, 2, 2, 1), r"SLURM_LOCALID=2 with SLURM_NTASKS=2: a local rank cannot reach the world size"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "0", "SLURM_LOCALID": "0"}, r"SLURM_PROCID=0 with SLURM_NTASKS=0"),
])
def test_inconsistent_launcher_variables_are_errors(environ, message):
    with pytest.raises(AcceleratorError, match=message):
        launcher_world(environ)
    with pytest.raises(AcceleratorError, match=message):
        world_environment(environ)


def test_every_family_is_recognised_by_its_rank_variable_alone():
    for family in FAMILIES:
        with pytest.raises(AcceleratorError, match=f"{family.rank}='0' is set but"):
            launcher_world({family.rank: "0"})


@pytest.mark.parametrize(("nodelist", "host"), [
    ("gpu07", "gpu07"), ("gpu[07-08]", "gpu07"), ("node[3,5-9],login1", "node3"), ("a,b[1-2]", "a"),
    ("rack[2-3]-n[010-012]", "rack2-n010"), (" x[9] ", "x9"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu[07-08", "gpu]1[", "n[[1]]", "[]"])
def test_unreadable_node_list_is_an_error(nodelist):
    with pytest.raises(ConfigError, match="cannot read its first host"):
        first_host(nodelist)


# --- the world a process joins ---------------------------------------------------------------------------------

def test_torch_launcher_variables_win():
    environ = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    # torchrun started per node by srun: SLURM counts one task per node, torchrun the processes.
    world = world_environment({**environ, **slurm(1, 2, 0, 2)})
    assert (world.rank, world.local_rank, world.world_size, world.launcher) == (9, 1, 16, "torch")
    assert world.variables() == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "10.0.0.1",
                                 "MASTER_PORT": "29600"}


def test_a_world_of_one_is_refused_when_a_launcher_says_there_are_more():
    environ = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", **ompi(1, 2, 1, 2)}
    with pytest.raises(AcceleratorError, match=r"WORLD_SIZE=1 \(RANK=0\) but openmpi started 2 processes "
                                               r"\(OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_SIZE=2.*rank 0"):
        world_environment(environ)
    # A launcher that started one process agrees with a world of one.
    assert world_environment({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", **ompi(0, 1, 0, 1)}).world_size == 1


def test_rank_without_local_rank_is_an_error():
    with pytest.raises(AcceleratorError, match=r"LOCAL_RANK=None.*torchrun and the deepspeed launcher set"):
        world_environment({"RANK": "0", "WORLD_SIZE": "2"})


def test_single_node_mpi_job_meets_on_loopback_at_a_port_of_its_job():
    worlds = [world_environment(ompi(rank, 2, rank, 2, job="777")) for rank in (0, 1)]
    assert [(w.rank, w.local_rank, w.world_size, w.launcher) for w in worlds] == [(0, 0, 2, "openmpi"),
                                                                                    (1, 1, 2, "openmpi")]
    assert {(w.master_addr, w.master_port) for w in worlds} == {(LOOPBACK, str(derived_port("openmpi", "777")))}
    assert PORT_BASE <= derived_port("openmpi", "777") < PORT_BASE + PORT_SPAN
    other_job = {world_environment(ompi(0, 2, 0, 2, job=str(job))).master_port for job in range(778, 788)}
    assert str(derived_port("openmpi", "777")) not in other_job and len(other_job) > 1
    explicit = world_environment({**ompi(1, 2, 1, 2), "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"})
    assert (explicit.master_addr, explicit.master_port) == ("10.1.2.3", "29555")


def test_multi_node_mpi_job_needs_master_addr():
    with pytest.raises(AcceleratorError, match=r"openmpi started 16 processes .*spread over several nodes.*"
                                               r"MASTER_ADDR is not set.*mpirun -x MASTER_ADDR="):
        world_environment(ompi(9, 16, 1, 8))
    world = world_environment({**ompi(9, 16, 1, 8), "MASTER_ADDR": "node1"})
    assert (world.master_addr, world.rank, world.local_rank) == ("node1", 9, 1)


def test_mpi_without_a_job_id_needs_master_port():
    environ = {"MV2_COMM_WORLD_RANK": "1", "MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_LOCAL_RANK": "1",
               "MV2_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(AcceleratorError, match=r"without MASTER_PORT.*no job id.*-env MASTER_PORT"):
        world_environment(environ)
    assert world_environment({**environ, "MASTER_PORT": "29501"}).master_port == "29501"
    with pytest.raises(AcceleratorError, match=r"MASTER_PORT='70000': expected a TCP port"):
        world_environment({**environ, "MASTER_PORT": "70000"})
    with pytest.raises(AcceleratorError, match=r"not known to share one node.*-genv MASTER_ADDR"):
        world_environment({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"})


def test_multi_node_slurm_job_meets_at_the_first_host_of_its_node_list():
    worlds = [world_environment(slurm(rank, 4, rank % 2, 2, node=f"gpu0{7 + rank // 2}")) for rank in range(4)]
    assert [(w.rank, w.local_rank) for w in worlds] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    assert {(w.master_addr, w.master_port, w.world_size) for w in worlds} == {
        ("gpu07", str(derived_port("slurm", "81.0")), 4)}
    step = world_environment({**slurm(0, 4, 0, 2, node="gpu09"), "SLURM_STEP_NODELIST": "gpu[09-10]"})
    assert step.master_addr == "gpu09"  # the step's nodes, not the allocation's


def test_slurm_rank_zero_off_the_first_host_is_an_error():
    with pytest.raises(AcceleratorError, match=r"rank 0 runs on gpu08, not on gpu07.*set MASTER_ADDR=gpu08"):
        world_environment(slurm(0, 4, 0, 2, node="gpu08"))


def test_no_launcher_is_a_world_of_one_on_loopback():
    world = world_environment({})
    assert (world.rank, world.local_rank, world.world_size, world.master_addr, world.launcher) == (
        0, 0, 1, LOOPBACK, "none")
    assert 0 < int(world.master_port) < 65536
    single = world_environment(ompi(0, 1, 0, 1))  # `mpirun -np 1`
    assert (single.world_size, single.launcher, single.master_addr) == (1, "openmpi", LOOPBACK)


# --- .deepspeed_env ------------------------------------------------------------------------------------------------

def test_deepspeed_env_carries_the_accelerator_prefixes(tmp_path):
    environ = {"ECCL_SOCKET_IFNAME": "eth1", "TOPS_VISIBLE_DEVICES": "0,1", "PYTORCH_GCU_ALLOC_CONF": "backend:x",
               "MAPSAGE_ACCELERATOR": "gcu", "GLOO_SOCKET_IFNAME": "eth1", "NCCL_DEBUG": "INFO", "HOME": "/root",
               "ECCLX": "prefix match"}
    path = tmp_path / ".deepspeed_env"
    lines = write_deepspeed_env(path, ["ECCL", "TOPS", "PYTORCH_GCU_ALLOC_CONF"], environ)
    assert lines == ["ECCLX=prefix match", "ECCL_SOCKET_IFNAME=eth1", "GLOO_SOCKET_IFNAME=eth1",
                     "MAPSAGE_ACCELERATOR=gcu", "PYTORCH_GCU_ALLOC_CONF=backend:x", "TOPS_VISIBLE_DEVICES=0,1"]
    # Read back the way DeepSpeed's runner reads it.
    parsed = dict(line.split("=", maxsplit=1) for line in path.read_text().splitlines())
    assert parsed == {line.split("=")[0]: line.split("=", 1)[1] for line in lines}
    with pytest.raises(ConfigError, match="ECCL_BAD holds a line break"):
        deepspeed_env_lines(["ECCL"], {"ECCL_BAD": "a\nb"})


# --- real processes --------------------------------------------------------------------------------------------

RANK_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed
ctx = setup_distributed()
ranks = [None] * ctx.world_size
dist.all_gather_object(ranks, (ctx.rank, ctx.device_index))
total = torch.tensor([ctx.rank + 1.0], device=ctx.device)
dist.all_reduce(total)
sys.stdout.write("RESULT " + json.dumps({"rank": ctx.rank, "ranks": ranks, "sum": total.item()}) + "\n")
teardown_distributed()
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    env.update(extra)
    return env


def free_job_id(launcher: str, suffix: str = "") -> str:
    """A job id (without ``suffix``, which the launcher adds) whose derived port is free on this host now."""
    for attempt in range(100):
        job = f"{os.getpid()}{attempt}"
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", derived_port(launcher, job + suffix)))
            except OSError:
                continue
        return job
    raise RuntimeError("no free derived port")


def start_ranks(tmp_path, environments: list[dict[str, str]]) -> list[subprocess.CompletedProcess]:
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    processes = [subprocess.Popen([sys.executable, str(script)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for env in environments]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=300)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in processes:  # a rank left waiting for its peer must not outlive the test
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def reports_of(results: list[subprocess.CompletedProcess]) -> list[dict]:
    reports = []
    for result in results:
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
        lines = [json.loads(m) for m in re.findall(re.escape(REPORT_PREFIX) + r"(\{[^{}]*\})", result.stdout)]
        assert len(lines) == 1, result.stdout
        outcome = json.loads(re.search(r"RESULT (\{.*\})", result.stdout).group(1))
        reports.append({**lines[0], "result": outcome})
    return reports


@pytest.mark.slow
def test_two_processes_with_only_openmpi_variables_form_a_world_of_two(tmp_path):
    job = free_job_id("openmpi")
    environments = [clean_env(PYTHONPATH=str(FAKE_TORCH_GCU), MAPSAGE_ACCELERATOR="gcu", FAKE_GCU_DEVICE_COUNT="2",
                              **ompi(rank, 2, rank, 2, job=job)) for rank in (0, 1)]
    reports = reports_of(start_ranks(tmp_path, environments))
    assert [r["rank"] for r in reports] == [0, 1]
    for rank, report in enumerate(reports):
        assert (report["world_size"], report["launcher"], report["backend"]) == (2, "openmpi", "eccl")
        assert report["local_rank"] == report["device_index"] == report["current_device"] == rank  # own card
        assert report["result"] == {"rank": rank, "ranks": [[0, 0], [1, 1]], "sum": 3.0}


@pytest.mark.slow
def test_two_processes_with_only_slurm_variables_form_a_world_of_two(tmp_path):
    # Two "nodes" with one task each; the rendezvous comes from the node list (localhost first).
    job = free_job_id("slurm", ".0")  # SLURM_STEP_ID=0
    # Each "node" has one card, so both ranks bind their node's card 0.
    environments = [clean_env(**slurm(rank, 2, 0, 2, nodelist="localhost,otherhost", job=job,
                                      node=["localhost", "otherhost"][rank]),
                              PYTHONPATH=str(FAKE_TORCH_GCU), MAPSAGE_ACCELERATOR="gcu", FAKE_GCU_DEVICE_COUNT="1")
                    for rank in (0, 1)]
    reports = reports_of(start_ranks(tmp_path, environments))
    assert [r["rank"] for r in reports] == [0, 1]
    for rank, report in enumerate(reports):
        assert (report["world_size"], report["local_rank"], report["launcher"]) == (2, 0, "slurm")
        assert report["device_index"] == report["current_device"] == 0
        assert report["result"] == {"rank": rank, "ranks": [[0, 0], [1, 0]], "sum": 3.0}


@pytest.mark.slow
def test_a_world_of_one_start_is_refused_when_the_launcher_says_two(tmp_path):
    env = clean_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=LOOPBACK, MASTER_PORT="29999",
                    MAPSAGE_ACCELERATOR="cpu", **slurm(1, 2, 1, 1))
    result = subprocess.run([sys.executable, "-c", "from mapsage_ds.runtime.accelerator import setup_distributed; "
                             "setup_distributed()"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "AcceleratorError: WORLD_SIZE=1 (RANK=0) but slurm started 2 processes" in result.stderr, result.stderr
    assert REPORT_PREFIX not in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not found: install Debian's openmpi-bin (apt-get install -y openmpi-bin)")
def test_mpirun_runs_two_ranks_of_fine_tuning(tmp_path, tiny_tree):
    run = tmp_path / "run"
    train = {"max_steps": 2, "eval_every": 2, "save_every": 2}
    config = write_config(tmp_path / "c.yaml", tiny_run_config(tiny_tree, run, train=train))
    env = clean_env(MAPSAGE_ACCELERATOR="cpu")
    command = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
               sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(config),
               "--set", "train.max_steps=2", "--set", "optim.warmup_steps=1"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    reports = [json.loads(m) for m in re.findall(re.escape(REPORT_PREFIX) + r"(\{[^{}]*\})", output)]
    assert sorted((r["rank"], r["local_rank"], r["world_size"], r["launcher"]) for r in reports) == [
        (0, 0, 2, "openmpi"), (1, 1, 2, "openmpi")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    weights = load_file(run / "export" / "model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())


def test_tracks_refuse_to_run_as_one_of_several_processes(monkeypatch):
    from mapsage_ds.tracks.launch import launch_command

    def command():
        return launch_command("finetune", [], nproc=1, cards=None, accelerator="cpu", launcher="torchrun",
                              master_port=29512)

    assert "--nnodes=1" in command().command
    for key, value in slurm(1, 2, 0, 2).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"tracks run on one node.*slurm started 2 copies.*docs/multinode.md"):
        command()
    for key in slurm(1, 2, 0, 2):
        monkeypatch.delenv(key)
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match=r"tracks run on one node, from one process, but WORLD_SIZE=8"):
        command()


@pytest.mark.slow
def test_health_check_writes_the_gcu_environment_for_deepspeed(tmp_path):
    path = tmp_path / ".deepspeed_env"
    env = clean_env(PYTHONPATH=str(FAKE_TORCH_GCU), FAKE_GCU_DEVICE_COUNT="2", ECCL_SOCKET_IFNAME="eth1",
                    TOPS_VISIBLE_DEVICES="0,1", PYTORCH_GCU_ALLOC_CONF="backend:topsMallocAsync",
                    TORCHGCU_INDUCTOR_ENABLE="0", NCCL_DEBUG="INFO")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "health_check.py"), "--accelerator", "gcu",
                             "--write-deepspeed-env", str(path)], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    lines = path.read_text().splitlines()
    assert lines == ["ECCL_SOCKET_IFNAME=eth1", "PYTORCH_GCU_ALLOC_CONF=backend:topsMallocAsync",
                     "TOPS_VISIBLE_DEVICES=0,1", "TORCHGCU_INDUCTOR_ENABLE=0"]  # NCCL is not the GCU's
    assert f"wrote 4 variable(s) to {path}" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None,
                    reason="mpirun not found: install Debian's openmpi-bin (apt-get install -y openmpi-bin)")
def test_deepspeed_openmpi_launcher_forms_the_world_and_carries_deepspeed_env(tmp_path):
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    # The launcher process runs on DeepSpeed's CPU accelerator: only .deepspeed_env carries GCU variables.
    lines = write_deepspeed_env(tmp_path / ".deepspeed_env", ["ECCL", "TOPS", "PYTORCH_GCU_ALLOC_CONF"],
                                {"MAPSAGE_ACCELERATOR": "gcu", "PYTORCH_GCU_ALLOC_CONF": "backend:topsMallocAsync"})
    env = clean_env(PYTHONPATH=str(FAKE_TORCH_GCU), FAKE_GCU_DEVICE_COUNT="2")
    env.pop("MAPSAGE_ACCELERATOR", None)
    command = [str(Path(sys.executable).with_name("deepspeed")), "--launcher", "openmpi", "--force_multi",
               "--no_ssh_check", "--hostfile", "hostfile", "--master_addr", LOOPBACK, "--launcher_args",
               "--allow-run-as-root --oversubscribe --mca btl_tcp_if_include lo", "ranks.py"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert all(f"-x {line}" in output for line in lines), output[-4000:]
    reports = [json.loads(m) for m in re.findall(re.escape(REPORT_PREFIX) + r"(\{[^{}]*\})", output)]
    seen = sorted((r["rank"], r["device_index"], r["world_size"], r["launcher"], r["accelerator"]) for r in reports)
    assert seen == [(0, 0, 2, "openmpi", "gcu"), (1, 1, 2, "openmpi", "gcu")]
