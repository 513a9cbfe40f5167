"""Runs a plan file phase by phase: health, tracks, champion, phase 2, TTA sweep, SAM refinement, ensemble.

Every phase is a command this toolkit already has, launched on the plan's cards
(``mapsage-health``, the tracks runner, ``mapsage-finetune``/``mapsage-distill``,
``mapsage-evaluate``); the runner only chains them, decides between them, and records. Each
phase's outcome is written to ``plan_state.json`` when it ends, so a plan stopped at any point
continues with ``resume`` from the phase it was in (a training phase from its latest
checkpoint); finished phases are kept. A phase that fails stops the plan; the report is written
either way.

Layout under ``output_dir``::

    plan.yaml          the plan as given           plan_state.json   every phase's outcome
    health/            the health report and log   tracks/           the tracks (tracks runner layout)
    phase2/            phase 2 as a one-track run  tta_sweep/        the sweep's leaderboard
    refine/            the SAM-refined evaluation  ensemble/         the ensemble's evaluation
    report.md, report.json   the phases and one leaderboard of every scored model and protocol
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapsage_ds.config import to_dict
from mapsage_ds.errors import ConfigError, MapSageError
from mapsage_ds.evaluation.protocol import EnsembleMember
from mapsage_ds.evaluation.report import read_report
from mapsage_ds.files import write_json, write_text_atomic
from mapsage_ds.runtime.network import free_port
from mapsage_ds.tracks.launch import eval_args, launch_command, run_to_end, train_args
from mapsage_ds.tracks.plan_spec import PlanConfig
from mapsage_ds.tracks.runner import TrackRunner, error_line, read_track_status
from mapsage_ds.tracks.spec import TrackEvaluation, TrackSpec
from mapsage_ds.tracks.stability import instability, read_metrics
from mapsage_ds.training.run_dir import OwnedRunDirectory, claim_output_dir

PHASES = ("health", "tracks", "champion", "phase2", "tta_sweep", "refine", "ensemble")
STATE_FILE = "plan_state.json"
PLAN_COPY = "plan.yaml"
REPORT_FILES = ("report.md", "report.json")
# What a plan writes; --overwrite removes exactly these.
PLAN_OUTPUTS = (PLAN_COPY, STATE_FILE, *PHASES, *REPORT_FILES)


class PhaseFailed(MapSageError):
    """A phase of the plan failed; the plan stops there (``--resume`` starts again from it)."""

    exit_status = 1


class PlanRunner:
    """Runs the phases of ``plan`` into ``plan.output_dir``.

    Args:
        plan: The plan file.
        plan_text: The plan file's text, kept as ``plan.yaml``.
        accelerator: Device type of every job (``gcu``, ``cuda``, ``cpu``).
        resume: Continue the plan already in ``output_dir`` (it must be the same plan).
        overwrite: Replace the plan already in ``output_dir``.
        python: Interpreter the commands run with.
        poll_seconds: How often running jobs are looked at.
        say: Where progress lines go.
    """

    def __init__(self, plan: PlanConfig, *, plan_text: str, accelerator: str, resume: bool = False,
                 overwrite: bool = False, python: str = sys.executable, poll_seconds: float = 1.0,
                 say: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.plan, self.plan_text, self.accelerator = plan, plan_text, accelerator
        self.resume, self.overwrite, self.python, self.poll_seconds, self.say = \
            resume, overwrite, python, poll_seconds, say
        self.root = Path(plan.output_dir)
        self.state: dict[str, Any] = {}

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or continue) the plan; returns the report. Raises :class:`PhaseFailed` when a phase fails."""
        owned = claim_output_dir(self.root, resume=self.resume, overwrite=self.overwrite, outputs=PLAN_OUTPUTS)
        try:
            for note in owned.notes:
                self.say(note)
            self.state = self._load_state(owned)
            try:
                for phase in PHASES:
                    self._run_phase(phase)
            finally:
                report = self.write_report()
            return report
        finally:
            owned.release()

    def _load_state(self, owned: OwnedRunDirectory) -> dict[str, Any]:
        fingerprint = self.plan.fingerprint()
        path = self.root / STATE_FILE
        if self.resume and path.is_file():
            state = json.loads(path.read_text())
            if state.get("fingerprint") != fingerprint:
                before = state.get("plan", {})
                changed = sorted(k for k in set(before) | set(to_dict(self.plan))
                                 if k != "output_dir" and before.get(k) != to_dict(self.plan).get(k))
                raise ConfigError(f"--resume: the plan differs from the one that started in {self.root} "
                                  f"(changed: {', '.join(changed) or 'its content'}); finished phases were decided "
                                  f"under the old one. Resume with the plan in {self.root / PLAN_COPY}, or pass "
                                  f"--overwrite or another --output-dir")
            return state
        write_text_atomic(self.root / PLAN_COPY, self.plan_text)
        state = {"run_id": owned.run_id, "fingerprint": fingerprint, "plan": to_dict(self.plan),
                 "accelerator": self.accelerator, "phases": {}}
        write_json(path, state)
        return state

    def _run_phase(self, phase: str) -> None:
        record = self.state["phases"].get(phase)
        if record and record["status"] in ("done", "skipped"):
            self.say(f"[{phase}] {record['status']} in an earlier run: {record['note']}")
            return
        attempt = (record or {}).get("attempt", 0) + 1
        self.say(f"[{phase}] starting" + (f" (attempt {attempt})" if attempt > 1 else ""))
        started = time.time()
        record = {"status": "running", "attempt": attempt, "started": _now(), "note": "", "result": {}}
        self._save(phase, record)
        try:
            status, note, result = getattr(self, f"_phase_{phase}")()
        except PhaseFailed as error:
            self._save(phase, {**record, "status": "failed", "note": str(error), "wall_s": time.time() - started,
                               "finished": _now()})
            raise
        self._save(phase, {**record, "status": status, "note": note, "result": result,
                           "wall_s": time.time() - started, "finished": _now()})
        self.say(f"[{phase}] {status}: {note}")

    def _save(self, phase: str, record: dict[str, Any]) -> None:
        self.state["phases"][phase] = record
        write_json(self.root / STATE_FILE, self.state)

    def _result(self, phase: str) -> dict[str, Any]:
        record = self.state["phases"].get(phase) or {}
        return (record.get("result") or {}) if record.get("status") == "done" else {}

    # -- launching ------------------------------------------------------------------------------

    def _run_command(self, command: str, args: list[str], log: Path) -> tuple[int, float]:
        log.parent.mkdir(parents=True, exist_ok=True)
        launch = launch_command(command, [*args, "--accelerator", self.accelerator], nproc=self.plan.nproc,
                                cards=self.plan.cards, accelerator=self.accelerator, launcher=self.plan.launcher,
                                master_port=free_port(), python=self.python)
        self.say(f"  $ {' '.join(launch.command)}  (log: {log})")
        return run_to_end(launch, log, poll_seconds=self.poll_seconds)

    def _track_runner(self, tracks: list[TrackSpec], directory: Path) -> TrackRunner:
        """The tracks runner of ``tracks`` into ``directory``, with the plan's protocol, launcher and cards' device."""
        return TrackRunner(self.plan.tracks_config(tracks, output_dir=directory), accelerator=self.accelerator,
                           python=self.python, poll_seconds=self.poll_seconds)

    def _evaluate(self, name: str, *, model: str | None, protocol: TrackEvaluation, data_root: str,
                  extra: list[str] = ()) -> dict[str, Any]:
        """``mapsage-evaluate`` of ``model`` (None: the protocol's ensemble) into ``output_dir/name``.

        Returns its report (``metrics.json``, or ``tta_sweep.json`` for a sweep).
        """
        directory = self.root / name
        args = eval_args(protocol, weights_dir=model, data_root=data_root, report_dir=directory / "eval")
        code, _ = self._run_command("evaluate", [*args, *extra], directory / "eval.log")
        if code != 0:
            raise PhaseFailed(f"mapsage-evaluate exited with status {code}: {error_line(directory / 'eval.log')} "
                              f"(log: {directory / 'eval.log'})")
        sweep = directory / "eval" / "tta_sweep.json"
        return json.loads(sweep.read_text()) if sweep.is_file() else read_report(directory / "eval")

    # -- phases ---------------------------------------------------------------------------------
    # Each returns (status, note, result): status "done" or "skipped"; raising PhaseFailed stops the plan.

    def _phase_health(self) -> tuple[str, str, dict]:
        health = self.plan.health
        if not health.enabled:
            return "skipped", "health.enabled is false", {}
        first = self.plan.tracks[0]
        own = health.recipe is not None or health.config is not None
        # The run the checks look at, built as a track's training command is (evaluation overrides included).
        checked = TrackSpec(name="health", recipe=health.recipe, config=health.config,
                            overrides=list(health.overrides)) if own else \
            TrackSpec(name="health", recipe=first.recipe, config=first.config,
                      overrides=[*first.overrides, *health.overrides], data_root=first.data_root)
        directory = self.root / "health"
        args = train_args(checked, self.plan.tracks_config(output_dir=self.root / "tracks"), directory / "run")
        args += ["--report", str(directory / "health_check.json"), "--final-eval", str(self.root / PLAN_COPY),
                 *health.args]
        code, _ = self._run_command("health", args, directory / "health.log")
        report_path = directory / "health_check.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        failed = [f"{r['name']}: {r.get('message', '')}".strip() for r in report.get("results", [])
                  if r.get("status") == "FAIL"]
        if code != 0:
            raise PhaseFailed(f"health checks failed ({'; '.join(failed) or error_line(directory / 'health.log')});"
                              f" nothing was trained. Fix them, then --resume (report: {report_path})")
        summary = report.get("summary", {})
        return "done", ", ".join(f"{count} {name}" for name, count in summary.items() if count), \
            {"report": str(report_path), "summary": summary}

    def _phase_tracks(self) -> tuple[str, str, dict]:
        directory = self.root / "tracks"
        data = self._track_runner(self.plan.tracks, directory).run(resume=directory.is_dir())
        rows = [_track_row(row, self.plan.evaluation.weights) for row in data["tracks"]]
        ok = [row for row in rows if row["status"] == "ok"]
        if not ok:
            raise PhaseFailed("no track finished: " + "; ".join(f"{r['name']} ({r['error']})" for r in rows)
                              + f" (leaderboard: {directory / 'leaderboard.md'})")
        failed = [row["name"] for row in rows if row["status"] != "ok"]
        note = f"{len(ok)} of {len(rows)} tracks scored; best {ok[0]['name']} (mIoU {ok[0]['miou']:.4f})"
        if failed:
            note += f"; failed: {', '.join(failed)} (see {directory / 'leaderboard.md'})"
        return "done", note, {"tracks": rows, "leaderboard": str(directory / "leaderboard.md")}

    def _phase_champion(self) -> tuple[str, str, dict]:
        ranking = [row for row in self._result("tracks")["tracks"] if row["status"] == "ok"]
        champion = ranking[0]
        result = {"champion": champion["name"], "miou": champion["miou"], "mode": "none", "reasons": []}
        distill = self.plan.phase2.distill
        if not self.plan.phase2.enabled:
            result["why"] = "phase2.enabled is false"
        elif distill.teacher_track is not None and (reasons := self._teacher_instability()):
            teacher_run = self.root / "tracks" / distill.teacher_track / "run"
            weights = teacher_run / distill.weights
            if not (weights / "model.safetensors").is_file():
                raise PhaseFailed(f"track {distill.teacher_track} was unstable ({'; '.join(reasons)}) but left no "
                                  f"{distill.weights}/ weights to distil from ({weights})")
            result.update(mode="distill", reasons=reasons, teacher=distill.teacher_track, teacher_weights=str(weights),
                          why=f"direct fine-tuning of {distill.teacher_track} was unstable: {'; '.join(reasons)}")
        elif (recipe := self.plan.track(champion["name"]).phase2_recipe) is not None:
            result.update(mode="finetune", recipe=recipe,
                          why=f"{champion['name']} leads with mIoU {champion['miou']:.4f}")
        else:
            result["why"] = f"track {champion['name']} has no phase2_recipe"
        phase2 = {"finetune": f"phase 2 trains {result.get('recipe')}",
                  "distill": f"phase 2 distils {distill.teacher_track} into {distill.recipe}",
                  "none": "no phase 2"}[result["mode"]]
        return "done", f"{champion['name']} (mIoU {champion['miou']:.4f}); {phase2}: {result['why']}", result

    def _teacher_instability(self) -> list[str]:
        directory = self.root / "tracks" / self.plan.phase2.distill.teacher_track
        return instability(read_track_status(directory), read_metrics(directory / "run"),
                           self.plan.phase2.distill.unstable_when)

    def _phase_phase2(self) -> tuple[str, str, dict]:
        decision = self._result("champion")
        if decision["mode"] == "none":
            return "skipped", decision["why"], {}
        directory = self.root / "phase2"
        track = self._phase2_track(decision)
        data = self._track_runner([track], directory).run(resume=(directory / track.name).is_dir())
        row = _track_row(data["tracks"][0], self.plan.evaluation.weights)
        if row["status"] != "ok":
            raise PhaseFailed(f"phase 2 ({track.name}) failed in {row['failed_phase']}: {row['error']} "
                              f"(log: {directory / track.name})")
        gain = row["miou"] - decision["miou"]
        return "done", f"{track.name}: mIoU {row['miou']:.4f} ({gain:+.4f} against {decision['champion']})", \
            {"mode": decision["mode"], **row}

    def _phase2_track(self, decision: dict[str, Any]) -> TrackSpec:
        placement = {"cards": self.plan.cards, "processes": self.plan.processes}
        if decision["mode"] == "distill":
            distill = self.plan.phase2.distill
            teacher = self.plan.track(distill.teacher_track)
            return TrackSpec(name=f"distill_{teacher.name}", recipe=distill.recipe, config=distill.config,
                             overrides=[*distill.overrides, f"teacher.path={json.dumps(decision['teacher_weights'])}"],
                             data_root=teacher.data_root, command="distill", **placement)
        champion = self.plan.track(decision["champion"])
        return TrackSpec(name=f"{champion.name}_phase2", recipe=champion.phase2_recipe, config=champion.config,
                         overrides=[*champion.overrides, *champion.phase2_overrides], data_root=champion.data_root,
                         command=champion.command, **placement)

    def candidates(self) -> list[dict[str, Any]]:
        """Every model scored with the one protocol (the finished tracks and phase 2), best first."""
        rows = [row for row in self._result("tracks").get("tracks", []) if row["status"] == "ok"]
        phase2 = self._result("phase2")
        if phase2:
            rows.append(phase2)
        return sorted(rows, key=lambda row: -row["miou"])

    def chosen_protocol(self) -> TrackEvaluation:
        """The plan's protocol with the TTA the sweep chose (the plan's own without a sweep)."""
        best = self._result("tta_sweep").get("best")
        if not best:
            return self.plan.evaluation
        return dataclasses.replace(self.plan.evaluation, tta_scales=best["tta_scales"], tta_flip=best["tta_flip"])

    def _data_root(self, row: dict[str, Any]) -> str:
        root = self.plan.evaluation.data_root or row.get("data_root")
        if root is None:
            raise PhaseFailed(f"no data root for {row['name']}: set evaluation.data_root in the plan")
        return root

    def _phase_tta_sweep(self) -> tuple[str, str, dict]:
        sweep = self.plan.tta_sweep
        if not sweep.enabled:
            return "skipped", "tta_sweep.enabled is false", {}
        champion = self.candidates()[0]
        report = self._evaluate("tta_sweep", model=champion["weights"], protocol=self.plan.evaluation,
                                data_root=self._data_root(champion), extra=["--tta-sweep", *sweep.spec])
        rows = report["leaderboard"]
        top = rows[0]
        base = next((r for r in rows if r["protocol"]["tta_scales"] == [1.0] and not r["protocol"]["tta_flip"]), None)
        best = {"tta_scales": top["protocol"]["tta_scales"], "tta_flip": top["protocol"]["tta_flip"],
                "miou": top["miou"], "windows_per_image": top["windows_per_image"], "name": top["name"]}
        note = (f"{len(rows)} protocols on {champion['name']}; best {top['name']}: mIoU {top['miou']:.4f}, "
                f"{top['windows_per_image']:.3g} network evaluations per image")
        if base is not None:
            note += f" (no TTA: {base['miou']:.4f})"
        return "done", note, {"model": champion["name"], "weights": champion["weights"], "best": best,
                              "no_tta_miou": None if base is None else base["miou"], "protocols": len(rows),
                              "report": str(self.root / "tta_sweep" / "eval" / "tta_sweep.md")}

    def _phase_refine(self) -> tuple[str, str, dict]:
        if self.plan.refine is None:
            return "skipped", "no refine section (SAM refinement is optional)", {}
        champion = self.candidates()[0]
        protocol = dataclasses.replace(self.chosen_protocol(), refine=self.plan.refine)
        report = self._evaluate("refine", model=champion["weights"], protocol=protocol,
                                data_root=self._data_root(champion))
        before = report["before_refinement"]["miou"]
        return "done", f"{champion['name']} with SAM: mIoU {before:.4f} -> {report['miou']:.4f}", \
            {"model": champion["name"], "weights": champion["weights"], "miou": report["miou"],
             "miou_before": before, "report": str(self.root / "refine" / "eval")}

    def _phase_ensemble(self) -> tuple[str, str, dict]:
        setting = self.plan.ensemble
        members = self.candidates()[:setting.top]
        if setting.top == 0 or len(members) < 2:
            return "skipped", ("ensemble.top is 0" if setting.top == 0 else
                               f"{len(members)} scored model(s): an ensemble needs 2"), {}
        raw = [row["miou"] if setting.weights == "miou" else 1.0 for row in members]
        weights = [w / sum(raw) for w in raw]
        spec = ",".join(f"{row['weights']}:{w:.4f}" for row, w in zip(members, weights))
        protocol = dataclasses.replace(self.chosen_protocol() if setting.tta else self.plan.evaluation,
                                       ensemble=[EnsembleMember(row["weights"], w) for row, w in zip(members, weights)])
        report = self._evaluate("ensemble", model=None, protocol=protocol, data_root=self._data_root(members[0]))
        names = " + ".join(f"{row['name']} ({w:.2f})" for row, w in zip(members, weights))
        return "done", f"{names}: mIoU {report['miou']:.4f}", \
            {"members": [{"name": row["name"], "weights": row["weights"], "weight": w}
                         for row, w in zip(members, weights)],
             "ensemble": spec, "miou": report["miou"], "protocol": {"tta_scales": protocol.tta_scales,
                                                                    "tta_flip": protocol.tta_flip},
             "report": str(self.root / "ensemble" / "eval")}

    # -- report ---------------------------------------------------------------------------------

    def leaderboard(self) -> list[dict[str, Any]]:
        """One row per scored model and protocol, best first."""
        base = {"tta_scales": self.plan.evaluation.tta_scales, "tta_flip": self.plan.evaluation.tta_flip}
        rows = [{"entry": row["name"], "kind": "phase 2" if row.get("mode") else "track", "miou": row["miou"],
                 "model": {"model": row["weights"]}, "tta": base, "refine": False} for row in self.candidates()]
        sweep = self._result("tta_sweep")
        if sweep:
            best = sweep["best"]
            rows.append({"entry": f"{sweep['model']} + TTA {best['name']}", "kind": "tta", "miou": best["miou"],
                         "model": {"model": sweep["weights"]},
                         "tta": {"tta_scales": best["tta_scales"], "tta_flip": best["tta_flip"]}, "refine": False})
        refine = self._result("refine")
        if refine:
            rows.append({"entry": f"{refine['model']} + TTA + SAM", "kind": "refine", "miou": refine["miou"],
                         "model": {"model": refine["weights"]}, "tta": self._chosen_tta(), "refine": True})
        ensemble = self._result("ensemble")
        if ensemble:
            rows.append({"entry": " + ".join(m["name"] for m in ensemble["members"]), "kind": "ensemble",
                         "miou": ensemble["miou"], "model": {"ensemble": ensemble["ensemble"]},
                         "tta": ensemble["protocol"], "refine": False})
        return sorted(rows, key=lambda row: -row["miou"])

    def _chosen_tta(self) -> dict[str, Any]:
        protocol = self.chosen_protocol()
        return {"tta_scales": protocol.tta_scales, "tta_flip": protocol.tta_flip}

    def write_report(self) -> dict[str, Any]:
        """Write ``report.json`` and ``report.md`` (the phases so far and the leaderboard); returns the JSON."""
        phases = [{"phase": name, **self.state["phases"].get(name, {"status": "pending", "note": ""})}
                  for name in PHASES]
        leaderboard = self.leaderboard()
        recommended = leaderboard[0] if leaderboard else None
        command = _predict_command(recommended, self.plan) if recommended else None
        data = {"plan": str(self.root / PLAN_COPY), "evaluation": to_dict(self.plan.evaluation), "phases": phases,
                "leaderboard": leaderboard, "recommended": recommended, "predict_command": command}
        write_json(self.root / REPORT_FILES[1], data)
        write_text_atomic(self.root / REPORT_FILES[0], _report_markdown(data, self.plan))
        return data


def _track_row(row: dict[str, Any], weights: str) -> dict[str, Any]:
    """The facts of a tracks-runner leaderboard row the plan keeps."""
    error = (row.get("error") or "").splitlines()
    return {"name": row["name"], "status": row["status"], "miou": row.get("miou"),
            "failed_phase": row.get("failed_phase"), "error": error[0] if error else None,
            "weights": str(Path(row["output_dir"]) / "run" / weights), "data_root": row.get("data_root"),
            "report": row.get("report"), "train_wall_s": row.get("train_wall_s")}


def _predict_command(row: dict[str, Any], plan: PlanConfig) -> str:
    """The ``mapsage-predict`` command that predicts with ``row``'s model and protocol."""
    evaluation = plan.evaluation
    model = (f"--model {row['model']['model']}" if "model" in row["model"]
             else f"--ensemble {row['model']['ensemble']}")
    words = ["mapsage-predict", model, "--input SCENES", "--output-dir PREDICTIONS", f"--mode {evaluation.mode}"]
    if evaluation.mode == "slide":
        words += [f"--tile {evaluation.tile}", f"--stride {evaluation.stride}"]
    words.append(f"--tta-scales {','.join(f'{s:g}' for s in row['tta']['tta_scales'])}")
    if row["tta"]["tta_flip"]:
        words.append(f"--tta-flip {','.join(row['tta']['tta_flip'])}")
    if row["refine"]:
        refine = plan.refine
        words.append(f"--refine sam --sam-model {refine.model} --sam-score-threshold {refine.score_threshold:g} "
                     f"--sam-confidence {refine.confidence:g} --sam-min-area {refine.min_area} "
                     f"--sam-max-regions {refine.max_regions}")
    return " ".join(words)


def _report_markdown(data: dict[str, Any], plan: PlanConfig) -> str:
    evaluation = plan.evaluation
    lines = ["# Plan report", "",
             f"Every model scored on {evaluation.split} ({evaluation.scenes} scenes, {evaluation.weights} weights) "
             f"with one protocol: {json.dumps(evaluation.scored())}; rows marked tta, refine and "
             "ensemble change only the TTA views, the SAM refinement and the models.", "",
             "## Phases", "", "| phase | status | wall time | outcome |", "|---|---|---|---|"]
    for phase in data["phases"]:
        wall = f"{phase['wall_s'] / 60:.1f} min" if phase.get("wall_s") is not None else "—"
        note = phase["note"].replace("\n", " ").replace("|", "/")
        lines.append(f"| {phase['phase']} | {phase['status']} | {wall} | {note} |")
    lines += ["", "## Leaderboard", "", "| rank | entry | kind | mIoU % | TTA | SAM |", "|---|---|---|---|---|---|"]
    for rank, row in enumerate(data["leaderboard"], start=1):
        tta = ",".join(f"{s:g}" for s in row["tta"]["tta_scales"]) + \
            (f" × {','.join(row['tta']['tta_flip'])}" if row["tta"]["tta_flip"] else "")
        lines.append(f"| {rank} | {row['entry']} | {row['kind']} | {100 * row['miou']:.2f} | {tta} | "
                     f"{'yes' if row['refine'] else '—'} |")
    if data["predict_command"]:
        lines += ["", "## Recommended", "", f"{data['recommended']['entry']} (mIoU "
                  f"{100 * data['recommended']['miou']:.2f}):", "", "```bash", data["predict_command"], "```"]
    return "\n".join(lines) + "\n"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


