"""Distil a frozen teacher (e.g. DINOv3-SAT) into a SegFormer student through DeepSpeed.

    python scripts/distill.py                                    # demo: tiny teacher, then a tiny student
    deepspeed --num_gpus 8 scripts/distill.py --recipe distill_dinov3_to_b5 \
        --data-root /data/LoveDA --set teacher.path=runs/dinov3/export --output-dir runs/distill_b5
    torchrun --nproc_per_node 2 scripts/distill.py --recipe distill_demo --resume

Same trainer loop, checkpoints, resume, evaluation and export as scripts/finetune.py; only the
task differs (``task: distill`` in the recipe). The export is the plain SegFormer student.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from mapsage_ds.cli import as_console
from mapsage_ds.cli.args import add_config_arguments, config_from_args
from mapsage_ds.config import Config, LossConfig, validate
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.metrics import SegmentationMetrics
from mapsage_ds.runtime.accelerator import DistributedContext, setup_distributed, teardown_distributed
from mapsage_ds.training.run import run_finetune

DEFAULT_RECIPE = "distill_demo"


def bootstrap_teacher_config(config: Config) -> Config:
    """The fine-tuning run that makes the demo's teacher: DINOv3 of ``teacher.bootstrap.size`` on the same data."""
    boot = config.teacher.bootstrap
    teacher = dataclasses.replace(
        config, task="segment", unfreeze=None, loss=LossConfig(), output_dir=str(Path(config.output_dir) / "teacher"),
        model=dataclasses.replace(config.model, arch="dinov3", size=boot.size, pretrained=None, boundary_head=False),
        optim=dataclasses.replace(config.optim, lr=boot.lr, warmup_steps=0, layer_decay=1.0, backbone_lr_mult=1.0),
        train=dataclasses.replace(config.train, max_steps=boot.max_steps, eval_every=boot.max_steps,
                                  save_every=boot.max_steps, activation_checkpointing=False),
    )
    validate(teacher)
    return teacher


def ensure_teacher(config: Config, ctx: DistributedContext) -> Config:
    """``config`` with ``teacher.path`` set, training the demo teacher first when the recipe asks for one."""
    if config.teacher.path is not None:
        return config
    teacher_config = bootstrap_teacher_config(config)
    export = Path(teacher_config.output_dir) / "export"
    if (export / "model.safetensors").is_file():
        if ctx.is_main:
            print(f"using the teacher already trained in {export}", flush=True)
    else:
        if ctx.is_main:
            print(f"teacher.path is not set: training a DINOv3 '{teacher_config.model.size}' teacher for "
                  f"{teacher_config.train.max_steps} steps into {export} (demo bootstrap)", flush=True)
        # A derived artefact: an unfinished earlier bootstrap in its folder is replaced.
        run_finetune(teacher_config, ctx, overwrite=True)
    return dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, path=str(export)))


def main(argv: list[str] | None = None) -> SegmentationMetrics:
    """Parse ``argv``, distil, evaluate and export the student; returns its final validation metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_recipe=DEFAULT_RECIPE)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in output_dir (its checkpoints, exports and logs are deleted)")
    args = parser.parse_args(argv)
    config = config_from_args(args, default_recipe=DEFAULT_RECIPE)
    if config.task != "distill":
        raise ConfigError(f"scripts/distill.py trains task 'distill' but the config says task={config.task!r}; "
                          "use scripts/finetune.py, or set task: distill")
    if config.teacher.path is None and config.teacher.bootstrap is None:
        raise ConfigError("teacher.path is not set: pass --set teacher.path=RUN/export (a MapSage export)")
    ctx = setup_distributed(args.accelerator)
    try:
        return run_finetune(ensure_teacher(config, ctx), ctx, resume=args.resume, overwrite=args.overwrite)
    finally:
        teardown_distributed()


console = as_console(main)


if __name__ == "__main__":
    sys.exit(console())
