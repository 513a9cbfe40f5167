"""Everything DeepSpeed: config resolution and cross-checks, the engine's life cycle.

DeepSpeed JSON configs hold parallelism and precision only. Batch geometry and gradient
clipping come from the run config and fill the ``"auto"`` fields; explicit values must agree
with it, and every disagreement is reported in one error. The optimizer is ours (torch AdamW,
so no fused op is compiled) and so is the learning-rate schedule. ZeRO stages 0 to 3 are
accepted; stage 0 is plain data parallelism (every rank keeps every state, gradients are
all-reduced), the cheapest to run wherever the model states fit (see ``docs/planner.md``).

ZeRO's communication settings depend on where the ranks run, not on the model, so the packaged
configs leave them out and :func:`fill_zero_comm` sets them for the accelerator in use
(:data:`ZERO_COMM_DEFAULTS`):

- on cards (``gcu``, ``cuda``): ``overlap_comm`` and ``contiguous_gradients`` on, reduce and
  all-gather buckets of 2e8 elements. Overlap hides the gradient reduction behind the backward
  pass on a separate stream; contiguous gradients copy each gradient into one preallocated
  buffer, which keeps the card's allocator from fragmenting; 2e8 is the bucket of Hugging Face's
  ZeRO-2 example config, below DeepSpeed's 5e8 default because overlap keeps two buckets alive.
- on ``cpu``: both off, buckets at DeepSpeed's 5e8. The CPU has no streams to overlap on and no
  fragmentation worth a copy of every gradient; fewer, larger gloo calls are faster.

A value the user's JSON config states explicitly wins over these defaults: a key present in
its ``zero_optimization`` section is never touched (the ZeRO-3 configs, for one, keep their own
smaller ``reduce_bucket_size``).

:class:`EngineBuilder` owns the life cycle: freeze the phase's layers, group the trainable
parameters, build the optimizer, ``deepspeed.initialize``, and at an unfreezing boundary carry the
state of the previous engine into the new one.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.optim.unfreeze import UnfreezePlan, phase_param_groups
from mapsage_ds.planning.model_states import ZERO_STAGES
from mapsage_ds.runtime.engine_state import capture_trainable_state, link_stage0_masters, restore_trainable_state

# The top-level ds_configs/ folder, installed as this package (setup.py's package_dir).
DS_CONFIG_PACKAGE = "mapsage_ds.ds_configs"
_FORBIDDEN_SECTIONS = {
    "scheduler": "the learning-rate schedule is set by mapsage_ds (optim.*): DeepSpeed's schedulers "
                 "overwrite per-group learning rates",
    "optimizer": "the optimizer is built by mapsage_ds from optim.* (torch AdamW with per-group lr scales)",
}


# ZeRO communication settings by where the ranks run (module docstring: why). Every accelerator
# but "cpu" is a card.
ZERO_COMM_DEFAULTS: dict[str, dict[str, Any]] = {
    "card": {"overlap_comm": True, "contiguous_gradients": True,
             "reduce_bucket_size": 200_000_000, "allgather_bucket_size": 200_000_000},
    "cpu": {"overlap_comm": False, "contiguous_gradients": False,
            "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000},
}


def ds_config_names() -> list[str]:
    """Names of the packaged DeepSpeed configs (``ds_configs/NAME.json``)."""
    folder = resources.files(DS_CONFIG_PACKAGE)
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def read_ds_config(name_or_path: str) -> dict[str, Any]:
    """Read a DeepSpeed JSON config by packaged name (``ds_configs/NAME.json``) or path."""
    path = Path(name_or_path)
    if path.is_file():
        text, source = path.read_text(), str(path)
    elif name_or_path in ds_config_names():
        resource = resources.files(DS_CONFIG_PACKAGE) / f"{name_or_path}.json"
        text, source = resource.read_text(), f"ds_configs/{name_or_path}.json"
    else:
        raise MissingFileError(
            f"train.deepspeed='{name_or_path}': no such file, and not a packaged config "
            f"(known: {', '.join(ds_config_names())})"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{source}: not valid JSON: {error}") from error


def fill_ds_config(
    ds_config: dict[str, Any], *, micro_batch_size: int, grad_accum_steps: int, world_size: int, grad_clip: float
) -> dict[str, Any]:
    """Resolve ``"auto"`` values from the run config and check the explicit ones against it.

    DeepSpeed requires ``train_batch_size = micro_batch × grad_accum × world_size``.

    Raises:
        ConfigError: listing every mismatch at once.
    """
    filled = copy.deepcopy(ds_config)
    expected = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
    }
    problems = [f"'{key}': {reason}" for key, reason in _FORBIDDEN_SECTIONS.items() if key in filled]
    for key, value in expected.items():
        current = filled.get(key, "auto")
        if current == "auto":
            filled[key] = value
        elif current != value:
            problems.append(
                f"'{key}' is {current!r} but the run config gives {value!r} "
                f"(micro_batch_size={micro_batch_size}, grad_accum_steps={grad_accum_steps}, "
                f"world_size={world_size}, grad_clip={grad_clip}); set it to \"auto\" or make them agree"
            )
    if filled.get("bf16", {}).get("enabled") and filled.get("fp16", {}).get("enabled"):
        problems.append("'bf16' and 'fp16' are both enabled: pick one")
    stage = filled.get("zero_optimization", {}).get("stage", 0)
    if stage not in ZERO_STAGES:
        problems.append(f"'zero_optimization.stage' is {stage!r}: expected one of {', '.join(map(str, ZERO_STAGES))}")
    if problems:
        raise ConfigError("DeepSpeed config does not fit the run:\n  " + "\n  ".join(problems))
    return filled


def zero_comm_defaults(accelerator: str) -> dict[str, Any]:
    """ZeRO communication settings for ranks on ``accelerator`` (``gcu``, ``cuda`` or ``cpu``)."""
    return dict(ZERO_COMM_DEFAULTS["cpu" if accelerator == "cpu" else "card"])


def fill_zero_comm(ds_config: dict[str, Any], *, accelerator: str) -> dict[str, Any]:
    """A copy of ``ds_config`` whose ZeRO communication settings not given explicitly are ``accelerator``'s.

    The settings are ``overlap_comm``, ``contiguous_gradients``, ``reduce_bucket_size`` and
    ``allgather_bucket_size`` (:func:`zero_comm_defaults`); a key already in the config's
    ``zero_optimization`` section wins. Also for stage 0, where DeepSpeed ignores them.
    """
    filled = copy.deepcopy(ds_config)
    zero = filled.setdefault("zero_optimization", {})
    for key, value in zero_comm_defaults(accelerator).items():
        zero.setdefault(key, value)
    return filled


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype parameters and activations have inside the engine."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def zero_stage(ds_config: dict[str, Any]) -> int:
    """ZeRO stage of a filled config."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_optimizer(
    param_groups: Sequence[dict[str, Any]], *, lr: float, betas: Sequence[float], eps: float
) -> torch.optim.Optimizer:
    """Torch AdamW over the given groups; each group's ``weight_decay`` is already set."""
    return torch.optim.AdamW(list(param_groups), lr=lr, betas=tuple(betas), eps=eps)


def initialize_engine(
    module: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]
) -> deepspeed.DeepSpeedEngine:
    """Wrap ``module`` and ``optimizer`` in a DeepSpeed engine.

    The module must already be in the compute dtype: DeepSpeed casts parameters but not
    buffers such as BatchNorm statistics. Under ZeRO-0 each parameter is linked to the fp32
    tensor the optimizer steps, which export and state carry-over read
    (:func:`~mapsage_ds.runtime.engine_state.link_stage0_masters`).
    """
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    if zero_stage(ds_config) == 0:
        link_stage0_masters(engine)
    return engine


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) across ranks.

    DeepSpeed, unlike DDP, never synchronises buffers, so each rank's running statistics drift
    on its own shard of the data; evaluation and export need one agreed model.
    """
    world_size = torch.distributed.get_world_size()
    for buffer in module.buffers():
        if buffer.is_floating_point():
            torch.distributed.all_reduce(buffer)
            buffer.div_(world_size)


@dataclass
class EngineBuilder:
    """Builds the DeepSpeed engine of an unfreezing phase, carrying state over from the previous one.

    Attributes:
        task: the module the engine wraps (network under ``model.``, plus task-only parts).
        ds_config: the filled DeepSpeed config.
        layer_id, num_layers: the backbone's layer numbering (for freezing and layer decay).
        unfreeze: which share of the backbone is frozen at which step.
        lr, betas, eps, weight_decay: AdamW settings; ``lr_scale_of`` gives each parameter's lr multiplier.
        verbose: print one line per build (rank 0).
    """

    task: nn.Module
    ds_config: dict[str, Any]
    layer_id: Callable[[str], int | None]
    num_layers: int
    unfreeze: UnfreezePlan
    lr: float
    betas: Sequence[float]
    eps: float
    weight_decay: float
    lr_scale_of: Callable[[str], float] | None = None
    verbose: bool = False

    def build(self, step: int, previous: deepspeed.DeepSpeedEngine | None = None) -> deepspeed.DeepSpeedEngine:
        """The engine whose trainable set is the plan's at ``step``.

        ``previous`` (the engine of the phase before) is destroyed after its state (fp32 master
        weights, Adam moments) is captured; that state is written into the new engine.
        """
        stage = zero_stage(self.ds_config)
        captured = None
        if previous is not None:
            captured = capture_trainable_state(previous, self.task, stage=stage)
            previous.destroy()
        frozen, groups = phase_param_groups(
            self.task.named_parameters, layer_id=self.layer_id, num_layers=self.num_layers,
            frozen_fraction=self.unfreeze.frozen_fraction(step), weight_decay=self.weight_decay,
            lr_scale_of=self.lr_scale_of,
        )
        engine = initialize_engine(self.task, build_optimizer(groups, lr=self.lr, betas=self.betas, eps=self.eps),
                                   self.ds_config)
        if captured is not None:
            restore_trainable_state(engine, self.task, captured, stage=stage, step=step)
        if self.verbose:
            trainable = sum(getattr(p, "ds_numel", p.numel()) for p in self.task.parameters() if p.requires_grad)
            print(f"step {step}: {len(frozen)} frozen tensors, {trainable / 1e6:.2f} M trainable parameters "
                  f"in {len(groups)} groups", flush=True)
        return engine
