"""Memory planner: bytes per card for every ZeRO stage × CPU offload × activation checkpointing option.

Model states follow the ZeRO paper's partitioning (Rajbhandari et al., 2020) as DeepSpeed
implements it: stage 0 partitions nothing (plain data parallelism, as DDP), stage 1 partitions the
optimizer states over the cards, stage 2 also the gradients, stage 3 also the parameters. CPU
offload moves the fp32 master weights, Adam moments and fp32 gradients to host memory (and under
stage 3 optionally the parameter shards). Only trainable parameters have gradients and optimizer
states; frozen ones cost their parameter bytes only. Per trainable parameter, AdamW keeps two fp32
moments (8 bytes) and DeepSpeed an fp32 master copy (4 bytes), in fp32 training too: its ZeRO
optimizers always update a cloned fp32 partition. ZeRO-0 in fp32 has no master copy (AdamW updates
the parameters themselves); see :func:`~mapsage_ds.planning.model_states.zero_bytes`.

DeepSpeed's own buffers are counted as its configs size them: the gradient reduction bucket
(``reduce_bucket_size``, doubled with ``overlap_comm``), the fp32 gradient of one parameter group's
partition created at the optimizer step plus AdamW's temporary of that size, and under stage 3
the gathered parameters of the module being run plus the prefetch bucket, and the small
parameters kept whole (``stage3_param_persistence_threshold``). Activations come from
:mod:`mapsage_ds.planning.activation_memory`.

An option fits when its total stays below the card memory less a safety margin and a constant
for what no formula here sees (runtime context, collective buffers, allocator fragmentation).
The recommendation is the first option that fits in order of running cost (:func:`all_options`):
the cheapest stage that fits, 0 → 1 → 2 → 3 → offload. A higher stage only saves memory, and it
pays for it in communication (ZeRO-2 ran up to 2.9× slower than DDP on 8 cards for models of many
small tensors, such as SegFormer), so it is chosen only when the model states of every lower
stage leave no room. Buffer sizes follow the per-accelerator ZeRO communication settings of a card
(:func:`~mapsage_ds.runtime.engine.fill_zero_comm`); a value the run's DeepSpeed config states wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mapsage_ds.errors import ConfigError
from mapsage_ds.planning.activation_memory import ActivationEstimate, estimate_activations, geometry_of
from mapsage_ds.planning.model_states import (
    GIB,
    OFFLOADS,
    PRECISION_BYTES,
    ZERO_STAGES,
    ParamCounts,
    ZeroBytes,
    ZeroSettings,
    count_parameters,
    zero_bytes,
)

DEFAULT_MARGIN = 0.10
DEFAULT_OVERHEAD = 2 * GIB
# The planner sizes cards; every card accelerator (gcu, cuda) gets the same ZeRO communication settings.
PLANNED_ACCELERATOR = "gcu"

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
    """Every option in order of preference, cheapest to run first: the lowest ZeRO stage that fits.

    Offloading is the most expensive (host-device traffic and Adam on the CPU every step), then
    ZeRO-3 (it gathers parameters in forward and again in backward: 1.5× the communication of
    stages 0 to 2), then activation checkpointing (one more forward of every block). Stages 0, 1
    and 2 move the same volume per step in theory (an all-reduce, or a reduce-scatter plus an
    all-gather), but each partitioning step adds bookkeeping and smaller, more numerous
    collectives (measured on 2 CPU ranks: 0.97/1.04/1.05× DDP; ZeRO-2 up to 2.9× DDP on 8 A100s for
    models of many small tensors), so among them the lower stage wins when both need the same
    checkpointing. ZeRO-0 cannot offload.
    """
    options = [Option(stage, offload, checkpointing)
               for offload in OFFLOADS for stage in ZERO_STAGES for checkpointing in (False, True)
               if not (offload != "none" and stage == 0) and not (offload == "optimizer+params" and stage != 3)]
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
        if option.stage <= 1:
            return f"gradients {size} GiB (full gradients of {_count(counts.trainable)} trainable parameters)"
        return f"gradients {size} GiB (1/{plan.cards} partition)"
    if part == "optimizer":
        if option.stage == 0:
            master = "fp32 master + " if plan.precision != "fp32" else ""
            return f"optimizer {size} GiB ({master}Adam moments of all {_count(counts.trainable)} trainable parameters)"
        return f"optimizer {size} GiB (fp32 master + Adam moments of 1/{plan.cards} of the trainable parameters)"
    if part == "buffers":
        if option.stage == 0:
            return f"buffers {size} GiB (flat all-reduce bucket, or the fp32 gradients and AdamW temporary at the step)"
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


_PARTITIONED = {
    0: "nothing partitioned: every card holds parameters, gradients, fp32 master and Adam moments, as DDP",
    1: "fp32 master and Adam moments partitioned over the cards",
    2: "gradients, fp32 master and Adam moments partitioned over the cards",
    3: "parameters, gradients, fp32 master and Adam moments partitioned over the cards",
}


def why_recommended(plan: MemoryPlan) -> str | None:
    """Why the recommendation is the cheapest choice: what fits, what the cheaper options lack, what costlier ones add.

    None when nothing fits.
    """
    best = plan.recommended
    if best is None:
        return None
    option = best.option
    lines = [f"Why {option.label}: model states fit ({_gib(best.states.device)} of {_gib(best.usable)} GiB usable "
             f"per card; {_gib(best.total)} GiB with activations and overhead); {_PARTITIONED[option.stage]}."]
    cheaper = plan.estimates[: plan.estimates.index(best)]
    if cheaper:
        lines.append("  Cheaper options do not fit: " + ", ".join(e.option.label for e in cheaper) + " (see below).")
    if option.offload != "none":
        lines.append("  Offload is the last resort: nothing fits on the card alone.")
    elif option.stage < 2:
        lines.append(f"  Stages {option.stage + 1}–3 add communication without saving memory this run needs.")
    elif option.stage == 2:
        lines.append("  ZeRO-3 adds communication without saving memory this run needs.")
    else:
        lines.append("  Offload adds host traffic without saving memory this run needs.")
    if option.checkpointing:
        lines.append("  Activation checkpointing: the activations do not fit without recomputation at a lower stage.")
    return "\n".join(lines)


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
        lines.append(why_recommended(plan))
    if plan.configured is not None:
        configured = plan.estimate(plan.configured)
        lines.append(f"Configured: {configured.option.label}: {explain(configured, plan)}.")
    rejected = [e for e in plan.estimates if not e.fits]
    if rejected:
        lines.append("Why the others do not fit:" if best else "Why nothing fits:")
        lines += [f"  {e.option.label}: {explain(e, plan)}" for e in rejected]
    costlier = [e.option.label for e in plan.estimates if e.fits and e is not best]
    if costlier:
        lines.append("Also fit, at a higher running cost (more partitioning, recomputation or offload): "
                     + ", ".join(costlier))
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
    from mapsage_ds.runtime.engine import compute_dtype, ds_config_names, fill_zero_comm, read_ds_config

    precision = dtype_name(compute_dtype(dict(ds_config)))
    module, layers = built.module, built.num_layers
    schedule = [(0, unfreeze.initial_frozen_fraction), *unfreeze.stages]
    zero_settings = {}
    for stage in ZERO_STAGES:
        name = f"zero{stage}_{precision}"
        packaged = read_ds_config(name) if name in ds_config_names() else {"zero_optimization": {"stage": stage}}
        zero_settings[stage] = ZeroSettings.from_ds_config(fill_zero_comm(packaged, accelerator=PLANNED_ACCELERATOR))
    configured = configured_option(ds_config, checkpointing=activation_checkpointing)
    if configured not in all_options():
        raise ConfigError(f"the run's DeepSpeed config asks for ZeRO-{configured.stage} with offload "
                          f"'{configured.offload}': DeepSpeed offloads only under ZeRO-1/2/3, parameters only under "
                          f"ZeRO-3")
    zero_settings[configured.stage] = ZeroSettings.from_ds_config(
        fill_zero_comm(dict(ds_config), accelerator=PLANNED_ACCELERATOR))
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
