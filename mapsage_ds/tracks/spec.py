"""The tracks file: its schema and its validation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mapsage_ds.config import from_dict, read_yaml
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.protocol import EvalProtocol

LAUNCHERS = ("torchrun", "deepspeed")
TRAIN_COMMANDS = ("finetune", "distill")
WEIGHTS = ("export", "best")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
        command: ``finetune`` or ``distill`` (a ``task: distill`` recipe): the command that trains it.
    """

    name: str
    recipe: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    data_root: str | None = None
    cards: list[int] | None = None
    processes: int | None = None
    master_port: int | None = None
    command: str = "finetune"

    @property
    def nproc(self) -> int:
        """Processes the track runs."""
        return self.processes or (len(self.cards) if self.cards else 1)


@dataclass(frozen=True)
class TrackEvaluation(EvalProtocol):
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


def read_tracks_data(path: str | Path) -> tuple[dict, list[str]]:
    """The YAML of a tracks (or plan) file, and the problems of its ``evaluation`` protocol.

    The protocol validates itself on construction; its problems are returned to be reported with
    all the others, and its keys are dropped from the data so that the rest can still be read.

    Raises:
        MissingFileError: if the file does not exist.
        ConfigError: if it has no ``tracks`` list.
    """
    data = read_yaml(path)
    if "tracks" not in data:
        raise ConfigError(f"{path}: no 'tracks' list")
    try:
        from_dict(TrackEvaluation, data.get("evaluation") or {}, prefix="evaluation.")
    except ConfigError as error:
        evaluation = {k: v for k, v in (data.get("evaluation") or {}).items()
                      if k not in EvalProtocol.__dataclass_fields__}
        return {**data, "evaluation": evaluation}, [str(error).replace("\n", "\n  ")]
    return data, []


def read_tracks_config(path: str | Path) -> TracksConfig:
    """Read and validate a tracks file.

    Raises:
        MissingFileError: if the file does not exist.
        ConfigError: on an unknown key, a wrong type, or any problem :func:`validate_tracks` finds.
    """
    data, protocol_problems = read_tracks_data(path)
    config = from_dict(TracksConfig, data)
    validate_tracks(config, problems=protocol_problems)
    return config


def validate_tracks(config: TracksConfig, *, problems: list[str] | None = None) -> None:
    """Check names, card groups, ports and the evaluation settings.

    Every problem is reported at once, together with ``problems`` already found.
    """
    problems = list(problems or [])
    if not config.tracks:
        problems.append("tracks: the list is empty")
    names = [t.name for t in config.tracks]
    problems += [f"track name {n!r}: use letters, digits, '_', '-' and '.'" for n in names if not _NAME.match(n)]
    problems += [f"track name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if config.launcher not in LAUNCHERS:
        problems.append(f"launcher={config.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    owner: dict[int, int] = {}
    for index, track in enumerate(config.tracks):
        if track.command not in TRAIN_COMMANDS:
            problems.append(f"track {track.name}: command={track.command!r}: expected one of "
                            f"{', '.join(TRAIN_COMMANDS)}")
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
    if problems:
        raise ConfigError("invalid tracks file:\n  " + "\n  ".join(problems))
