"""Model states per card under ZeRO: parameter counts and the bytes of each stage and offload.

Parameters, gradients, optimizer states and DeepSpeed's buffers follow the ZeRO paper's
partitioning (Rajbhandari et al., 2020) as DeepSpeed implements it.

Per trainable parameter, AdamW keeps two fp32 moments (8 bytes) and DeepSpeed an fp32 master copy
(4 bytes), in fp32 training too: its ZeRO optimizers always update a cloned fp32 partition.
ZeRO-0 (plain data parallelism) has no ZeRO optimizer: in fp32 AdamW updates the parameters
themselves (no master copy), in bf16/fp16 DeepSpeed's unfused mixed-precision optimizer keeps a
whole fp32 master on every card.
"""


from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mapsage_ds.errors import ConfigError

GIB = 1 << 30
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OFFLOADS = ("none", "optimizer", "optimizer+params")  # the last one only under ZeRO-3
# Per trainable parameter: Adam exp_avg and exp_avg_sq in fp32, and DeepSpeed's fp32 master copy,
# which it keeps in fp32 training too (measured: tests/zero_memory_probe.py).
ADAM_MOMENT_BYTES = 8
MASTER_BYTES = 4
OPTIMIZER_BYTES = MASTER_BYTES + ADAM_MOMENT_BYTES
FP32 = 4
ZERO_STAGES = (0, 1, 2, 3)
# ZeRO-0 all-reduces gradients through flat buckets of at most this many elements (DeepSpeed's
# MEMORY_OPT_ALLREDUCE_SIZE; no config key sets it).
STAGE0_ALLREDUCE_ELEMENTS = 500_000_000


# ----------------------------------------------------------------------------------------------
# Parameter counts


@dataclass(frozen=True)
class ParamCounts:
    """Parameter numbers of one model in one unfreezing phase.

    Attributes:
        total: all parameters.
        trainable: parameters with ``requires_grad`` (gradients and optimizer states).
        largest_group: trainable parameters in the largest optimizer group (its fp32 gradient
            partition is materialised at the step).
        largest_module: most parameters owned directly by one module (ZeRO-3 gathers module by module).
        persistent: parameters in tensors small enough to stay whole under ZeRO-3.
    """

    total: int
    trainable: int
    largest_group: int
    largest_module: int
    persistent: int

    @property
    def frozen(self) -> int:
        """Parameters without gradient."""
        return self.total - self.trainable


def count_parameters(
    module: nn.Module, *, param_groups: Sequence[Mapping[str, Any]] | None = None, persistence_threshold: int = 100_000
) -> ParamCounts:
    """Count ``module``'s parameters as they stand (``requires_grad`` decides trainable).

    Meta tensors and ZeRO-3 shards (counted whole) work.

    Args:
        module: the model, frozen layers already marked.
        param_groups: the optimizer groups (dicts with ``"params"``); one group of all trainable ones if None.
        persistence_threshold: ZeRO-3 keeps tensors with fewer elements whole on every card.
    """
    params = list(module.parameters())
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    groups = [sum(_numel(p) for p in group["params"]) for group in param_groups] if param_groups else [trainable]
    largest_module = max((sum(_numel(p) for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return ParamCounts(
        total=sum(_numel(p) for p in params), trainable=trainable, largest_group=max(groups, default=0),
        largest_module=largest_module,
        persistent=sum(_numel(p) for p in params if _numel(p) < persistence_threshold),
    )


def _numel(param: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a shard of it."""
    return getattr(param, "ds_numel", param.numel())


# ----------------------------------------------------------------------------------------------
# ZeRO arithmetic


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed ZeRO knobs that size buffers (DeepSpeed's defaults where a config is silent)."""

    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = False
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_ds_config(cls, ds_config: Mapping[str, Any]) -> ZeroSettings:
        """Settings of a DeepSpeed config dict, resolved through DeepSpeed's own defaults."""
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        zero = DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
        return cls(
            reduce_bucket_size=int(zero.reduce_bucket_size), overlap_comm=bool(zero.overlap_comm),
            prefetch_bucket_size=int(zero.prefetch_bucket_size),
            param_persistence_threshold=int(zero.param_persistence_threshold),
            max_live_parameters=int(zero.max_live_parameters), sub_group_size=int(zero.sub_group_size),
        )


@dataclass(frozen=True)
class ZeroBytes:
    """Model-state bytes of one card (device) and of its process on the host.

    Attributes:
        host: host bytes held while training (offloaded states).
        startup_host: host bytes while the model is built: stages 0, 1 and 2 build the whole model
            in fp32 in every process before it moves to the card; stage 3 builds it sharded.
    """

    parameters: int
    gradients: int
    optimizer: int
    buffers: int
    host: int
    startup_host: int = 0

    @property
    def device(self) -> int:
        """Device bytes of model states and DeepSpeed buffers."""
        return self.parameters + self.gradients + self.optimizer + self.buffers


def zero_bytes(
    *,
    total: int,
    trainable: int,
    cards: int,
    stage: int,
    offload: str,
    dtype_bytes: int,
    settings: ZeroSettings = ZeroSettings(),
    largest_group: int | None = None,
    largest_module: int = 0,
    persistent: int = 0,
) -> ZeroBytes:
    """Per-card bytes of parameters, gradients, optimizer states and DeepSpeed buffers.

    With Ψ = ``total``, Ψt = ``trainable``, N = ``cards``, b = ``dtype_bytes``, K = 12, P = ``persistent``:

    ========  ================  ====================  =============
    stage     parameters        gradients             optimizer
    ========  ================  ====================  =============
    0         b·Ψ               b·Ψt                  K₀·Ψt
    1         b·Ψ               b·Ψt                  K·Ψt / N
    2         b·Ψ               b·Ψt / N              K·Ψt / N
    3         b·Ψ / N + b·P     b·Ψt / N              K·Ψt / N
    ========  ================  ====================  =============

    Stage 0 is plain data parallelism, every card holding everything: K₀ = 12 with a bf16/fp16
    compute copy (fp32 master + moments), K₀ = 8 in fp32, where AdamW updates the parameters
    themselves. Its buffers are the flat all-reduce bucket (b × at most 5e8 elements, freed before
    the step) or, at the step, the AdamW temporary of the largest group plus, in bf16/fp16, the
    fp32 copies of all gradients its mixed-precision optimizer makes, whichever is larger; it
    cannot offload. Stage 1 reduces gradients after the whole backward, so full gradients exist at its end.
    Under stage 3 every parameter has its shard and the small ones also stay whole, and b × the
    gathered working set (largest module + prefetch bucket, at most ``max_live_parameters``) is
    added. Offload moves the optimizer column and the fp32 gradient partition (and under stage 2/3
    the gradient partition) to the host; ``optimizer+params`` also the parameter shards.

    Raises:
        ConfigError: for an impossible stage/offload pair or fewer than one card.
    """
    if (stage not in ZERO_STAGES or offload not in OFFLOADS or (offload != "none" and stage == 0)
            or (offload == "optimizer+params" and stage != 3)):
        raise ConfigError(f"ZeRO stage {stage} with offload '{offload}': expected stage 0-3, offload in "
                          f"{OFFLOADS} (stage 0 cannot offload; 'optimizer+params' only with stage 3)")
    if cards < 1:
        raise ConfigError(f"cards={cards}: expected at least 1")
    b, n = dtype_bytes, cards
    group = trainable if largest_group is None else largest_group
    if stage == 0:
        master = MASTER_BYTES * trainable if b < FP32 else 0
        reduce_bucket = b * min(trainable, STAGE0_ALLREDUCE_ELEMENTS)
        at_step = FP32 * group + (FP32 * trainable if b < FP32 else 0)
        return ZeroBytes(b * total, b * trainable, ADAM_MOMENT_BYTES * trainable + master,
                         max(reduce_bucket, at_step), 0, FP32 * total)
    shard = math.ceil(trainable / n)
    optimizer = OPTIMIZER_BYTES * shard
    bucket = settings.reduce_bucket_size * b * (2 if settings.overlap_comm else 1)
    # The optimizer steps one group's partition at a time (under stage 3 at most one sub-group of
    # sub_group_size local elements): its fp32 gradient is created for the step, and torch AdamW
    # allocates a temporary of the same size (the sqrt of the second moment; measured on CPU).
    step_elements = math.ceil(group / n)
    if stage == 3:
        step_elements = min(step_elements, settings.sub_group_size)
    step_temporary = FP32 * step_elements
    host = 0
    startup = FP32 * (total if stage < 3 else math.ceil(total / n) + largest_module)
    if stage < 3:
        parameters = b * total
        gradients = b * (trainable if stage == 1 else shard)
    else:
        working = min(largest_module + settings.prefetch_bucket_size, settings.max_live_parameters, total)
        sharded = b * math.ceil(total / n)
        parameters = b * (persistent + working) + (0 if offload == "optimizer+params" else sharded)
        host += sharded if offload == "optimizer+params" else 0
        gradients = b * shard
    if offload == "none":
        return ZeroBytes(parameters, gradients, optimizer, bucket + 2 * step_temporary, host, startup)
    # Offloaded: master weights, moments and the fp32 gradient partition live on the host. Stage 1
    # still reduces full gradients on the device; stage 2 reduces straight into the host's fp32
    # gradient; stage 3 keeps its gradient partition on the host. Stage 1/2 stage the updated
    # bf16 partition in a host buffer before copying it back.
    host += optimizer + FP32 * shard + step_temporary
    if stage < 3:
        host += b * shard
    if stage == 3:
        host += gradients
    if stage > 1:
        gradients = 0
    return ZeroBytes(parameters, gradients, 0, bucket, host, startup)
