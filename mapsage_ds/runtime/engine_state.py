"""Carry fp32 master weights and Adam moments across a rebuilt DeepSpeed engine.

At an unfreezing boundary the engine is rebuilt with a new trainable set; the optimizer's own
``load_state_dict`` cannot follow a changed set of parameters, so the state of every parameter
that stays trainable is read before and written after through DeepSpeed's ``safe_*`` accessors.
Two private attributes of DeepSpeed's ZeRO optimizers are touched here, and only here.

ZeRO-0 has no ZeRO optimizer and DeepSpeed's accessors return None for its parameters. In fp32
the torch optimizer steps the module's parameters themselves; in bf16/fp16 DeepSpeed wraps it in
``FP16_UnfusedOptimizer``, which steps fp32 copies (``fp32_groups``, parallel to ``fp16_groups``,
two more private attributes read here only). :func:`link_stage0_masters` links every trainable
parameter to the fp32 tensor its optimizer steps, and :func:`full_fp32_param` reads the master
weights of any stage.
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

from mapsage_ds.errors import MapSageError

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
# Set by link_stage0_masters on the parameters of a ZeRO-0 engine: the fp32 tensor the optimizer steps.
FP32_MASTER_ATTR = "_mapsage_fp32_master"


def link_stage0_masters(engine) -> int:
    """Link each of a ZeRO-0 engine's trainable parameters to the fp32 tensor its optimizer steps.

    Links left by an earlier engine on the same module are removed first. In bf16/fp16 the fresh
    ``FP16_UnfusedOptimizer`` has already taken one step with zero gradients (to create the
    optimizer state): that step decayed every master by ``lr × weight_decay`` and counted one step
    in Adam's bias correction. It is undone, so a ZeRO-0 engine starts where a ZeRO-1/2 engine does:
    masters equal to the parameters, no Adam state. Returns how many parameters were linked.
    """
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_groups"):
        pairs = [(low, master) for lows, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups, strict=True)
                 for low, master in zip(lows, masters, strict=True)]
        optimizer.state.clear()
        with torch.no_grad():
            for low, master in pairs:
                master.copy_(low)
    else:
        pairs = [(param, param) for group in optimizer.param_groups for param in group["params"]]
    for param in engine.module.parameters():
        if hasattr(param, FP32_MASTER_ATTR):
            delattr(param, FP32_MASTER_ATTR)
    for param, master in pairs:
        setattr(param, FP32_MASTER_ATTR, master)
    return len(pairs)


def full_fp32_param(param: nn.Parameter) -> torch.Tensor | None:
    """The whole fp32 master weight of a trainable parameter under any ZeRO stage, None if it has none.

    A collective under ZeRO-1/2/3 (DeepSpeed gathers the partitions): call it on every rank.
    """
    master = getattr(param, FP32_MASTER_ATTR, None)
    return master if master is not None else safe_get_full_fp32_param(param)


def _stage0_master(param: nn.Parameter, name: str) -> torch.Tensor:
    master = getattr(param, FP32_MASTER_ATTR, None)
    if master is None:
        raise MapSageError(f"trainable parameter '{name}' has no linked fp32 master: the ZeRO-0 engine was not "
                           f"built by mapsage_ds.runtime.engine.initialize_engine, or the parameter is not in its "
                           f"optimizer")
    return master


def _capture_stage0(engine, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    captured = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            master = _stage0_master(param, name)
            state = engine.optimizer.state.get(master, {})
            entry = {"param": master.detach().clone()}
            for key in ADAM_STATE_KEYS:
                entry[key] = state[key].detach().clone() if key in state else torch.zeros_like(master)
            captured[name] = entry
    return captured


@torch.no_grad()
def _restore_stage0(engine, module: nn.Module, captured: dict, step: int) -> int:
    carried = 0
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        master = _stage0_master(param, name)
        entry = captured.get(name)
        if entry is not None:
            master.copy_(entry["param"])
            if master is not param:
                param.copy_(master)
            carried += 1
        # Every parameter's Adam state starts at the global step count, as under ZeRO-1/2/3.
        engine.optimizer.state[master] = {
            "step": torch.tensor(float(step)),
            **{key: entry[key].clone() if entry is not None else torch.zeros_like(master) for key in ADAM_STATE_KEYS},
        }
    return carried


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
    depend on the optimizer, so shards carry over); under ZeRO-1/2 full tensors are gathered;
    under ZeRO-0 every rank holds them already.
    """
    if stage == 0:
        return _capture_stage0(engine, module)
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
    if stage == 0:
        return _restore_stage0(engine, module, captured, step)
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
