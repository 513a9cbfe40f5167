"""Check 6: validation during training and the final evaluation use the same settings.

Both run :func:`mapsage_ds.evaluation.run_evaluation` with a
:class:`~mapsage_ds.inference.Predictor` built from an inference protocol, so identical settings
mean identical numbers; this check lists every setting in which the two differ. Validation's
settings are those the run will actually get: a tracks file whose ``evaluation`` applies to
validation (``apply_to_validation``, its default) replaces the run's ``eval.*`` in every track's
training (:func:`validation_protocol`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mapsage_ds.config import from_dict, read_yaml
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.health.result import CheckResult, failed, passed
from mapsage_ds.tracks.spec import TrackEvaluation


def check_evaluation_consistency(validation: EvalProtocol, final: EvalProtocol, *, final_source: str,
                                 validation_source: str = "eval.*") -> CheckResult:
    """Validation's settings equal the final evaluation's (listing every difference).

    Args:
        validation: The settings validation during training uses (:func:`validation_protocol`).
        final: The settings of the final evaluation (a tracks file's ``evaluation`` section, or
            ``scripts/evaluate.py``'s defaults).
        final_source: Where ``final`` came from, for the message.
        validation_source: Where ``validation`` came from, for the message.
    """
    name = "6.evaluation_consistency"
    ours, theirs = validation.scored(), final.scored()
    keys = list(dict.fromkeys([*ours, *theirs]))
    differences = {key: (ours.get(key, "n/a"), theirs.get(key, "n/a")) for key in keys
                   if ours.get(key, "n/a") != theirs.get(key, "n/a")}
    summary = ours["mode"] + (f" {ours['tile']}/{ours['stride']}" if ours["mode"] == "slide" else "")
    summary += f", scales {ours['tta_scales']}, flips {ours['tta_flip'] or 'none'}"
    details = {"validation": ours, "final": theirs, "final_source": final_source,
               "validation_source": validation_source,
               "differences": {k: {"validation": a, "final": b} for k, (a, b) in differences.items()}}
    if differences:
        listed = "; ".join(f"{key}: validation {a} vs final {b}" for key, (a, b) in differences.items())
        return failed(name, f"{len(differences)} difference(s)", f"validation ({validation_source}) and final "
                      f"evaluation ({final_source}) differ: {listed}",
                      "use one protocol: set the run's eval.* to the final evaluation's settings (run_tracks.py "
                      "passes its evaluation section to every track)", **details)
    return passed(name, summary, f"validation ({validation_source}) and final evaluation ({final_source}) use the "
                                 "same settings and the same evaluator (run_evaluation)", **details)


def validation_protocol(run_eval: EvalProtocol, final_eval: str | Path | None) -> tuple[EvalProtocol, str]:
    """The settings validation during training will use, and where they come from.

    A tracks file whose evaluation applies to validation (``evaluation.apply_to_validation``, on by
    default) gives every track's training its ``evaluation`` settings as ``--set eval.*``
    (:func:`mapsage_ds.tracks.launch.train_args`), so those replace the run's own; otherwise
    (no file, a run config, ``apply_to_validation: false``) validation uses ``run_eval``.

    Raises:
        ConfigError: if the tracks file's ``evaluation`` section is invalid.
    """
    if final_eval is None:
        return run_eval, "eval.*"
    data = read_yaml(final_eval)
    if "evaluation" not in data:
        return run_eval, "eval.*"
    evaluation = from_dict(TrackEvaluation, data["evaluation"] or {}, prefix="evaluation.")
    if not evaluation.apply_to_validation:
        return run_eval, "eval.*"
    names = [f.name for f in dataclasses.fields(EvalProtocol)]
    protocol = EvalProtocol(**{name: getattr(evaluation, name) for name in names})
    return protocol, f"{final_eval} (evaluation, applied to each track's validation)"


def read_final_eval(path: str | Path | None) -> tuple[EvalProtocol, str]:
    """The final evaluation's settings and where they came from.

    ``path`` is a tracks file (its ``evaluation`` section) or a run config (its ``eval``
    section); keys that are not evaluation settings (split, data root ...) are left aside.
    Without a file, the settings are ``scripts/evaluate.py``'s defaults.

    Raises:
        ConfigError: if the file has neither section, or a setting is invalid.
    """
    if path is None:
        return EvalProtocol(), "scripts/evaluate.py defaults"
    data = read_yaml(path)
    key = "evaluation" if "evaluation" in data else "eval" if "eval" in data else None
    if key is None:
        raise ConfigError(f"{path}: no 'evaluation' (tracks file) or 'eval' (run config) section")
    names = {f.name for f in dataclasses.fields(EvalProtocol)}
    section = {k: v for k, v in (data[key] or {}).items() if k in names}
    return from_dict(EvalProtocol, section, prefix=f"{key}."), f"{path} ({key})"
