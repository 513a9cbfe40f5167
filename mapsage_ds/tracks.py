"""Several experiment tracks at once on disjoint card groups, scored alike into one leaderboard.

A tracks file (YAML) lists the tracks (a recipe, a config file and ``--set`` overrides each, a
card group or a process count) and one ``evaluation`` section. Every track trains in its own
process group: its own cards (through the runtime's visible-devices variable), its own master
port, its own output directory and log. When a track's training ends, ``scripts/evaluate.py``
scores its weights on the same cards with the ``evaluation`` settings, the same for every track
(they are also given to each track's validation during training, so check 6 holds). A track that
fails (bad config, crashed training, missing weights, failed evaluation) is reported in the
leaderboard; the other tracks carry on.

Layout under ``output_dir``::

    <track>/run/         the training run (config.yaml, checkpoints/, export/, best/, metrics.jsonl)
    <track>/train.log    stdout and stderr of the training processes
    <track>/eval/        the evaluation report (metrics.json, metrics.md, plots)
    <track>/eval.log     stdout and stderr of the evaluation
    <track>/status.json  what ran, where, how long, and how it ended
    leaderboard.md, leaderboard.json
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mapsage_ds.accelerator import visible_devices_env
from mapsage_ds.config import EvalConfig, from_dict, load_config, read_yaml
from mapsage_ds.data.synthetic import ensure_synthetic_tree
from mapsage_ds.errors import ConfigError, MapSageError
from mapsage_ds.inference import InferenceProtocol
from mapsage_ds.report import leaderboard_markdown, read_report

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
LAUNCHERS = ("torchrun", "deepspeed")
WEIGHTS = ("export", "best")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "TORCHELASTIC_RUN_ID")
_LOG_TAIL = 2000


@dataclass
class TrackSpec:
    """One experiment.

    Attributes:
        name: Directory name of the track and its name in the leaderboard.
        recipe: Packaged recipe (``--recipe``).
        config: YAML config file applied after the recipe (``--config``).
        overrides: ``key=value`` overrides (``--set``), applied last.
        data_root: Data root of this track (else the file's ``data_root``, else the recipe's).
        cards: Card indices of this track (a disjoint group); None on CPU.
        processes: Processes to start; defaults to the number of cards (1 without cards).
        master_port: Rendezvous port of the track's process group (default: a free port).
    """

    name: str
    recipe: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    data_root: str | None = None
    cards: list[int] | None = None
    processes: int | None = None
    master_port: int | None = None

    @property
    def nproc(self) -> int:
        """Processes the track runs."""
        return self.processes or (len(self.cards) if self.cards else 1)


@dataclass
class TrackEvaluation(EvalConfig):
    """The one evaluation every track gets: the ``eval`` settings plus what to score on.

    Attributes:
        split: ``Val`` (or ``Train``): the split scored (Test labels are hidden).
        scenes: ``urban``, ``rural`` or ``both``.
        data_root: Root scored for every track (default: each track's own data root).
        weights: ``export`` (final weights) or ``best`` (best validation step).
        num_panels: Image/label/prediction panels in each report.
        apply_to_validation: Also give these settings to each track's validation during training.
    """

    split: str = "Val"
    scenes: str = "both"
    data_root: str | None = None
    weights: str = "export"
    num_panels: int = 0
    apply_to_validation: bool = True


@dataclass
class TracksConfig:
    """A tracks file."""

    tracks: list[TrackSpec]
    evaluation: TrackEvaluation = field(default_factory=TrackEvaluation)
    output_dir: str = "runs/tracks"
    launcher: str = "torchrun"  # torchrun | deepspeed
    data_root: str | None = None  # default data root of every track


def read_tracks_config(path: str | Path) -> TracksConfig:
    """Read and validate a tracks file.

    Raises:
        MissingFileError: if the file does not exist.
        ConfigError: on an unknown key, a wrong type, or any problem :func:`validate_tracks` finds.
    """
    data = read_yaml(path)
    if "tracks" not in data:
        raise ConfigError(f"{path}: no 'tracks' list")
    config = from_dict(TracksConfig, data)
    validate_tracks(config)
    return config


def validate_tracks(config: TracksConfig) -> None:
    """Check names, card groups, ports and the evaluation settings, reporting every problem at once."""
    problems = []
    if not config.tracks:
        problems.append("tracks: the list is empty")
    names = [t.name for t in config.tracks]
    problems += [f"track name {n!r}: use letters, digits, '_', '-' and '.'" for n in names if not _NAME.match(n)]
    problems += [f"track name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if config.launcher not in LAUNCHERS:
        problems.append(f"launcher={config.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    owner: dict[int, int] = {}
    for index, track in enumerate(config.tracks):
        if track.recipe is None and track.config is None:
            problems.append(f"track {track.name}: give a recipe or a config file")
        if track.cards is not None:
            if not track.cards or any(c < 0 for c in track.cards) or len(set(track.cards)) != len(track.cards):
                problems.append(f"track {track.name}: cards {track.cards} must be distinct indices >= 0")
            if track.processes is not None and track.processes != len(track.cards):
                problems.append(f"track {track.name}: processes={track.processes} but {len(track.cards)} cards")
            for card in track.cards:
                if card in owner and owner[card] != index:
                    problems.append(f"card {card} is in tracks {config.tracks[owner[card]].name} and {track.name}: "
                                    "card groups must be disjoint")
                owner.setdefault(card, index)
        if track.processes is not None and track.processes < 1:
            problems.append(f"track {track.name}: processes={track.processes}: expected >= 1")
    ports = [t.master_port for t in config.tracks if t.master_port is not None]
    shared_ports = sorted({p for p in ports if ports.count(p) > 1})
    problems += [f"master_port {p} is given to several tracks" for p in shared_ports]
    evaluation = config.evaluation
    if evaluation.split not in ("Train", "Val"):
        problems.append(f"evaluation.split={evaluation.split!r}: expected Val (or Train); Test labels are hidden")
    if evaluation.weights not in WEIGHTS:
        problems.append(f"evaluation.weights={evaluation.weights!r}: expected one of {', '.join(WEIGHTS)}")
    if evaluation.scenes not in ("urban", "rural", "both"):
        problems.append(f"evaluation.scenes={evaluation.scenes!r}: expected urban, rural or both")
    try:
        InferenceProtocol.from_eval_config(evaluation)
    except ConfigError as error:
        problems.append(f"evaluation: {error}")
    if problems:
        raise ConfigError("invalid tracks file:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# Commands


@dataclass(frozen=True)
class Launch:
    """A command line and the environment changes it runs with."""

    command: list[str]
    env: dict[str, str]


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


def launch_command(script: str, args: list[str], *, nproc: int, cards: list[int] | None, accelerator: str,
                   launcher: str, master_port: int, python: str = sys.executable) -> Launch:
    """The command that runs ``scripts/{script}`` on ``nproc`` processes bound to ``cards``.

    Raises:
        ConfigError: if cards are given for a device type without cards (CPU).
    """
    env = {"MAPSAGE_ACCELERATOR": accelerator}
    variable = visible_devices_env(accelerator)
    if cards and variable is None:
        raise ConfigError(f"cards {cards} given, but the accelerator is {accelerator}, which has no cards: "
                          "give 'processes: N' instead")
    card_list = ",".join(str(c) for c in cards or [])
    path = str(SCRIPTS / script)
    if launcher == "torchrun":
        if cards:
            env[variable] = card_list
        command = [python, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={master_port}", path, *args]
    elif launcher == "deepspeed":
        deepspeed = str(Path(python).with_name("deepspeed"))
        if cards and launcher_selects_by_include(accelerator):
            selection = [f"--include=localhost:{card_list}"]
        else:
            if cards:
                env[variable] = card_list
            selection = [f"--num_gpus={nproc}"]
        command = [deepspeed, *selection, f"--master_port={master_port}", path, *args]
    else:
        raise ConfigError(f"launcher={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    return Launch(command, env)


def evaluation_overrides(evaluation: TrackEvaluation) -> list[str]:
    """``--set eval.*`` overrides that give a track's validation the leaderboard's settings."""
    fields = {f: getattr(evaluation, f) for f in EvalConfig.__dataclass_fields__}
    return [f"eval.{key}={json.dumps(value)}" for key, value in fields.items()]


def train_args(track: TrackSpec, config: TracksConfig, run_dir: Path) -> list[str]:
    """Arguments of ``scripts/finetune.py`` for ``track``."""
    args = []
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


def eval_args(evaluation: TrackEvaluation, *, weights_dir: Path, data_root: str, report_dir: Path) -> list[str]:
    """Arguments of ``scripts/evaluate.py``: the same protocol for every track."""
    args = ["--model", str(weights_dir), "--data-root", data_root, "--split", evaluation.split,
            "--scenes", evaluation.scenes, "--batch-size", str(evaluation.batch_size),
            "--mode", evaluation.mode, "--tile", str(evaluation.tile), "--stride", str(evaluation.stride),
            "--tta-scales", ",".join(f"{s:g}" for s in evaluation.tta_scales),
            "--window-batch-size", str(evaluation.window_batch_size),
            "--boundary-dilation-ratio", str(evaluation.boundary_dilation_ratio),
            "--num-panels", str(evaluation.num_panels), "--output-dir", str(report_dir)]
    if evaluation.tta_flip:
        args += ["--tta-flip", ",".join(evaluation.tta_flip)]
    if evaluation.boundary_width is not None:
        args += ["--boundary-width", str(evaluation.boundary_width)]
    if evaluation.max_images is not None:
        args += ["--max-images", str(evaluation.max_images)]
    return args


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class TrackStatus:
    """How a track went; written to ``<track>/status.json`` and into the leaderboard."""

    name: str
    status: str = "pending"  # pending | training | evaluating | ok | failed
    failed_phase: str | None = None  # config | train | eval
    error: str | None = None
    cards: list[int] | None = None
    processes: int = 1
    master_port: int | None = None
    data_root: str | None = None
    train_command: list[str] | None = None
    eval_command: list[str] | None = None
    train_wall_s: float | None = None
    eval_wall_s: float | None = None
    started: float | None = None
    finished: float | None = None


class _Job:
    """A running phase of a track: its process group, log file and start time."""

    def __init__(self, launch: Launch, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        env.update(launch.env)
        self.log = log
        self.handle = log.open("w")
        self.handle.write("$ " + " ".join(launch.command) + "\n")
        self.handle.flush()
        self.started = time.time()
        # A session of its own: the whole process tree can be stopped by this id.
        self.process = subprocess.Popen(launch.command, env=env, stdout=self.handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None:
            self.handle.close()
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.handle.close()


class TrackRunner:
    """Runs the tracks of a :class:`TracksConfig` concurrently and writes the leaderboard.

    Args:
        config: The tracks file.
        accelerator: Device type of every track (``gcu``, ``cuda``, ``cpu``).
        python: Interpreter the scripts run with.
        poll_seconds: How often finished processes are looked for.
    """

    def __init__(self, config: TracksConfig, *, accelerator: str, python: str = sys.executable,
                 poll_seconds: float = 1.0) -> None:
        self.config, self.accelerator, self.python, self.poll_seconds = config, accelerator, python, poll_seconds
        self.root = Path(config.output_dir)
        self.statuses = {t.name: TrackStatus(t.name, cards=t.cards, processes=t.nproc) for t in config.tracks}
        self._ports: set[int] = {t.master_port for t in config.tracks if t.master_port is not None}

    def track_dir(self, track: TrackSpec) -> Path:
        """Everything of ``track`` lives here."""
        return self.root / track.name

    def run(self, *, leaderboard_only: bool = False) -> dict[str, Any]:
        """Train (unless ``leaderboard_only``) and evaluate every track, then write the leaderboard."""
        self.root.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, tuple[str, _Job]] = {}
        try:
            for track in self.config.tracks:
                self.track_dir(track).mkdir(parents=True, exist_ok=True)
                if leaderboard_only:
                    self._restore_timings(track)
                    self._start_eval(track, jobs)
                else:
                    self._start_train(track, jobs)
            while jobs:
                time.sleep(self.poll_seconds)
                for name, (phase, job) in list(jobs.items()):
                    code = job.poll()
                    if code is not None:
                        del jobs[name]
                        self._finished(self._spec(name), phase, job, code, jobs)
        except BaseException:
            for _, job in jobs.values():
                job.stop()
            raise
        return self.write_leaderboard()

    # -- phases --------------------------------------------------------------------------------

    def _spec(self, name: str) -> TrackSpec:
        return next(t for t in self.config.tracks if t.name == name)

    def _port(self, track: TrackSpec) -> int:
        if track.master_port is not None:
            return track.master_port
        while True:
            port = _free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _start_train(self, track: TrackSpec, jobs: dict) -> None:
        status = self.statuses[track.name]
        status.started = time.time()
        directory = self.track_dir(track)
        args = train_args(track, self.config, directory / "run")
        try:
            resolved = load_config(recipe=track.recipe, config_file=track.config,
                                   overrides=_overrides_of(args))
            status.data_root = str(self.config.evaluation.data_root or resolved.data.root)
            if resolved.data.synthetic is not None:
                # Generated once here: tracks sharing the root would race to write it.
                ensure_synthetic_tree(resolved.data.root, resolved.data.synthetic)
            port = self._port(track)
            launch = launch_command("finetune.py", [*args, "--accelerator", self.accelerator], nproc=track.nproc,
                                    cards=track.cards, accelerator=self.accelerator, launcher=self.config.launcher,
                                    master_port=port, python=self.python)
        except MapSageError as error:
            self._fail(track, "config", str(error))
            return
        status.master_port, status.train_command = port, launch.command
        status.status = "training"
        self._save(track)
        jobs[track.name] = ("train", _Job(launch, directory / "train.log"))

    def _start_eval(self, track: TrackSpec, jobs: dict) -> None:
        status = self.statuses[track.name]
        directory = self.track_dir(track)
        weights = directory / "run" / self.config.evaluation.weights
        if not (weights / "model.safetensors").is_file():
            self._fail(track, "eval", f"no trained weights at {weights} (model.safetensors missing)")
            return
        data_root = status.data_root or self._data_root_from_run(track)
        if data_root is None:
            self._fail(track, "eval", "no data root: set evaluation.data_root in the tracks file")
            return
        status.data_root = data_root
        args = eval_args(self.config.evaluation, weights_dir=weights, data_root=data_root,
                         report_dir=directory / "eval")
        try:
            launch = launch_command("evaluate.py", [*args, "--accelerator", self.accelerator], nproc=track.nproc,
                                    cards=track.cards, accelerator=self.accelerator, launcher=self.config.launcher,
                                    master_port=self._port(track), python=self.python)
        except MapSageError as error:
            self._fail(track, "eval", str(error))
            return
        status.eval_command = launch.command
        status.status = "evaluating"
        self._save(track)
        jobs[track.name] = ("eval", _Job(launch, directory / "eval.log"))

    def _finished(self, track: TrackSpec, phase: str, job: _Job, code: int, jobs: dict) -> None:
        status = self.statuses[track.name]
        seconds = time.time() - job.started
        if phase == "train":
            status.train_wall_s = seconds
        else:
            status.eval_wall_s = seconds
        if code != 0:
            self._fail(track, phase,
                       f"exit status {code}: {_cause(job.log)}\nlast lines of {job.log}:\n{_tail(job.log)}")
            return
        if phase == "train":
            self._start_eval(track, jobs)
            return
        status.status, status.finished = "ok", time.time()
        self._save(track)

    def _fail(self, track: TrackSpec, phase: str, error: str) -> None:
        status = self.statuses[track.name]
        status.status, status.failed_phase, status.error, status.finished = "failed", phase, error, time.time()
        self._save(track)

    def _save(self, track: TrackSpec) -> None:
        path = self.track_dir(track) / "status.json"
        path.write_text(json.dumps(asdict(self.statuses[track.name]), indent=2) + "\n")

    def _restore_timings(self, track: TrackSpec) -> None:
        """Keep the training facts of an earlier run when only the leaderboard is rebuilt."""
        path = self.track_dir(track) / "status.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            status = self.statuses[track.name]
            status.train_wall_s, status.train_command = previous.get("train_wall_s"), previous.get("train_command")
            status.master_port = previous.get("master_port")

    def _data_root_from_run(self, track: TrackSpec) -> str | None:
        if self.config.evaluation.data_root:
            return self.config.evaluation.data_root
        resolved = self.track_dir(track) / "run" / "config.yaml"
        return read_yaml(resolved).get("data", {}).get("root") if resolved.is_file() else None

    # -- leaderboard ---------------------------------------------------------------------------

    def write_leaderboard(self) -> dict[str, Any]:
        """Write ``leaderboard.md`` and ``leaderboard.json``; returns the JSON content."""
        rows = []
        for track in self.config.tracks:
            status = self.statuses[track.name]
            row: dict[str, Any] = {"name": track.name, "status": status.status, "failed_phase": status.failed_phase,
                                   "error": status.error, "cards": track.cards, "processes": track.nproc,
                                   "master_port": status.master_port, "train_wall_s": status.train_wall_s,
                                   "eval_wall_s": status.eval_wall_s, "data_root": status.data_root,
                                   "output_dir": str(self.track_dir(track))}
            if status.status == "ok":
                report = read_report(self.track_dir(track) / "eval")
                names = report.get("class_names") or [f"class_{i}" for i in range(len(report["iou"]))]
                row.update(miou=report["miou"], iou=dict(zip(names, report["iou"])),
                           mean_boundary_iou=report.get("mean_boundary_iou"),
                           overall_accuracy=report.get("overall_accuracy"),
                           report=str(self.track_dir(track) / "eval"), model=report.get("name"))
            rows.append(row)
        rows.sort(key=lambda r: (r["status"] != "ok", -(r.get("miou") or 0.0)))
        evaluation = asdict(self.config.evaluation)
        data = {"evaluation": evaluation, "accelerator": self.accelerator, "launcher": self.config.launcher,
                "tracks": rows}
        (self.root / "leaderboard.json").write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
        (self.root / "leaderboard.md").write_text(leaderboard_text(rows, evaluation,
                                                                   [Path(r["report"]) for r in rows if "report" in r]))
        return data


def leaderboard_text(rows: list[dict[str, Any]], evaluation: dict[str, Any], reports: list[Path]) -> str:
    """Markdown: the scores table of :func:`mapsage_ds.report.leaderboard_markdown`, then every track's facts."""
    settings = EvalConfig(**{k: evaluation[k] for k in EvalConfig.__dataclass_fields__})
    protocol = InferenceProtocol.from_eval_config(settings)
    lines = ["# Leaderboard", "",
             f"Every track scored by scripts/evaluate.py on {evaluation['split']} ({evaluation['scenes']} scenes, "
             f"{evaluation['weights']} weights) with one protocol: {json.dumps(protocol.to_dict())}, boundary band "
             f"{evaluation['boundary_width'] or evaluation['boundary_dilation_ratio']}"
             f"{' px' if evaluation['boundary_width'] else ' of the diagonal'}.", ""]
    if reports:
        lines += [leaderboard_markdown(reports)]
    else:
        lines += ["No track finished.", ""]
    roots = {r["data_root"] for r in rows if r["status"] == "ok"}
    if len(roots) > 1:
        lines += [f"**Warning:** tracks were evaluated on different data roots ({', '.join(sorted(roots))}); "
                  "set evaluation.data_root to compare them.", ""]
    lines += ["## Tracks", "", "| track | status | mIoU % | cards | processes | train wall time | eval wall time | "
              "output |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        status = row["status"] if row["status"] != "failed" else f"FAILED ({row['failed_phase']})"
        miou = f"{100 * row['miou']:.2f}" if row.get("miou") is not None else "—"
        cards = ",".join(map(str, row["cards"])) if row["cards"] else "—"
        lines.append(f"| {row['name']} | {status} | {miou} | {cards} | {row['processes']} | "
                     f"{_duration(row['train_wall_s'])} | {_duration(row['eval_wall_s'])} | {row['output_dir']} |")
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "## Failures", ""]
        for row in failures:
            first = (row["error"] or "").splitlines()[0] if row["error"] else ""
            lines.append(f"- **{row['name']}** ({row['failed_phase']}): {first} (log: {row['output_dir']})")
    return "\n".join(lines) + "\n"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _overrides_of(args: list[str]) -> list[str]:
    """The ``--set`` / ``--data-root`` / ``--output-dir`` of a finetune.py command line, as overrides."""
    overrides = []
    for flag, value in zip(args, args[1:]):
        if flag == "--set":
            overrides.append(value)
        elif flag == "--data-root":
            overrides.append(f"data.root={json.dumps(value)}")
        elif flag == "--output-dir":
            overrides.append(f"output_dir={json.dumps(value)}")
    return overrides


_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)$")


def _cause(path: Path) -> str:
    """The last exception line a process printed (the launcher's own wrapper error left aside)."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    causes = [m.group(1) for m in map(_EXCEPTION_LINE.match, lines) if m and "ChildFailedError" not in m.group(1)]
    return causes[-1] if causes else "see the log"


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-_LOG_TAIL:]


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null, so the leaderboard is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
