"""Command lines of a track's training and evaluation: launcher, card group, port, overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.runtime.accelerator import visible_devices_env
from mapsage_ds.runtime.launchers import launcher_world, without_world_variables
from mapsage_ds.tracks.spec import LAUNCHERS, TrackEvaluation, TracksConfig, TrackSpec

# Besides torch's and the launchers' variables (launchers.without_world_variables): torchrun's own.
_ELASTIC_ENV = ("GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Launch:
    """A command line and the environment changes it runs with."""

    command: list[str]
    env: dict[str, str]


class Job:
    """A launched command running in a session of its own, its output going to ``log``.

    The session lets :meth:`stop` end the whole process tree (launcher and ranks) at once.
    """

    def __init__(self, launch: Launch, log: Path) -> None:
        env = without_world_variables(os.environ, extra=_ELASTIC_ENV)
        env.update(launch.env)
        self.log = log
        self.handle = log.open("w")
        self.handle.write("$ " + " ".join(launch.command) + "\n")
        self.handle.flush()
        self.started = time.time()
        self.process = subprocess.Popen(launch.command, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def poll(self) -> int | None:
        """The exit status once the command has ended, else None."""
        code = self.process.poll()
        if code is not None:
            self.handle.close()
        return code

    def stop(self) -> None:
        """End the process tree: SIGTERM, then SIGKILL after 30 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.handle.close()


def run_to_end(launch: Launch, log: Path, *, poll_seconds: float = 1.0) -> tuple[int, float]:
    """Run ``launch`` with its output in ``log`` until it ends; returns its exit status and wall seconds.

    If this process is interrupted (Ctrl-C, SIGTERM turned into an exception), the command's whole
    process tree is stopped before the exception goes on.
    """
    job = Job(launch, log)
    try:
        while (code := job.poll()) is None:
            time.sleep(poll_seconds)
    except BaseException:
        job.stop()
        raise
    return code, time.time() - job.started


def launcher_selects_by_include(accelerator: str) -> bool:
    """Whether the ``deepspeed`` launcher itself manages this device type's visible-devices variable.

    It then ignores (and deletes) the variable when ``--num_gpus`` is given, so card groups must be
    passed as ``--include localhost:ids``. For device types it does not know (GCU) it manages
    another variable, and the group is selected with our variable plus ``--num_gpus``
    (docs/accelerators.md).
    """
    from deepspeed.accelerator import get_accelerator

    env = visible_devices_env(accelerator)
    return env is not None and env == get_accelerator().visible_devices_envs()[0]


def check_single_node(environ: Mapping[str, str]) -> None:
    """Refuse to run tracks from a process that is one of several (``srun -N 2``, ``mpirun``, ``torchrun``).

    Tracks share out the cards of one node among concurrent single-node jobs; started once per
    node or per rank, every copy would run every track into the same directories. A multi-node
    run is one ``mapsage-finetune`` job (docs/multinode.md).

    Raises:
        ConfigError: if ``WORLD_SIZE`` or an MPI/SLURM launcher's variables say there are several processes.
    """
    world = launcher_world(environ)
    size = environ.get("WORLD_SIZE", "").strip()
    if world is not None and world.world_size > 1:
        reason = f"{world.launcher} started {world.world_size} copies of it ({world.source})"
    elif size.isdigit() and int(size) > 1:
        reason = f"WORLD_SIZE={size}"
    else:
        return
    raise ConfigError(f"tracks run on one node, from one process, but {reason}: start mapsage-tracks once, without "
                      f"a launcher (it launches each track itself); to train across nodes run mapsage-finetune under "
                      f"the launcher instead (docs/multinode.md)")


def launch_command(command: str, args: list[str], *, nproc: int, cards: list[int] | None, accelerator: str,
                   launcher: str, master_port: int, python: str = sys.executable) -> Launch:
    """The command line that runs the module ``mapsage_ds.cli.{command}`` on ``nproc`` processes bound to ``cards``.

    The installed module is launched (``-m`` / ``--module``), not a file of the source tree, so
    tracks run from any working directory and from a wheel.

    Tracks are single-node: torchrun is given ``--nnodes=1``, deepspeed only ``localhost`` cards.

    Raises:
        ConfigError: if cards are given for a device type without cards (CPU), or if this process is
            one of several (see :func:`check_single_node`).
    """
    check_single_node(os.environ)
    env = {"MAPSAGE_ACCELERATOR": accelerator}
    variable = visible_devices_env(accelerator)
    if cards and variable is None:
        raise ConfigError(f"cards {cards} given, but the accelerator is {accelerator}, which has no cards: "
                          "give 'processes: N' instead")
    card_list = ",".join(str(c) for c in cards or [])
    module = f"mapsage_ds.cli.{command}"
    if launcher == "torchrun":
        if cards:
            env[variable] = card_list
        command = [python, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={master_port}", "-m", module, *args]
    elif launcher == "deepspeed":
        deepspeed = str(Path(python).with_name("deepspeed"))
        if cards and launcher_selects_by_include(accelerator):
            selection = [f"--include=localhost:{card_list}"]
        else:
            if cards:
                env[variable] = card_list
            selection = [f"--num_gpus={nproc}"]
        command = [deepspeed, *selection, f"--master_port={master_port}", "--module", module, *args]
    else:
        raise ConfigError(f"launcher={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    return Launch(command, env)


def evaluation_overrides(evaluation: TrackEvaluation) -> list[str]:
    """``--set eval.*`` overrides that give a track's validation the leaderboard's settings."""
    values = evaluation.to_dict()
    return [f"eval.{key}={json.dumps(values[key])}" for key in EvalProtocol.__dataclass_fields__]


def train_args(track: TrackSpec, config: TracksConfig, run_dir: Path, *, continue_run: str | None = None) -> list[str]:
    """Arguments of ``mapsage-finetune`` (or ``mapsage-distill``) for ``track``.

    ``continue_run`` is ``"resume"`` or ``"overwrite"`` for a run directory an earlier attempt left.
    """
    args = [] if continue_run is None else [f"--{continue_run}"]
    if track.recipe is not None:
        args += ["--recipe", track.recipe]
    if track.config is not None:
        args += ["--config", track.config]
    overrides = list(track.overrides)
    if config.evaluation.apply_to_validation:
        overrides = evaluation_overrides(config.evaluation) + overrides
    for override in overrides:
        args += ["--set", override]
    data_root = track.data_root or config.data_root
    if data_root is not None:
        args += ["--data-root", data_root]
    return args + ["--output-dir", str(run_dir)]


def eval_args(evaluation: TrackEvaluation, *, weights_dir: Path | None, data_root: str,
              report_dir: Path) -> list[str]:
    """Arguments of ``mapsage-evaluate``: the one protocol of every track, as ``--set eval.*`` overrides.

    The model is ``weights_dir`` (an export); None when the protocol names an ensemble (``eval.ensemble``).
    """
    model = [] if weights_dir is None else ["--model", str(weights_dir)]
    args = [*model, "--data-root", data_root, "--split", evaluation.split,
            "--scenes", evaluation.scenes, "--num-panels", str(evaluation.num_panels), "--output-dir", str(report_dir)]
    for override in evaluation_overrides(evaluation):
        args += ["--set", override]
    return args


def overrides_of(args: list[str]) -> list[str]:
    """The ``--set`` / ``--data-root`` / ``--output-dir`` of a command line built here, as overrides."""
    overrides = []
    for flag, value in zip(args, args[1:]):
        if flag == "--set":
            overrides.append(value)
        elif flag == "--data-root":
            overrides.append(f"data.root={json.dumps(value)}")
        elif flag == "--output-dir":
            overrides.append(f"output_dir={json.dumps(value)}")
    return overrides
