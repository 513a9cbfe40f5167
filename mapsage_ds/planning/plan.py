"""Memory planner: bytes per card for every ZeRO stage × CPU offload × activation checkpointing option.

Model states follow the ZeRO paper's partitioning (Rajbhandari et al., 2020) as DeepSpeed
implements it: stage 1 partitions the optimizer states over the cards, stage 2 also the gradients,
stage 3 also the parameters. CPU offload moves the fp32 master weights, Adam moments and fp32
gradients to host memory (and under stage 3 optionally the parameter shards). Only trainable
parameters have gradients and optimizer states; frozen ones cost their parameter bytes only.
Per trainable parameter, AdamW keeps two fp32 moments (8 bytes) and DeepSpeed an fp32 master copy
(4 bytes), in fp32 training too: its ZeRO optimizers always update a cloned fp32 partition.

DeepSpeed's own buffers are counted as its configs size them: the gradient reduction bucket
(``reduce_bucket_size``, doubled with ``overlap_comm``), the fp32 gradient of one parameter group's
partition created at the optimizer step plus AdamW's temporary of that size, and under stage 3
the gathered parameters of the module being run plus the prefetch bucket, and the small
parameters kept whole (``stage3_param_persistence_threshold``). Activations come from
:mod:`mapsage_ds.planning.activation_memory`.

An option fits when its total stays below the card memory less a safety margin and a constant
for what no formula here sees (runtime context, collective buffers, allocator fragmentation).
The recommendation is the first option that fits in order of running cost (:func:`all_options`):
no offload before offload, ZeRO-1/2 before ZeRO-3, no checkpointing before checkpointing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mapsage_ds.errors import ConfigError
from mapsage_ds.planning.activation_memory import ActivationEstimate, estimate_activations, geometry_of

GIB = 1 << 30
DEFAULT_MARGIN = 0.10
DEFAULT_OVERHEAD = 2 * GIB
PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OFFLOADS = ("none", "optimizer", "optimizer+params")  # the last one only under ZeRO-3
# Per trainable parameter: Adam exp_avg and exp_avg_sq in fp32, and DeepSpeed's fp32 master copy,
# which it keeps in fp32 training too (measured: tests/zero_memory_probe.py).
ADAM_MOMENT_BYTES = 8
MASTER_BYTES = 4
OPTIMIZER_BYTES = MASTER_BYTES + ADAM_MOMENT_BYTES
FP32 = 4


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
        startup_host: host bytes while the model is built: stages 1 and 2 build the whole model in
            fp32 in every process before it moves to the card; stage 3 builds it sharded.
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
    1         b·Ψ               b·Ψt                  K·Ψt / N
    2         b·Ψ               b·Ψt / N              K·Ψt / N
    3         b·Ψ / N + b·P     b·Ψt / N              K·Ψt / N
    ========  ================  ====================  =============

    Stage 1 reduces gradients after the whole backward, so full gradients exist at its end.
    Under stage 3 every parameter has its shard and the small ones also stay whole, and b × the
    gathered working set (largest module + prefetch bucket, at most ``max_live_parameters``) is
    added. Offload moves the optimizer column and the fp32 gradient partition (and under stage 2/3
    the gradient partition) to the host; ``optimizer+params`` also the parameter shards.

    Raises:
        ConfigError: for an impossible stage/offload pair or fewer than one card.
    """
    if stage not in (1, 2, 3) or offload not in OFFLOADS or (offload == "optimizer+params" and stage != 3):
        raise ConfigError(f"ZeRO stage {stage} with offload '{offload}': expected stage 1-3, offload in "
                          f"{OFFLOADS} ('optimizer+params' only with stage 3)")
    if cards < 1:
        raise ConfigError(f"cards={cards}: expected at least 1")
    b, n = dtype_bytes, cards
    group = trainable if largest_group is None else largest_group
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


# ----------------------------------------------------------------------------------------------
# Options, estimates, the plan


@dataclass(frozen=True)
class Option:
    """One way to run: ZeRO stage, what is offloaded to the host, activation checkpointing."""

    stage: int
    offload: str = "none"
    checkpointing: bool = False

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``ZeRO-3 +offload(opt) +ckpt``."""
        text = f"ZeRO-{self.stage}"
        if self.offload != "none":
            text += " +offload(" + self.offload.replace("optimizer", "opt").replace("params", "param") + ")"
        return text + (" +ckpt" if self.checkpointing else "")


def all_options() -> list[Option]:
    """Every option in order of preference, cheapest to run first.

    Offloading is the most expensive (host-device traffic and Adam on the CPU every step), then
    ZeRO-3 (it gathers parameters in forward and again in backward: 1.5× the communication of
    stages 1 and 2), then activation checkpointing (one more forward of every block). Stages 1 and
    2 move the same volume per step (an all-reduce, or a reduce-scatter plus an all-gather), so
    among them the lower stage only wins when both need the same checkpointing.
    """
    options = [Option(stage, offload, checkpointing)
               for offload in OFFLOADS for stage in (1, 2, 3) for checkpointing in (False, True)
               if not (offload == "optimizer+params" and stage != 3)]
    return sorted(options, key=lambda o: (OFFLOADS.index(o.offload), o.stage == 3, o.checkpointing, o.stage))


@dataclass
class Estimate:
    """Memory of one option: model states, activations and the verdict against the card."""

    option: Option
    states: ZeroBytes
    activations: ActivationEstimate
    overhead: int
    usable: int
    host_usable: int | None = None  # per node; None when the host memory was not given
    cards: int = 1
    ds_config: str = ""

    @property
    def total(self) -> int:
        """Device bytes per card at the peak of a step, overhead included."""
        return self.states.device + self.activations.peak + self.overhead

    @property
    def host_per_node(self) -> int:
        """Peak host bytes of all the node's processes (the cards share one host): start-up or training."""
        return max(self.states.host, self.states.startup_host) * self.cards

    @property
    def fits(self) -> bool:
        """Whether the device (and, when known, the host) has room."""
        host_ok = self.host_usable is None or self.host_per_node <= self.host_usable
        return self.total <= self.usable and host_ok

    def breakdown(self) -> dict[str, int]:
        """Device bytes by kind."""
        return {"parameters": self.states.parameters, "gradients": self.states.gradients,
                "optimizer": self.states.optimizer, "buffers": self.states.buffers,
                "activations": self.activations.peak, "overhead": self.overhead}


@dataclass
class MemoryPlan:
    """The planner's answer: per-option estimates, the recommendation and the reasons."""

    model: str
    precision: str
    micro_batch_size: int
    crop_size: int
    cards: int
    card_memory: int
    margin: float
    overhead: int
    host_memory: int | None
    phases: list[tuple[int, float, ParamCounts]]  # (from step, frozen fraction, counts)
    planned_phase: int  # index into phases: the most demanding one
    estimates: list[Estimate]  # in order of preference
    configured: Option | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        """Device bytes an option may use per card."""
        return usable_bytes(self.card_memory, margin=self.margin, overhead=0)

    @property
    def recommended(self) -> Estimate | None:
        """The first option that fits, None if none does."""
        return next((e for e in self.estimates if e.fits), None)

    def estimate(self, option: Option) -> Estimate:
        """The estimate of ``option``."""
        return next(e for e in self.estimates if e.option == option)


def usable_bytes(card_memory: int, *, margin: float, overhead: int = 0) -> int:
    """Card bytes left after the safety margin (a fraction) and a constant overhead."""
    return int(card_memory * (1.0 - margin)) - overhead


def plan_memory(
    *,
    module: nn.Module,
    phases: Sequence[tuple[int, float, ParamCounts]],
    micro_batch_size: int,
    crop_size: int,
    precision: str,
    cards: int,
    card_memory: int,
    frozen_layers_of: Callable[[float], int],
    zero_settings: Mapping[int, ZeroSettings] | None = None,
    margin: float = DEFAULT_MARGIN,
    overhead: int = DEFAULT_OVERHEAD,
    host_memory: int | None = None,
    configured: Option | None = None,
    ds_config_names: Mapping[Option, str] | None = None,
    model_name: str = "",
) -> MemoryPlan:
    """Estimate every option for the most demanding unfreezing phase (the most trainable parameters).

    Args:
        module: the model (meta tensors are fine), used for its geometry.
        phases: ``(from_step, frozen_fraction, counts)`` per unfreezing phase; one entry without a plan.
        micro_batch_size: images per card per forward pass.
        crop_size: training crop side in pixels.
        precision: ``bf16``, ``fp16`` or ``fp32``.
        cards: data-parallel processes (one per card).
        card_memory: bytes per card.
        frozen_layers_of: frozen fraction -> number of frozen backbone layer ids.
        zero_settings: buffer settings per ZeRO stage (DeepSpeed defaults when absent).
        margin: fraction of the card kept free.
        overhead: bytes per card reserved for runtime context and fragmentation.
        host_memory: host bytes per node, to check offload options against; unchecked if None.
        configured: the run's own option, to report whether it fits.
        ds_config_names: how to select each option (shown with the recommendation).
        model_name: for the report.

    Raises:
        ConfigError: unknown precision, nothing to plan, or non-positive sizes.
    """
    if precision not in PRECISION_BYTES:
        raise ConfigError(f"precision '{precision}': expected one of {', '.join(PRECISION_BYTES)}")
    if not phases:
        raise ConfigError("no unfreezing phase to plan for")
    if card_memory <= 0 or cards < 1 or not 0.0 <= margin < 1.0:
        raise ConfigError(f"cards={cards}, card_memory={card_memory}, margin={margin}: expected cards >= 1, "
                          f"card_memory > 0 and 0 <= margin < 1")
    b = PRECISION_BYTES[precision]
    index = max(range(len(phases)), key=lambda i: (phases[i][2].trainable, -i))
    _, fraction, counts = phases[index]
    geometry = geometry_of(module)
    usable = usable_bytes(card_memory, margin=margin)
    host_usable = None if host_memory is None else usable_bytes(host_memory, margin=margin)
    estimates = []
    for option in all_options():
        settings = (zero_settings or {}).get(option.stage, ZeroSettings())
        states = zero_bytes(total=counts.total, trainable=counts.trainable, cards=cards, stage=option.stage,
                            offload=option.offload, dtype_bytes=b, settings=settings,
                            largest_group=counts.largest_group, largest_module=counts.largest_module,
                            persistent=counts.persistent)
        activations = estimate_activations(geometry, batch_size=micro_batch_size, crop_size=crop_size, dtype_bytes=b,
                                           frozen_layers=frozen_layers_of(fraction), checkpointing=option.checkpointing)
        estimates.append(Estimate(option, states, activations, overhead, usable, host_usable, cards,
                                  (ds_config_names or {}).get(option, "")))
    return MemoryPlan(model=model_name, precision=precision, micro_batch_size=micro_batch_size, crop_size=crop_size,
                      cards=cards, card_memory=card_memory, margin=margin, overhead=overhead, host_memory=host_memory,
                      phases=list(phases), planned_phase=index, estimates=estimates, configured=configured)


# ----------------------------------------------------------------------------------------------
# Explaining and printing


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _part_reason(estimate: Estimate, part: str, plan: MemoryPlan) -> str:
    option, counts = estimate.option, plan.phases[plan.planned_phase][2]
    size = _gib(estimate.breakdown()[part])
    if part == "parameters":
        if option.stage < 3:
            return f"parameters {size} GiB (every card holds all {_count(counts.total)} in {plan.precision})"
        return f"parameters {size} GiB (1/{plan.cards} shard + gathered working set)"
    if part == "gradients":
        if option.stage == 1:
            return f"gradients {size} GiB (full gradients of {_count(counts.trainable)} trainable parameters)"
        return f"gradients {size} GiB (1/{plan.cards} partition)"
    if part == "optimizer":
        return f"optimizer {size} GiB (fp32 master + Adam moments of 1/{plan.cards} of the trainable parameters)"
    if part == "buffers":
        return f"buffers {size} GiB (reduce bucket; fp32 gradient and AdamW temporary of a group at the step)"
    if part == "activations":
        how = "with checkpointing" if option.checkpointing else "without checkpointing"
        return f"activations {size} GiB ({plan.micro_batch_size} × {plan.crop_size}² {how})"
    return f"{part} {size} GiB"


def explain(estimate: Estimate, plan: MemoryPlan) -> str:
    """One line saying whether ``estimate`` fits and, if not, what takes the room."""
    if estimate.fits:
        return f"fits: {_gib(estimate.total)} of {_gib(estimate.usable)} GiB usable"
    if estimate.total > estimate.usable:
        parts = {k: v for k, v in estimate.breakdown().items() if k != "overhead"}
        largest = sorted(parts, key=parts.get, reverse=True)[:2]
        return (f"needs {_gib(estimate.total)} GiB > {_gib(estimate.usable)} GiB usable; largest: "
                + "; ".join(_part_reason(estimate, part, plan) for part in largest))
    when = "while training" if estimate.states.host >= estimate.states.startup_host else "while building the model"
    return (f"host memory: the node's {plan.cards} processes need {_gib(estimate.host_per_node)} GiB {when} > "
            f"{_gib(estimate.host_usable)} GiB usable on the host")


def format_plan(plan: MemoryPlan) -> str:
    """The plan as text: phases, a table per option, the recommendation and why the others do not fit."""
    lines = [f"Memory plan: {plan.model}, {plan.precision}, micro-batch {plan.micro_batch_size} × "
             f"{plan.crop_size}², {plan.cards} cards × {_gib(plan.card_memory)} GiB"]
    for i, (step, fraction, counts) in enumerate(plan.phases):
        mark = "  <- planned (most trainable parameters)" if i == plan.planned_phase and len(plan.phases) > 1 else ""
        lines.append(f"  from step {step:>6}: {fraction:4.0%} of the backbone frozen, "
                     f"{_count(counts.trainable)} of {_count(counts.total)} parameters trainable{mark}")
    lines.append(f"Usable per card: {_gib(plan.card_memory)} GiB − {plan.margin:.0%} margin = {_gib(plan.usable)} GiB, "
                 f"of which {_gib(plan.overhead)} GiB are reserved for runtime context and fragmentation.")
    header = (f"{'option':<36}{'params':>8}{'grads':>8}{'optim':>8}{'buffers':>8}{'activ':>8}"
              f"{'total':>8}{'host/node':>11}  verdict")
    lines += ["", "GiB per card:", header, "-" * len(header)]
    for e in plan.estimates:
        b = e.breakdown()
        host = _gib(e.host_per_node)
        verdict = "fits" if e.fits else "does not fit"
        mark = " (configured)" if e.option == plan.configured else ""
        lines.append(f"{e.option.label + mark:<36}{_gib(b['parameters']):>8}{_gib(b['gradients']):>8}"
                     f"{_gib(b['optimizer']):>8}{_gib(b['buffers']):>8}{_gib(b['activations']):>8}"
                     f"{_gib(e.total):>8}{host:>11}  {verdict}")
    best = plan.recommended
    lines.append("")
    if best is None:
        lines.append("Nothing fits: lower train.micro_batch_size or data.crop_size, freeze more of the backbone, "
                     "or use more cards.")
    else:
        how = f" ({best.ds_config})" if best.ds_config else ""
        host = f"; host: {_gib(best.host_per_node)} GiB per node" + (" (unchecked)" if plan.host_memory is None else "")
        lines.append(f"Recommended: {best.option.label}{how}: {_gib(best.total)} GiB per card{host}.")
    if plan.configured is not None:
        configured = plan.estimate(plan.configured)
        lines.append(f"Configured: {configured.option.label}: {explain(configured, plan)}.")
    rejected = [e for e in plan.estimates if not e.fits]
    if rejected:
        lines.append("Why the others do not fit:" if best else "Why nothing fits:")
        lines += [f"  {e.option.label}: {explain(e, plan)}" for e in rejected]
    costlier = [e.option.label for e in plan.estimates if e.fits and e is not best]
    if costlier:
        lines.append("Also fit, at a higher running cost (ZeRO-3, recomputation or offload): " + ", ".join(costlier))
    lines += [f"Note: {note}" for note in plan.notes]
    return "\n".join(lines)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``32GB``, ``32GiB``, ``32G`` or a byte count -> bytes. Memory sizes are binary: 32GB = 32 GiB.

    Raises:
        ConfigError: for text that is not a size.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"memory size '{text}': expected e.g. 32GB, 80GiB or a number of bytes")
    scale = 1 << (10 * "KMGT".find(match.group(2).upper()) + 10) if match.group(2) else 1
    return int(float(match.group(1)) * scale)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bf16`` etc."""
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise ConfigError(f"compute dtype {dtype}: expected bf16, fp16 or fp32")
    return names[dtype]


# ----------------------------------------------------------------------------------------------
# From a run config (used by scripts/plan.py and finetune --dry-run)


def selection_hint(option: Option, precision: str) -> str:
    """The ``--set`` overrides (and any DeepSpeed config edit) that select ``option``."""
    from mapsage_ds.runtime.engine import ds_config_names

    name = f"zero{option.stage}_offload_{precision}" if option.offload == "optimizer+params" else \
        f"zero{option.stage}_{precision}"
    hint = f"train.deepspeed={name}"
    if name not in ds_config_names():
        base = f"zero{option.stage}_{precision}"
        hint = f"train.deepspeed=<a copy of {base}.json with zero_optimization.offload_optimizer.device=cpu"
        hint += " and offload_param.device=cpu>" if option.offload == "optimizer+params" else ">"
    return hint + f", train.activation_checkpointing={str(option.checkpointing).lower()}"


def configured_option(ds_config: Mapping[str, Any], *, checkpointing: bool) -> Option:
    """The option a DeepSpeed config plus the checkpointing switch select."""
    zero = ds_config.get("zero_optimization", {})
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    offload = "none"
    if offloaded("offload_optimizer"):
        offload = "optimizer+params" if offloaded("offload_param") else "optimizer"
    return Option(int(zero.get("stage", 0)), offload, checkpointing)


def plan_for_run(
    *,
    built: Any,
    ds_config: Mapping[str, Any],
    unfreeze: Any,
    weight_decay: float,
    lr_scale_of: Any,
    micro_batch_size: int,
    crop_size: int,
    activation_checkpointing: bool,
    model_name: str,
    cards: int,
    card_memory: int,
    margin: float = DEFAULT_MARGIN,
    overhead: int = DEFAULT_OVERHEAD,
    host_memory: int | None = None,
) -> MemoryPlan:
    """Plan a run on ``cards`` cards.

    Args:
        built: the run's :class:`~mapsage_ds.models.factory.BuiltModel`, built on the meta device
            (nothing allocated, no weights read).
        ds_config: the run's DeepSpeed config (its ZeRO settings and precision).
        unfreeze: the :class:`~mapsage_ds.optim.unfreeze.UnfreezePlan`; frozen layers and optimizer
            groups are set up per phase exactly as training does.
        weight_decay: decay of the run's decaying param groups.
        lr_scale_of: learning-rate multiplier per parameter name (layer decay).
        micro_batch_size: images per card and step.
        crop_size: training crop side in pixels.
        activation_checkpointing: whether backbone blocks are recomputed in backward.
        model_name: how the report names the model.
        cards: data-parallel processes, one per card.
        card_memory: memory of one card, bytes.
        margin: fraction of each card kept free.
        overhead: per-card runtime context and buffers, bytes.
        host_memory: host memory per node, bytes (None: reported, not checked).
    """
    from mapsage_ds.optim.unfreeze import frozen_layer_count, phase_param_groups
    from mapsage_ds.runtime.engine import compute_dtype, ds_config_names, read_ds_config

    precision = dtype_name(compute_dtype(dict(ds_config)))
    module, layers = built.module, built.num_layers
    schedule = [(0, unfreeze.initial_frozen_fraction), *unfreeze.stages]
    zero_settings = {}
    for stage in (1, 2, 3):
        name = f"zero{stage}_{precision}"
        zero_settings[stage] = ZeroSettings.from_ds_config(read_ds_config(name) if name in ds_config_names() else {})
    configured = configured_option(ds_config, checkpointing=activation_checkpointing)
    zero_settings[configured.stage] = ZeroSettings.from_ds_config(ds_config)
    threshold = zero_settings[3].param_persistence_threshold
    phases = []
    for step, fraction in schedule:
        _, groups = phase_param_groups(module.named_parameters, layer_id=built.layer_id, num_layers=layers,
                                       frozen_fraction=fraction, weight_decay=weight_decay, lr_scale_of=lr_scale_of,
                                       model_prefix="")
        phases.append((step, fraction, count_parameters(module, param_groups=groups, persistence_threshold=threshold)))
    result = plan_memory(
        module=module, phases=phases, micro_batch_size=micro_batch_size,
        crop_size=crop_size, precision=precision, cards=cards, card_memory=card_memory,
        frozen_layers_of=lambda fraction: frozen_layer_count(fraction, layers), zero_settings=zero_settings,
        margin=margin, overhead=overhead, host_memory=host_memory, configured=configured,
        ds_config_names={option: selection_hint(option, precision) for option in all_options()},
        model_name=model_name,
    )
    if host_memory is None:
        result.notes.append("host memory (start-up and offload) is reported, not checked: pass --host-memory")
    return result
