"""Optimizer parameter groups: weight decay split and per-group learning-rate scales."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

# Parameters whose names contain these never get weight decay (besides every 1-D tensor).
_NO_DECAY_NAME_PARTS = ("norm", "bias", "pos_embed", "position", "cls_token", "register_tokens", "mask_token")


def wants_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Weights of matmuls and convolutions decay; norms, biases and embeddings-as-tokens do not."""
    # Under ZeRO-3 a parameter is an empty 1-D shard: its real shape is ds_shape.
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) > 1 and not any(part in name for part in _NO_DECAY_NAME_PARTS)


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    *,
    weight_decay: float,
    lr_scale_of: Callable[[str], float] | None = None,
) -> list[dict[str, Any]]:
    """Group trainable parameters by (learning-rate scale, decay or not).

    Every trainable parameter lands in exactly one group and no group is empty (DeepSpeed
    drops empty groups, which would shift the schedule's view of them). Each group carries
    ``lr_scale``; the schedule sets ``lr = base × lr_scale × factor``.

    Args:
        named_parameters: e.g. ``model.named_parameters()``; frozen ones are skipped.
        weight_decay: decay of the decaying groups.
        lr_scale_of: learning-rate multiplier of a parameter name (layer decay); 1 if None.
    """
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        scale = lr_scale_of(name) if lr_scale_of else 1.0
        decay = wants_weight_decay(name, param)
        group = groups.setdefault((scale, decay), {
            "params": [], "names": [], "lr_scale": scale, "weight_decay": weight_decay if decay else 0.0,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (k[0], k[1]))]


def layer_decay_scale(
    *,
    layer_id: Callable[[str], int | None],
    num_layers: int,
    layer_decay: float,
    backbone_lr_mult: float,
    model_prefix: str = "model.",
) -> Callable[[str], float]:
    """Learning-rate multiplier per parameter name for layer-wise decay.

    A backbone parameter with layer id ``i`` gets ``backbone_lr_mult × layer_decay^(num_layers + 1 − i)``;
    head parameters (layer id None, or outside ``model_prefix``, e.g. auxiliary heads of the task) get 1.
    """
    def scale(name: str) -> float:
        if not name.startswith(model_prefix):
            return 1.0
        layer = layer_id(name.removeprefix(model_prefix))
        if layer is None:
            return 1.0
        return backbone_lr_mult * layer_decay ** (num_layers + 1 - layer)

    return scale
