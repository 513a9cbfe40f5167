"""Several experiment tracks at once on disjoint card groups, scored alike into one leaderboard.

A tracks file (YAML) lists the tracks (a recipe, a config file and ``--set`` overrides each, a
card group or a process count) and one ``evaluation`` section. Every track trains in its own
process group: its own cards (through the runtime's visible-devices variable), its own master
port, its own output directory and log. When a track's training ends, ``mapsage-evaluate``
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

Run again with ``resume``, the tracks that ended ``ok`` are kept as they are; a track whose
training finished (its ``export/`` is written last) is only evaluated again; the others continue
from their latest checkpoint (``--resume``), or start over when none was written.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mapsage_ds.builders import check_generation_root
from mapsage_ds.config import load_config, read_yaml
from mapsage_ds.data.synthetic import ensure_synthetic_tree
from mapsage_ds.errors import MapSageError
from mapsage_ds.evaluation.metrics import class_names_or_default
from mapsage_ds.evaluation.report import read_report
from mapsage_ds.files import write_json
from mapsage_ds.runtime import checkpoint
from mapsage_ds.runtime.network import free_port
from mapsage_ds.tracks.launch import Job, eval_args, launch_command, overrides_of, train_args
from mapsage_ds.tracks.leaderboard import leaderboard_text
from mapsage_ds.tracks.spec import TracksConfig, TrackSpec
from mapsage_ds.training.run_dir import RUN_MARKER

_LOG_TAIL = 2000
STATUS_FILE = "status.json"


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

    def run(self, *, leaderboard_only: bool = False, resume: bool = False) -> dict[str, Any]:
        """Train (unless ``leaderboard_only``) and evaluate every track, then write the leaderboard.

        With ``resume``, what an earlier run of these tracks finished is kept (see the module docstring).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        jobs: dict[str, tuple[str, Job]] = {}
        try:
            for track in self.config.tracks:
                self.track_dir(track).mkdir(parents=True, exist_ok=True)
                if leaderboard_only:
                    self._restore_timings(track)
                    self._start_eval(track, jobs)
                elif resume:
                    self._continue(track, jobs)
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
            port = free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    def _continue(self, track: TrackSpec, jobs: dict) -> None:
        """Keep, evaluate or resume what an earlier attempt left of ``track``."""
        directory = self.track_dir(track)
        previous = read_track_status(directory)
        if previous.get("status") == "ok" and (directory / "eval").is_dir():
            self.statuses[track.name] = TrackStatus(**previous)
            return
        run = directory / "run"
        if (run / "export" / "model.safetensors").is_file() and previous.get("train_command"):
            self._restore_timings(track)
            self.statuses[track.name].data_root = previous.get("data_root")
            self._start_eval(track, jobs)
            return
        if checkpoint.latest_tag(run / "checkpoints") is not None:
            self._start_train(track, jobs, continue_run="resume")
        else:  # stopped before its first checkpoint: nothing to keep
            self._start_train(track, jobs, continue_run="overwrite" if (run / RUN_MARKER).exists() else None)

    def _start_train(self, track: TrackSpec, jobs: dict, *, continue_run: str | None = None) -> None:
        status = self.statuses[track.name]
        status.started = time.time()
        directory = self.track_dir(track)
        args = train_args(track, self.config, directory / "run", continue_run=continue_run)
        try:
            resolved = load_config(recipe=track.recipe, config_file=track.config,
                                   overrides=overrides_of(args))
            status.data_root = str(self.config.evaluation.data_root or resolved.data.root)
            if resolved.data.synthetic is not None:
                # Generated once here: tracks sharing the root would race to write it.
                check_generation_root(resolved.data)
                ensure_synthetic_tree(resolved.data.root, resolved.data.synthetic)
            port = self._port(track)
            launch = launch_command(track.command, [*args, "--accelerator", self.accelerator], nproc=track.nproc,
                                    cards=track.cards, accelerator=self.accelerator, launcher=self.config.launcher,
                                    master_port=port, python=self.python)
        except MapSageError as error:
            self._fail(track, "config", str(error))
            return
        status.master_port, status.train_command = port, launch.command
        status.status = "training"
        self._save(track)
        jobs[track.name] = ("train", Job(launch, directory / "train.log"))

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
            launch = launch_command("evaluate", [*args, "--accelerator", self.accelerator], nproc=track.nproc,
                                    cards=track.cards, accelerator=self.accelerator, launcher=self.config.launcher,
                                    master_port=self._port(track), python=self.python)
        except MapSageError as error:
            self._fail(track, "eval", str(error))
            return
        status.eval_command = launch.command
        status.status = "evaluating"
        self._save(track)
        jobs[track.name] = ("eval", Job(launch, directory / "eval.log"))

    def _finished(self, track: TrackSpec, phase: str, job: Job, code: int, jobs: dict) -> None:
        status = self.statuses[track.name]
        seconds = time.time() - job.started
        if phase == "train":
            status.train_wall_s = seconds
        else:
            status.eval_wall_s = seconds
        if code != 0:
            self._fail(track, phase,
                       f"exit status {code}: {error_line(job.log)}\nlast lines of {job.log}:\n{_tail(job.log)}")
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
        write_json(self.track_dir(track) / STATUS_FILE, asdict(self.statuses[track.name]))

    def _restore_timings(self, track: TrackSpec) -> None:
        """Keep the training facts of an earlier run when only the leaderboard is rebuilt."""
        previous = read_track_status(self.track_dir(track))
        if previous:
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
                names = class_names_or_default(report.get("class_names"), len(report["iou"]))
                row.update(miou=report["miou"], iou=dict(zip(names, report["iou"])),
                           mean_boundary_iou=report.get("mean_boundary_iou"),
                           overall_accuracy=report.get("overall_accuracy"),
                           report=str(self.track_dir(track) / "eval"), model=report.get("name"))
            rows.append(row)
        rows.sort(key=lambda r: (r["status"] != "ok", -(r.get("miou") or 0.0)))
        evaluation = asdict(self.config.evaluation)
        data = {"evaluation": evaluation, "accelerator": self.accelerator, "launcher": self.config.launcher,
                "tracks": rows}
        write_json(self.root / "leaderboard.json", data)
        (self.root / "leaderboard.md").write_text(leaderboard_text(rows, evaluation,
                                                                   [Path(r["report"]) for r in rows if "report" in r]))
        return data


def read_track_status(directory: Path) -> dict[str, Any]:
    """The ``status.json`` an earlier run left in a track's directory (empty when there is none)."""
    path = directory / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# A command's own report of a MapSageError ("error: ...", "[rank N] error: ...", see mapsage_ds.cli), or the
# last line of an uncaught exception's traceback.
_EXCEPTION_LINE = re.compile(
    r"^(?:\[rank\d+\]:\s*)?((?:\[rank \d+\] )?error: .*|(?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)$")


def error_line(path: Path) -> str:
    """The last error line a process printed into the log ``path`` (the launcher's own wrapper error left aside)."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    causes = [m.group(1) for m in map(_EXCEPTION_LINE.match, lines) if m and "ChildFailedError" not in m.group(1)]
    return causes[-1] if causes else "see the log"


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-_LOG_TAIL:]
