"""Measure per-rank ZeRO model-state bytes of real DeepSpeed engines (run by tests/test_planner.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/zero_memory_probe.py OUT.json

For each (stage, precision) a small SegFormer is built as training builds it (born sharded under
ZeRO-3), half of its backbone frozen, wrapped by DeepSpeed and run for one step. Each rank
records the bytes it holds of parameters, gradients (stage 1: full, before its reduction; then the
reduced partition, before the step), fp32 master
weights and Adam moments, plus the parameter counts the planner needs. Rank 0 writes the JSON.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from memprobe import optimizer_state_bytes, tensor_bytes

from mapsage_ds.data.classes import LOVEDA_CLASSES
from mapsage_ds.models.factory import build_model
from mapsage_ds.optim.param_groups import build_param_groups, layer_decay_scale
from mapsage_ds.optim.unfreeze import set_frozen
from mapsage_ds.planning.model_states import count_parameters
from mapsage_ds.runtime.accelerator import setup_distributed
from mapsage_ds.runtime.engine import build_optimizer, compute_dtype, fill_ds_config, initialize_engine, read_ds_config
from mapsage_ds.tasks.segmentation import SegmentationTask

CASES = [(1, "bf16"), (2, "bf16"), (3, "bf16"), (3, "fp32")]
PERSISTENCE = 1000  # small enough that some tensors of the tiny model are sharded and some are kept whole


def measure(stage: int, precision: str, ctx) -> dict:
    ds_config = read_ds_config(f"zero{stage}_{precision}")
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = PERSISTENCE
    ds_config = fill_ds_config(ds_config, micro_batch_size=2, grad_accum_steps=1, world_size=ctx.world_size,
                               grad_clip=1.0)
    built = build_model(arch="segformer", size="mini", class_names=list(LOVEDA_CLASSES), ds_config=ds_config)
    task = SegmentationTask(built.module).to(ctx.device, compute_dtype(ds_config))
    set_frozen(task.named_parameters(), layer_id=built.layer_id, num_layers=built.num_layers, fraction=0.5)
    scale = layer_decay_scale(layer_id=built.layer_id, num_layers=built.num_layers, layer_decay=0.8,
                              backbone_lr_mult=0.5)
    groups = build_param_groups(task.named_parameters(), weight_decay=0.01, lr_scale_of=scale)
    counts = count_parameters(task, param_groups=groups, persistence_threshold=PERSISTENCE)
    engine = initialize_engine(task, build_optimizer(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8), ds_config)
    torch.manual_seed(ctx.rank)
    batch = {"image": torch.randn(2, 3, 64, 64), "mask": torch.randint(0, 7, (2, 64, 64))}
    zero = engine.optimizer
    full_gradients = []
    if stage == 1:
        # Stage 1 reduces once the whole backward is done: record the full gradients it starts from.
        reduce = zero.reduce_gradients

        def recording_reduce(*args, **kwargs):
            full_gradients.append(tensor_bytes(p.grad for p in task.parameters() if p.requires_grad))
            return reduce(*args, **kwargs)

        zero.reduce_gradients = recording_reduce
    engine.backward(engine(batch)["loss"])
    # Gradients once reduced: the partition of stages 1 and 2 (stage 1 reduces after the whole
    # backward, so its full gradients are gone by now) and stage 3's partition buffer.
    if stage < 3:
        gradients = sum(tensor_bytes(partition) for partition in zero.averaged_gradients.values())
    else:
        gradients = tensor_bytes([zero.grad_partitions_flat_buffer])
    engine.step()
    if stage < 3:
        parameters = tensor_bytes(task.parameters())
        master = tensor_bytes(zero.single_partition_of_fp32_groups)
    else:
        # A persistent parameter stays whole in p.data; every parameter also has its shard ds_tensor.
        parameters = tensor_bytes(p.ds_tensor for p in task.parameters()) + tensor_bytes(
            p.data for p in task.parameters() if p.numel() > 0)
        master = tensor_bytes(zero.fp32_partitioned_groups_flat)
    result = dict(stage=stage, precision=precision, rank=ctx.rank, parameters=parameters, gradients=gradients,
                  full_gradients=full_gradients[0] if full_gradients else None,
                  master=master, moments=optimizer_state_bytes(zero.optimizer), total=counts.total,
                  trainable=counts.trainable, largest_group=counts.largest_group, persistent=counts.persistent)
    engine.destroy()
    return result


def main(path: str) -> None:
    ctx = setup_distributed("cpu")
    results = [measure(stage, precision, ctx) for stage, precision in CASES]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, results)
    if ctx.is_main:
        with open(path, "w") as f:
            json.dump([row for rank_rows in gathered for row in rank_rows], f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
