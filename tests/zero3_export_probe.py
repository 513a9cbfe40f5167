"""Peak memory of each rank while a ZeRO-3 model is gathered for export (run by tests/test_large_backbones.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/zero3_export_probe.py OUT_DIR

A stack of equal linear layers is trained one step under ZeRO-3, then gathered as the export
gathers it. Each rank writes ``rank{r}.json``: the growth of its anonymous memory during the
gather, the largest single tensor, the whole model's fp32 bytes and the keys it collected.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from memprobe import PeakAnonymousMemory
from torch import nn

from mapsage_ds.models.export import gather_full_state_dict
from mapsage_ds.runtime.accelerator import setup_distributed, teardown_distributed
from mapsage_ds.runtime.engine import build_optimizer, fill_ds_config, initialize_engine, read_ds_config

LAYERS, WIDTH = 12, 1024


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).pow(2).mean()


def main(out_dir: Path) -> None:
    ctx = setup_distributed("cpu")
    ds_config = fill_ds_config(read_ds_config("zero3_fp32"), micro_batch_size=2, grad_accum_steps=1,
                               world_size=ctx.world_size, grad_clip=1.0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = Stack()
    engine = initialize_engine(model, build_optimizer([{"params": list(model.parameters()), "weight_decay": 0.0}],
                                                      lr=1e-3, betas=(0.9, 0.999), eps=1e-8), ds_config)
    loss = engine(torch.randn(2, WIDTH))
    engine.backward(loss)
    engine.step()
    with PeakAnonymousMemory() as peak:
        state = gather_full_state_dict(engine.module, stage=3, keep=ctx.is_main)
    report = {"growth": peak.growth, "largest_tensor": WIDTH * WIDTH * 4, "model_bytes": sum(
        p.ds_numel * 4 for p in engine.module.parameters()), "keys": sorted(state),
        "shapes": {k: list(v.shape) for k, v in state.items()}}
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    engine.destroy()
    teardown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
