"""``mapsage-finetune --dry-run``: what a run would train, without training (model on the meta device)."""

from __future__ import annotations

from collections.abc import Callable

from mapsage_ds.models.factory import BuiltModel
from mapsage_ds.optim.unfreeze import UnfreezePlan, phase_param_groups
from mapsage_ds.planning.plan import MemoryPlan, format_plan
from mapsage_ds.tasks import SegmentationTask


def describe_run(*, config_text: str, built: BuiltModel, unfreeze: UnfreezePlan, weight_decay: float,
                 lr_scale_of: Callable[[str], float] | None, memory: MemoryPlan) -> str:
    """Resolved config, parameter counts per unfreezing phase, param groups and the memory plan.

    Args:
        config_text: the resolved config as YAML.
        built: the run's network built on the meta device.
        unfreeze: which share of the backbone each phase freezes.
        weight_decay: decay of the decaying param groups.
        lr_scale_of: learning-rate multiplier per parameter name (layer decay).
        memory: the memory plan to print.
    """
    task = SegmentationTask(built.module)
    lines = ["# resolved config", config_text.rstrip(), "", "# parameters"]
    total = sum(p.numel() for p in task.parameters())
    for start in [0] + [at_step for at_step, _ in unfreeze.stages]:
        fraction = unfreeze.frozen_fraction(start)
        phase_param_groups(task.named_parameters, layer_id=built.layer_id, num_layers=built.num_layers,
                           frozen_fraction=fraction, weight_decay=weight_decay, lr_scale_of=lr_scale_of)
        trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
        lines.append(f"from step {start}: {fraction:.0%} of the backbone frozen, trainable {trainable / 1e6:,.2f} M "
                     f"of {total / 1e6:,.2f} M")
    _, groups = phase_param_groups(task.named_parameters, layer_id=built.layer_id, num_layers=built.num_layers,
                                   frozen_fraction=unfreeze.frozen_fraction(0), weight_decay=weight_decay,
                                   lr_scale_of=lr_scale_of)
    lines += ["", f"# param groups at step 0 ({len(groups)})", "| lr scale | weight decay | tensors | parameters |",
              "|---|---|---|---|"]
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        lines.append(f"| {group['lr_scale']:.4g} | {group['weight_decay']:g} | {len(group['params'])} | {count:,} |")
    lines += ["", "# memory plan", format_plan(memory)]
    return "\n".join(lines)
