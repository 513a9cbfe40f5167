"""Progressive unfreezing: which backbone layers are frozen when, and the param groups of each phase.

Flipping ``requires_grad`` on a live DeepSpeed engine does not take effect, and a zero learning
rate keeps weights but still costs gradients and optimizer state. So frozen parameters have
``requires_grad=False`` before ``deepspeed.initialize`` — no gradient, no optimizer state, no
backward through the frozen prefix — and at a phase boundary the engine is rebuilt with the new
trainable set (``mapsage_ds.runtime.engine.EngineBuilder``). :func:`phase_param_groups` is the one
rule "phase -> frozen set -> param groups" that training, the dry run, the planner and the health
checks share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from mapsage_ds.optim.param_groups import build_param_groups


@dataclass(frozen=True)
class UnfreezePlan:
    """Frozen fraction of the backbone as a function of the optimizer step."""

    initial_frozen_fraction: float = 0.0
    stages: tuple[tuple[int, float], ...] = ()  # (at_step, frozen_fraction), increasing steps

    def frozen_fraction(self, step: int) -> float:
        """Fraction frozen while running optimizer step ``step`` (0-based)."""
        fraction = self.initial_frozen_fraction
        for at_step, stage_fraction in self.stages:
            if step >= at_step:
                fraction = stage_fraction
        return fraction

    def phase(self, step: int) -> int:
        """Index of the phase ``step`` belongs to (0 before the first stage)."""
        return sum(step >= at_step for at_step, _ in self.stages)

    def is_boundary(self, step: int) -> bool:
        """True when ``step`` starts a new phase."""
        return any(step == at_step for at_step, _ in self.stages)


def frozen_layer_count(fraction: float, num_layers: int) -> int:
    """Backbone layer ids 0..num_layers + 1 exist; the first ``count`` of them are frozen."""
    return round(fraction * (num_layers + 2))


def set_frozen(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    layer_id: Callable[[str], int | None],
    num_layers: int,
    fraction: float,
    model_prefix: str = "model.",
) -> list[str]:
    """Freeze backbone parameters below the cut, unfreeze the rest; returns the frozen names."""
    cut = frozen_layer_count(fraction, num_layers)
    frozen = []
    for name, param in named_parameters:
        layer = layer_id(name.removeprefix(model_prefix)) if name.startswith(model_prefix) else None
        param.requires_grad_(layer is None or layer >= cut)
        if not param.requires_grad:
            frozen.append(name)
    return frozen


def phase_param_groups(
    named_parameters: Callable[[], Iterable[tuple[str, nn.Parameter]]],
    *,
    layer_id: Callable[[str], int | None],
    num_layers: int,
    frozen_fraction: float,
    weight_decay: float,
    lr_scale_of: Callable[[str], float] | None,
    model_prefix: str = "model.",
) -> tuple[list[str], list[dict[str, Any]]]:
    """Freeze the phase's share of the backbone and group what stays trainable.

    Args:
        named_parameters: a callable returning fresh ``(name, param)`` pairs (it is walked twice).
        layer_id: the model adapter's layer id of a parameter name (None for the head).
        num_layers: backbone depth.
        frozen_fraction: share of the backbone frozen in this phase (from :class:`UnfreezePlan`).
        weight_decay: decay of the decaying groups.
        lr_scale_of: learning-rate multiplier per parameter name (layer decay); 1 if None.
        model_prefix: prefix of the backbone's parameter names (``"model."`` inside a task).

    Returns:
        The frozen parameter names and the optimizer's param groups.
    """
    frozen = set_frozen(named_parameters(), layer_id=layer_id, num_layers=num_layers, fraction=frozen_fraction,
                        model_prefix=model_prefix)
    groups = build_param_groups(named_parameters(), weight_decay=weight_decay, lr_scale_of=lr_scale_of)
    return frozen, groups
