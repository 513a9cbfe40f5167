"""ZeRO-0 engines in this process: the fp32 masters they step, state carried over a rebuild, the export.

DeepSpeed gives ZeRO-0 parameters no fp32 accessor (``safe_get_full_fp32_param`` returns None); in
bf16 it wraps the optimizer in its unfused mixed-precision optimizer, which steps once with zero
gradients when built. These tests pin what :mod:`mapsage_ds.runtime.engine_state` makes of both,
against plain torch AdamW computed here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from memprobe import optimizer_state_bytes, tensor_bytes
from torch import nn

from mapsage_ds.models.export import gather_full_state_dict
from mapsage_ds.planning.model_states import count_parameters, zero_bytes
from mapsage_ds.runtime.engine import build_optimizer, fill_ds_config, initialize_engine, read_ds_config
from mapsage_ds.runtime.engine_state import capture_trainable_state, full_fp32_param, restore_trainable_state

LR, BETAS, EPS, DECAY = 1e-2, (0.9, 0.999), 1e-8, 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _module(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _groups(module: nn.Module) -> list[dict]:
    """Weights with decay, biases without: two groups, as layer decay makes many."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if n.endswith("weight")], "weight_decay": DECAY},
            {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0}]


def _engine(module: nn.Module, precision: str):
    ds_config = fill_ds_config(read_ds_config(f"zero0_{precision}"), micro_batch_size=4, grad_accum_steps=1,
                               world_size=1, grad_clip=0.0)
    return initialize_engine(module, build_optimizer(_groups(module), lr=LR, betas=BETAS, eps=EPS), ds_config)


def _batch(seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _engine_step(engine, seed: int, dtype: torch.dtype) -> None:
    engine.backward(engine(_batch(seed, dtype)).float().square().mean())
    engine.step()


def _reference_steps(module: nn.Module, seeds: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp32 masters after torch AdamW on the gradients of the ``dtype`` module (mixed precision by hand)."""
    masters = {n: p.detach().float().clone().requires_grad_(True) for n, p in module.named_parameters()
               if p.requires_grad}
    groups = _groups(module)
    by_id = {id(p): n for n, p in module.named_parameters()}
    optimizer = torch.optim.AdamW([{**g, "params": [masters[by_id[id(p)]] for p in g["params"]]} for g in groups],
                                  lr=LR, betas=BETAS, eps=EPS)
    for seed in seeds:
        module.zero_grad(set_to_none=True)
        module(_batch(seed, dtype)).float().square().mean().backward()
        for name, param in module.named_parameters():
            if param.requires_grad:
                masters[name].grad = param.grad.float()
        optimizer.step()
        with torch.no_grad():
            for name, param in module.named_parameters():
                if param.requires_grad:
                    param.copy_(masters[name])
    return {name: master.detach() for name, master in masters.items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage0_steps_the_masters_as_plain_adamw_does(one_process_world, precision):
    dtype = DTYPES[precision]
    module = _module(dtype)
    module[0].weight.requires_grad_(False)
    reference = _reference_steps(copy.deepcopy(module), [1, 2, 3], dtype)
    engine = _engine(module, precision)
    # DeepSpeed's own accessor knows nothing of ZeRO-0; ours links every optimized parameter.
    assert all(safe_get_full_fp32_param(p) is None for p in module.parameters())
    assert full_fp32_param(module[0].weight) is None
    if precision == "fp32":
        assert type(engine.optimizer) is torch.optim.AdamW
        assert all(full_fp32_param(p) is p for p in module.parameters() if p.requires_grad)
    else:
        assert type(engine.optimizer).__name__ == "FP16_UnfusedOptimizer"
        # Its zero-gradient warm-up step is undone: no Adam state, masters equal to the parameters (not decayed).
        assert not engine.optimizer.state
        for param in (p for p in module.parameters() if p.requires_grad):
            assert full_fp32_param(param).dtype == torch.float32 and torch.equal(full_fp32_param(param), param.float())
    trainable = [p for p in module.parameters() if p.requires_grad]
    for seed in (1, 2):
        _engine_step(engine, seed, dtype)
    engine.backward(engine(_batch(3, dtype)).float().square().mean())
    gradient_bytes = tensor_bytes(p.grad for p in trainable)  # the step frees them
    engine.step()
    for name, param in module.named_parameters():
        if param.requires_grad:
            assert torch.equal(full_fp32_param(param), reference[name]), name
    # The planner's ZeRO-0 model states: moments, plus a distinct fp32 master only in bf16.
    counts = count_parameters(module)
    masters = [full_fp32_param(p) for p in trainable if full_fp32_param(p) is not p]
    planned = zero_bytes(total=counts.total, trainable=counts.trainable, cards=1, stage=0, offload="none",
                         dtype_bytes=torch.tensor([], dtype=dtype).element_size())
    assert optimizer_state_bytes(engine.optimizer) + tensor_bytes(masters) == planned.optimizer
    assert tensor_bytes(module.parameters()) == planned.parameters
    assert gradient_bytes == planned.gradients
    engine.destroy()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stage0_state_carries_over_a_rebuild_and_reaches_the_export(one_process_world, precision):
    dtype = DTYPES[precision]
    module = _module(dtype)
    module[0].requires_grad_(False)  # frozen in the first phase, thawed in the second
    engine = _engine(module, precision)
    for seed in (1, 2):
        _engine_step(engine, seed, dtype)
    captured = capture_trainable_state(engine, module, stage=0)
    assert set(captured) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    for name, param in module.named_parameters():
        if param.requires_grad:
            state = engine.optimizer.state[full_fp32_param(param)]
            assert torch.equal(captured[name]["param"], full_fp32_param(param))
            assert torch.equal(captured[name]["exp_avg_sq"], state["exp_avg_sq"]) and state["step"].item() == 2
    engine.destroy()

    module[0].requires_grad_(True)
    module[4].requires_grad_(False)  # trainable before, frozen now: its master link goes
    engine = _engine(module, precision)
    carried = restore_trainable_state(engine, module, captured, stage=0, step=2)
    assert carried == 2  # 2.weight and 2.bias; layer 0 is newly thawed
    assert full_fp32_param(module[4].weight) is None
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        master = full_fp32_param(param)
        state = engine.optimizer.state[master]
        assert state["step"].item() == 2  # bias correction continues at the global step
        if name in captured:
            assert torch.equal(master, captured[name]["param"])
            assert torch.equal(state["exp_avg"], captured[name]["exp_avg"])
        else:
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            assert torch.equal(master, param.float())

    _engine_step(engine, 3, dtype)
    exported = gather_full_state_dict(module, stage=0)
    for name, param in module.named_parameters():
        expected = full_fp32_param(param) if param.requires_grad else param.float()
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], expected), name
    if precision == "bf16":  # the export holds the masters, not the bf16 weights the engine computes with
        assert not torch.equal(exported["2.weight"].to(dtype), exported["2.weight"])
    engine.destroy()
