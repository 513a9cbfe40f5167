"""``finetune.py --dry-run``: what a run would train, without training (model on the meta device)."""

from __future__ import annotations

import torch
import yaml

from mapsage_ds.config import Config, to_dict
from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.models.factory import build_model
from mapsage_ds.optim import build_param_groups
from mapsage_ds.optim.param_groups import layer_decay_scale
from mapsage_ds.planner import format_plan, parse_size, plan_for_run
from mapsage_ds.tasks import SegmentationTask
from mapsage_ds.unfreeze import UnfreezePlan, set_frozen


def describe_run(config: Config, plan: UnfreezePlan, *, cards: int, card_memory: str = "32GB") -> str:
    """Resolved config, parameter counts per unfreezing phase, param groups and the memory plan."""
    with torch.device("meta"):
        built = build_model(arch=config.model.arch, size=config.model.size, class_names=list(LOVEDA_CLASSES),
                            drop_path_rate=config.model.drop_path_rate)
    task = SegmentationTask(built.module)
    scale = layer_decay_scale(layer_id=built.layer_id, num_layers=built.num_layers,
                              layer_decay=config.optim.layer_decay, backbone_lr_mult=config.optim.backbone_lr_mult)
    lines = ["# resolved config", yaml.safe_dump(to_dict(config), sort_keys=False).rstrip(), "", "# parameters"]
    total = sum(p.numel() for p in task.parameters())
    phase_starts = [0] + [at_step for at_step, _ in plan.stages]
    for start in phase_starts:
        fraction = plan.frozen_fraction(start)
        set_frozen(task.named_parameters(), layer_id=built.layer_id, num_layers=built.num_layers, fraction=fraction)
        trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
        lines.append(f"from step {start}: {fraction:.0%} of the backbone frozen, trainable {trainable / 1e6:,.2f} M "
                     f"of {total / 1e6:,.2f} M")
    set_frozen(task.named_parameters(), layer_id=built.layer_id, num_layers=built.num_layers,
               fraction=plan.frozen_fraction(0))
    groups = build_param_groups(task.named_parameters(), weight_decay=config.optim.weight_decay, lr_scale_of=scale)
    lines += ["", f"# param groups at step 0 ({len(groups)})", "| lr scale | weight decay | tensors | parameters |",
              "|---|---|---|---|"]
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        lines.append(f"| {group['lr_scale']:.4g} | {group['weight_decay']:g} | {len(group['params'])} | {count:,} |")
    memory = plan_for_run(config, cards=cards, card_memory=parse_size(card_memory))
    lines += ["", "# memory plan", format_plan(memory)]
    return "\n".join(lines)
