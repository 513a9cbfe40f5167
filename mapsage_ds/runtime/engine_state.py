"""Carry fp32 master weights and Adam moments across a rebuilt DeepSpeed engine.

At an unfreezing boundary the engine is rebuilt with a new trainable set; the optimizer's own
``load_state_dict`` cannot follow a changed set of parameters, so the state of every parameter
that stays trainable is read before and written after through DeepSpeed's ``safe_*`` accessors.
Two private attributes of DeepSpeed's ZeRO optimizers are touched here, and only here.
"""

from __future__ import annotations

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def _relink_optimizer_state(zero_optimizer) -> None:
    """Point every parameter's fragment mapping at the current optimizer state.

    ZeRO-1/2 links the mappings once, right after the first parameter group's first step, when
    the other groups have no state yet; with several groups (layer decay) their mappings stay
    empty, so the link is redone before state is read or written.
    """
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _ensure_adam_state(zero_optimizer, step: int) -> None:
    """Create zero Adam moments at ``step`` for every flat fp32 partition that has none yet."""
    # The flat fp32 partitions the base optimizer steps: ZeRO-3 keeps them per sub-group, ZeRO-1/2 per group.
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if flats is None:
        flats = zero_optimizer.single_partition_of_fp32_groups
    for flat in flats:
        state = zero_optimizer.optimizer.state[flat]
        if not state:
            state["step"] = torch.tensor(float(step))
            state["exp_avg"] = torch.zeros_like(flat)
            state["exp_avg_sq"] = torch.zeros_like(flat)


def capture_trainable_state(engine, module: nn.Module, *, stage: int) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 master weights and Adam moments of every trainable parameter (a collective).

    Under ZeRO-3 each rank keeps only its own shard (the partitioning of a parameter does not
    depend on the optimizer, so shards carry over); under ZeRO-1/2 full tensors are gathered.
    """
    _relink_optimizer_state(engine.optimizer)
    get_param = safe_get_local_fp32_param if stage == 3 else safe_get_full_fp32_param
    get_state = safe_get_local_optimizer_state if stage == 3 else safe_get_full_optimizer_state
    captured = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            entry = {"param": get_param(param).detach().clone()}
            for key in ADAM_STATE_KEYS:
                entry[key] = get_state(param, key).detach().clone()
            captured[name] = entry
    return captured


def restore_trainable_state(engine, module: nn.Module, captured: dict, *, stage: int, step: int) -> int:
    """Write captured state into a freshly built engine; returns how many parameters carried over.

    Newly thawed parameters start from zero moments; every Adam state starts at the global step
    count, so bias correction continues instead of restarting.
    """
    _ensure_adam_state(engine.optimizer, step)
    _relink_optimizer_state(engine.optimizer)
    set_param = safe_set_local_fp32_param if stage == 3 else safe_set_full_fp32_param
    set_state = safe_set_local_optimizer_state if stage == 3 else safe_set_full_optimizer_state
    carried = 0
    for name, param in module.named_parameters():
        if param.requires_grad and name in captured:
            set_param(param, captured[name]["param"])
            for key in ADAM_STATE_KEYS:
                set_state(param, captured[name][key], key)
            carried += 1
    return carried
