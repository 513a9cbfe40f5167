"""The plan file: the whole experiment plan (health, tracks, phase 2, TTA sweep, SAM, ensemble) as one YAML.

A plan file is a tracks file (:mod:`mapsage_ds.tracks.spec`) with one section per later phase;
``docs/plan_v4.yaml`` is the 8-card server plan, ``docs/plan_cpu_demo.yaml`` its CPU demo, and
``docs/plan.md`` explains every key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from mapsage_ds.config import from_dict, load_config, to_dict
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.protocol import RefineSettings
from mapsage_ds.evaluation.sweep import parse_sweep
from mapsage_ds.tracks.spec import TrackEvaluation, TracksConfig, TrackSpec, read_tracks_data, validate_tracks

ENSEMBLE_WEIGHTS = ("miou", "equal")
TEACHER_WEIGHTS = ("best", "export")


@dataclass
class PlanTrack(TrackSpec):
    """A track of the plan, and what phase 2 trains when it is the champion.

    Attributes:
        phase2_recipe: Recipe of phase 2 (every lever folded in) when this track wins; None: phase 2
            is skipped when it wins.
        phase2_overrides: ``--set`` overrides of phase 2, after the track's own ``overrides``.
    """

    phase2_recipe: str | None = None
    phase2_overrides: list[str] = field(default_factory=list)


@dataclass
class HealthPhase:
    """Phase 0: ``mapsage-health`` on the plan's cards; any FAIL stops the plan.

    Attributes:
        enabled: Run the health checks.
        recipe: Recipe checked (default: the first track's recipe, with its config and overrides).
        config: YAML config file applied after the recipe.
        overrides: ``--set`` overrides (after the first track's, when its recipe is used).
        args: More ``mapsage-health`` arguments, e.g. ``[--expect-device, gcu]`` or ``[--only, preflight]``.
    """

    enabled: bool = True
    recipe: str | None = None
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)


@dataclass
class StabilityRule:
    """When direct fine-tuning of the teacher track counts as unstable (any condition suffices).

    Attributes:
        failed_training: Its training failed (e.g. stopped on non-finite values) after writing ``best/``.
        max_skipped_steps: It skipped more optimizer steps than this (non-finite gradients).
        max_val_drop: Its last validation mIoU is below its best by more than this (a collapse).
        min_val_miou: Its best validation mIoU stays below this (it never converged).
    """

    failed_training: bool = True
    max_skipped_steps: int = 0
    max_val_drop: float = 0.02
    min_val_miou: float = 0.0


@dataclass
class DistillPhase:
    """Phase 2 as distillation: used instead of the champion's own phase 2 when the teacher track is unstable.

    Attributes:
        teacher_track: The DINOv3 track whose stability decides (None: never distil).
        recipe: The distillation recipe (``task: distill``); its student is what phase 2 trains.
        config: YAML config file applied after the recipe.
        overrides: ``--set`` overrides of the student run (e.g. its ``model.pretrained``).
        weights: The teacher's weights: ``best`` (its best validation step, before any collapse) or ``export``.
        unstable_when: The rule.
    """

    teacher_track: str | None = None
    recipe: str = "distill_dinov3_to_b5"
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    weights: str = "best"
    unstable_when: StabilityRule = field(default_factory=StabilityRule)


@dataclass
class Phase2:
    """Phase 2: the champion trained again with every lever (its ``phase2_recipe``), or distillation."""

    enabled: bool = True
    distill: DistillPhase = field(default_factory=DistillPhase)


@dataclass
class SweepPhase:
    """Phase 3: ``mapsage-evaluate --tta-sweep`` on the champion; its best protocol is used from then on."""

    enabled: bool = True
    scales: list[float] = field(default_factory=lambda: [0.75, 1.0, 1.25, 1.5])
    flips: list[str] = field(default_factory=lambda: ["h", "v", "d4"])

    @property
    def spec(self) -> list[str]:
        """The ``--tta-sweep`` words."""
        return [f"scales={','.join(f'{s:g}' for s in self.scales)}", f"flips={','.join(self.flips)}"]


@dataclass
class EnsemblePhase:
    """The weighted probability ensemble of the best scored models.

    Attributes:
        top: Members: the best ``top`` models of the tracks and phase 2 (fewer than 2 available: skipped; 0: off).
        weights: ``miou`` (each member weighted by its mIoU) or ``equal``.
        tta: Evaluate with the protocol the sweep chose (else the plan's one protocol).
    """

    top: int = 2
    weights: str = "miou"
    tta: bool = True


@dataclass
class PlanConfig:
    """A plan file.

    Attributes:
        tracks: Phase 1, as in a tracks file (plus each track's phase-2 recipe).
        evaluation: The one evaluation protocol: every track, phase 2 and the champion's choice.
        output_dir: Where everything goes (see :mod:`mapsage_ds.tracks.plan_runner`).
        launcher: ``torchrun`` or ``deepspeed``.
        data_root: Default data root of every job.
        cards: The server's cards, used by the one-job phases (health, phase 2, inference); None on CPU.
        processes: Processes of those phases without cards (default: one per card, else 1).
        refine: SAM refinement of the best model with the chosen TTA, as ``eval.refine`` (``{model:
            /weights/sam-vit-base}``, thresholds optional); None: no refinement phase.
    """

    tracks: list[PlanTrack]
    evaluation: TrackEvaluation = field(default_factory=TrackEvaluation)
    output_dir: str = "runs/plan"
    launcher: str = "torchrun"
    data_root: str | None = None
    cards: list[int] | None = None
    processes: int | None = None
    health: HealthPhase = field(default_factory=HealthPhase)
    phase2: Phase2 = field(default_factory=Phase2)
    tta_sweep: SweepPhase = field(default_factory=SweepPhase)
    refine: RefineSettings | None = None
    ensemble: EnsemblePhase = field(default_factory=EnsemblePhase)

    @property
    def nproc(self) -> int:
        """Processes of the one-job phases."""
        return self.processes or (len(self.cards) if self.cards else 1)

    def tracks_config(self, tracks: list[TrackSpec] | None = None, *, output_dir: str | Path) -> TracksConfig:
        """A tracks file of ``tracks`` (default: the plan's) with the plan's protocol, launcher and data root."""
        return TracksConfig(tracks=list(self.tracks if tracks is None else tracks), evaluation=self.evaluation,
                            output_dir=str(output_dir), launcher=self.launcher, data_root=self.data_root)

    def track(self, name: str) -> PlanTrack:
        """The track called ``name``."""
        return next(t for t in self.tracks if t.name == name)

    def fingerprint(self) -> str:
        """SHA-256 of the plan's content: a resumed plan must be the one that started.

        ``output_dir`` is left out: it says where the plan runs, not what it does (``--output-dir``).
        """
        content = {k: v for k, v in to_dict(self).items() if k != "output_dir"}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_plan(path: str | Path) -> PlanConfig:
    """Read and validate a plan file: every problem is reported at once, before anything runs.

    Raises:
        MissingFileError: if the file does not exist.
        ConfigError: on an unknown key, a wrong type, or any problem :func:`validate_plan` finds.
    """
    data, protocol_problems = read_tracks_data(path)
    plan = from_dict(PlanConfig, data)
    validate_plan(plan, problems=protocol_problems, source=str(path))
    return plan


def validate_plan(plan: PlanConfig, *, problems: list[str] | None = None, source: str = "plan") -> None:
    """Check the tracks (as a tracks file), the phases' settings, and that every recipe named resolves."""
    problems = list(problems or [])
    try:
        validate_tracks(plan.tracks_config(output_dir=plan.output_dir))
    except ConfigError as error:
        problems += [line.strip() for line in str(error).splitlines()[1:]]
    if plan.cards is not None and (not plan.cards or len(set(plan.cards)) != len(plan.cards)
                                   or any(c < 0 for c in plan.cards)):
        problems.append(f"cards {plan.cards}: expected distinct indices >= 0")
    if plan.cards is not None and plan.processes is not None and plan.processes != len(plan.cards):
        problems.append(f"processes={plan.processes} but {len(plan.cards)} cards")
    names = [t.name for t in plan.tracks]
    distill = plan.phase2.distill
    if distill.teacher_track is not None and distill.teacher_track not in names:
        problems.append(f"phase2.distill.teacher_track={distill.teacher_track!r}: not a track "
                        f"(tracks: {', '.join(names)})")
    if distill.weights not in TEACHER_WEIGHTS:
        problems.append(f"phase2.distill.weights={distill.weights!r}: expected one of {', '.join(TEACHER_WEIGHTS)}")
    rule = distill.unstable_when
    if rule.max_skipped_steps < 0 or rule.max_val_drop < 0 or not 0 <= rule.min_val_miou <= 1:
        problems.append("phase2.distill.unstable_when: max_skipped_steps and max_val_drop must be >= 0, "
                        "min_val_miou within [0, 1]")
    if plan.ensemble.weights not in ENSEMBLE_WEIGHTS:
        problems.append(f"ensemble.weights={plan.ensemble.weights!r}: expected one of {', '.join(ENSEMBLE_WEIGHTS)}")
    if plan.ensemble.top < 0:
        problems.append(f"ensemble.top={plan.ensemble.top}: expected 0 (off) or more")
    if plan.tta_sweep.enabled:
        try:
            parse_sweep(plan.tta_sweep.spec)
        except ConfigError as error:
            problems.append(f"tta_sweep: {error}")
    if plan.refine is not None:
        try:
            dataclasses.replace(plan.evaluation, refine=plan.refine)
        except ConfigError as error:
            problems += [line.strip().replace("eval.refine", "refine") for line in str(error).splitlines()[1:]]
        if plan.refine.model is not None and not Path(plan.refine.model).exists():
            problems.append(f"refine.model={plan.refine.model!r}: no such file or directory")
    # Recipes of the later phases are resolved now: a typo must not surface days into the plan.
    later = [(f"track {t.name}: phase2_recipe", t.phase2_recipe, None, t.phase2_overrides)
             for t in plan.tracks if t.phase2_recipe is not None]
    if plan.phase2.enabled and distill.teacher_track is not None:
        later.append(("phase2.distill", distill.recipe, distill.config, distill.overrides))
    if plan.health.enabled and (plan.health.recipe or plan.health.config):
        later.append(("health", plan.health.recipe, plan.health.config, plan.health.overrides))
    for what, recipe, config_file, overrides in later:
        try:
            load_config(recipe=recipe, config_file=config_file, overrides=list(overrides))
        except ConfigError as error:
            problems.append(f"{what}: {error}".replace("\n", "\n  "))
    if distill.teacher_track is not None and plan.phase2.enabled and not problems:
        task = load_config(recipe=distill.recipe, config_file=distill.config, overrides=list(distill.overrides)).task
        if task != "distill":
            problems.append(f"phase2.distill.recipe={distill.recipe!r} has task {task!r}: expected a task: distill "
                            "recipe")
    if problems:
        raise ConfigError(f"invalid plan file {source}:\n  " + "\n  ".join(problems))
