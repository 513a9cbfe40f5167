"""Build every check's inputs from a run config and run the checks on all ranks.

Every rank walks through the same sequence, so collectives stay in step: device and collective
probes and the sharded file scans and hashing run everywhere and are gathered to rank 0; the
overfit runs one DeepSpeed engine over all ranks; the cheap judgements run on rank 0. A check
whose inputs cannot be built (a dataset that does not open, a checkpoint that does not load)
becomes a FAIL naming the error; it never stops the other checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate

from mapsage_ds.builders import (
    FROM_SCRATCH,
    build_dataset,
    build_ds_config,
    build_run_model,
    build_task_loss,
    build_train_transform,
    prepare_data_root,
    starting_weights,
    unfreeze_plan,
)
from mapsage_ds.config import Config
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loveda import SPLITS, LoveDA, read_mask_file
from mapsage_ds.data.mixing import cutmix
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.metrics import ConfusionMatrix
from mapsage_ds.evaluation.predictor import Predictor
from mapsage_ds.health import alignment, consistency, eval_outputs, labels, metric, normalisation, overfit, preflight
from mapsage_ds.health import splits as split_checks
from mapsage_ds.health.result import CheckResult, failed, warned
from mapsage_ds.models.heads import build_boundary_head
from mapsage_ds.optim.unfreeze import phase_param_groups
from mapsage_ds.runtime.accelerator import DistributedContext
from mapsage_ds.runtime.engine import compute_dtype
from mapsage_ds.tasks import SegmentationTask

CHECK_NAMES = (
    "preflight.devices", "preflight.collectives", "preflight.data_files", "preflight.checkpoint_keys",
    "1.classes_ignore_index", "1.raw_mask_values", "1.nodata_to_ignore", "2.evaluation_outputs",
    "3.normalisation", "3.overfit", "4.train_alignment", "4.inference_alignment", "5.split_folders",
    "5.split_leakage", "6.evaluation_consistency", "7.metric_correctness",
)


@dataclass(frozen=True)
class HealthOptions:
    """How thorough the checks are, and what the server is expected to be.

    Attributes:
        full: Decode every file (else ``sample`` pairs per split).
        sample: Pairs decoded per split, and masks checked for label values, without ``full``.
        expect_device: Device type every rank must run on (None: accept what was detected).
        matmul_size: Side of the matmul run in each precision.
        collective_mb: Buffer size of the bandwidth measurement, in MiB.
        overfit_steps: Optimizer steps of the overfit.
        overfit_factor: Factor the loss must fall by.
        overfit_miou: mIoU the batch must reach.
        overfit_lr: Constant learning rate of the overfit (None: the recipe's ``optim.lr``).
        overfit_images: Images in the overfit batch (the same on every rank).
        overfit_crop: Crop side of the overfit batch (None: ``data.crop_size``).
        alignment_images: Masks painted for the alignment checks.
        eval_images: Validation images evaluated to inspect the evaluator's outputs.
        pretrain_images: Folders of extra training images (e.g. EarthVQA) checked for val/test overlap.
        final_eval: Tracks file or run config whose evaluation settings the final evaluation uses.
        only: Run only checks whose name is or starts with one of these (``preflight``, ``3``, ``3.overfit``).
        skip: Leave out checks selected the same way.
    """

    full: bool = False
    sample: int = 16
    expect_device: str | None = None
    matmul_size: int = 1024
    collective_mb: float = 64.0
    overfit_steps: int = 50
    overfit_factor: float = 2.0
    overfit_miou: float = 0.5
    overfit_lr: float | None = None
    overfit_images: int = 2
    overfit_crop: int | None = None
    alignment_images: int = 2
    eval_images: int = 2
    pretrain_images: tuple[str, ...] = ()
    final_eval: str | None = None
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def selects(self, name: str) -> bool:
        """Whether check ``name`` runs."""
        def matches(patterns: Sequence[str]) -> bool:
            return any(name == p or name.startswith(p.rstrip(".") + ".") for p in patterns)
        return (not self.only or matches(self.only)) and not matches(self.skip)


class _Run:
    """One pass over the checks on one rank; rank 0 collects the results."""

    def __init__(self, config: Config, ctx: DistributedContext, options: HealthOptions) -> None:
        self.config, self.ctx, self.options = config, ctx, options
        self.results: list[CheckResult] = []
        self.class_names = list(LOVEDA_CLASSES)

    # -- plumbing ------------------------------------------------------------------------------

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (on every rank)."""
        values: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(values, value)
        return values

    def on_main(self, name: str, judge: Callable[[], CheckResult | None]) -> None:
        """Run ``judge`` on rank 0 if ``name`` is selected; an exception becomes a FAIL naming it."""
        if self.ctx.is_main and self.options.selects(name):
            self.results.append(_guard(name, judge))

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """The share of ``items`` of this rank."""
        return list(items[self.ctx.rank::self.ctx.world_size])

    # -- inputs --------------------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.ds_config = build_ds_config(config.train, config.optim, world_size=self.ctx.world_size,
                                         accelerator=self.ctx.accelerator)
        prepare_data_root(config.data, self.ctx)
        self.train_data, self.train_error = _try(lambda: build_dataset(config.data, config.data.train_split))
        self.val_data, self.val_error = _try(lambda: build_dataset(config.data, config.data.val_split))
        self.built, self.model_error = None, None
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank, run after run
        if any(self.options.selects(n) for n in ("1.classes_ignore_index", "3.normalisation", "3.overfit",
                                                 "4.train_alignment", "4.inference_alignment")):
            self.built, self.model_error = _try(lambda: build_run_model(config, self.class_names,
                                                                        ds_config=self.ds_config))

    def is_folder_tree(self) -> bool:
        return self.config.data.source == "loveda"

    def sample_indices(self, count: int) -> list[int]:
        """Evenly spaced indices: ``sample`` of ``count`` (all with ``full``)."""
        if self.options.full or count <= self.options.sample:
            return list(range(count))
        return sorted({int(i) for i in np.linspace(0, count - 1, self.options.sample)})

    # -- checks --------------------------------------------------------------------------------

    def preflight(self) -> None:
        options, ctx = self.options, self.ctx
        if options.selects("preflight.devices"):
            dtypes = list(dict.fromkeys([torch.float32, compute_dtype(self.ds_config)]))
            reports = self.gather(preflight.probe_device(ctx, dtypes=dtypes, size=options.matmul_size))
            self.on_main("preflight.devices", lambda: preflight.check_devices(reports,
                                                                            expected_type=options.expect_device))
        if options.selects("preflight.collectives"):
            reports = self.gather(preflight.probe_collectives(ctx, size_bytes=int(options.collective_mb * 2**20)))
            self.on_main("preflight.collectives", lambda: preflight.check_collectives(
                reports, device_type=options.expect_device or ctx.accelerator))
        if options.selects("preflight.data_files"):
            self.data_files()
        weights = starting_weights(self.config.model)
        if weights is None:
            intended = self.config.model.pretrained == FROM_SCRATCH
            self.on_main("preflight.checkpoint_keys",
                         lambda: preflight.check_checkpoint_keys(None, is_head=bool, from_scratch=intended))
        else:
            def keys() -> CheckResult:
                report, is_head = preflight.checkpoint_key_report(
                    arch=self.config.model.arch, size=self.config.model.size, pretrained=weights,
                    class_names=self.class_names)
                return preflight.check_checkpoint_keys(report, is_head=is_head)
            self.on_main("preflight.checkpoint_keys", keys)

    def data_files(self) -> None:
        data = self.config.data
        if not self.is_folder_tree():
            self.on_main("preflight.data_files", lambda: _not_a_tree("preflight.data_files", data.source))
            return
        problems, pairs_total, decoded = [], 0, 0
        for split in SPLITS:
            pairs = preflight.list_pairs(data.root, split, data.scenes)
            decode = set(self.sample_indices(len(pairs)))
            mine = self.shard(list(enumerate(pairs)))
            for index, (image, mask) in mine:
                problems += preflight.scan_pair(image, mask, decode=index in decode)
            pairs_total += len(pairs)
            decoded += len(decode)
            if self.ctx.is_main and split != "Test":
                orphans = preflight.orphan_masks(data.root, split, data.scenes)
                problems += [f"{m}: mask without an image" for m in orphans]
        gathered = [p for rank_problems in self.gather(problems) for p in rank_problems]
        self.on_main("preflight.data_files", lambda: preflight.check_data_files(
            gathered, pairs=pairs_total, decoded=decoded, full=self.options.full, splits=SPLITS))

    def labels(self) -> None:
        config = self.config

        def agreement() -> CheckResult:
            module = self._model()
            model_classes = getattr(getattr(module, "config", None), "num_labels", None) or module.num_classes
            metric_probe = ConfusionMatrix(len(self.class_names), ignore_index=IGNORE_INDEX)
            return labels.check_label_agreement(
                class_names=self.class_names, dataset_ignore_index=IGNORE_INDEX, model_num_classes=model_classes,
                loss=build_task_loss(config.loss, num_classes=len(self.class_names)),
                metric_num_classes=metric_probe.num_classes, metric_ignore_index=metric_probe.ignore_index)

        self.on_main("1.classes_ignore_index", agreement)
        if self.options.selects("1.raw_mask_values"):
            if self.is_folder_tree():
                masks = [m for split in (config.data.train_split, config.data.val_split)
                         for m in _sampled([m for _, m in preflight.list_pairs(config.data.root, split,
                                                                              config.data.scenes)],
                                           self.sample_indices)]
                inspected = [i for part in self.gather(labels.inspect_raw_masks(self.shard(masks))) for i in part]
                self.on_main("1.raw_mask_values", lambda: labels.check_raw_masks(inspected))
            else:
                self.on_main("1.raw_mask_values", lambda: _not_a_tree("1.raw_mask_values", config.data.source))

        def nodata() -> CheckResult:
            dataset = self._dataset(self.train_data, self.train_error)
            if not isinstance(dataset, LoveDA):
                return _not_a_tree("1.nodata_to_ignore", config.data.source)
            pairs = ((read_mask_file(dataset.samples[i].mask), dataset[i]["mask"].numpy())
                     for i in self.sample_indices(len(dataset)))
            return labels.check_nodata_mapping(pairs)

        self.on_main("1.nodata_to_ignore", nodata)

    def evaluation_outputs(self) -> None:
        name = "2.evaluation_outputs"
        if not self.options.selects(name):
            return
        section = self.config.eval
        try:
            dataset = self._dataset(self.val_data, self.val_error)
            normalize = Normalize()
            decoder = alignment.ColourDecoder(normalize, with_ignore=False).to(self.ctx.device)
            predictor = Predictor(decoder, normalize=normalize, protocol=section)
            metrics = run_evaluation(predictor, dataset, device=self.ctx.device, rank=self.ctx.rank,
                                     world_size=self.ctx.world_size, class_names=self.class_names,
                                     ignore_index=IGNORE_INDEX, protocol=dataclasses.replace(
                                         section, batch_size=1, max_images=self.options.eval_images)).metrics
            height, width = dataset[0]["mask"].shape
            band = eval_outputs.band_width(boundary_width=section.boundary_width,
                                           dilation_ratio=section.boundary_dilation_ratio, height=height, width=width)
            outcome: Any = (metrics, band)
        except Exception as error:  # noqa: BLE001 - reported as the check's FAIL
            outcome = error
        self.on_main(name, lambda: _raise_or(outcome, lambda m: eval_outputs.check_evaluation_outputs(
            m[0], num_classes=len(self.class_names), band_pixels=m[1])))

    def scale_and_normalisation(self) -> None:
        self.on_main("3.normalisation", lambda: normalisation.check_normalisation(
            arch=self.config.model.arch, pretrained=starting_weights(self.config.model),
            normalize=self._built().normalize,
            override=self.config.model.normalization))
        name = "3.overfit"
        if not self.options.selects(name):
            return
        options, config = self.options, self.config
        lr = config.optim.lr if options.overfit_lr is None else options.overfit_lr
        try:
            built = self._built()
            dataset = self._dataset(self.train_data, self.train_error)
            batch = overfit.centre_crop_batch(dataset, list(range(min(options.overfit_images, len(dataset)))),
                                              crop_size=options.overfit_crop or config.data.crop_size,
                                              normalize=built.normalize)
            ds_config = build_ds_config(config.train, config.optim, world_size=self.ctx.world_size,
                                        accelerator=self.ctx.accelerator, micro_batch_size=len(batch["image"]),
                                        grad_accum_steps=1)
            task = SegmentationTask(
                built.module, ignore_index=IGNORE_INDEX,
                loss=build_task_loss(config.loss, num_classes=len(self.class_names)),
                boundary_head=build_boundary_head(built.module) if config.model.boundary_head else None,
            ).to(self.ctx.device, compute_dtype(ds_config))
            # The trainable set of the run's first phase; no weight decay, one lr: only the fit is tested.
            _, groups = phase_param_groups(task.named_parameters, layer_id=built.layer_id,
                                           num_layers=built.num_layers, weight_decay=0.0, lr_scale_of=None,
                                           frozen_fraction=unfreeze_plan(config.unfreeze).frozen_fraction(0))
            outcome: Any = overfit.run_overfit(task, batch, param_groups=groups, ds_config=ds_config, lr=lr,
                                               steps=options.overfit_steps,
                                               num_classes=len(self.class_names), betas=config.optim.betas,
                                               eps=config.optim.eps, device=self.ctx.device)
        except Exception as error:  # noqa: BLE001 - reported as the check's FAIL
            outcome = error
        self.on_main(name, lambda: _raise_or(outcome, lambda trace: overfit.check_overfit(
            trace, factor=options.overfit_factor, miou_threshold=options.overfit_miou, lr=lr)))

    def tile_alignment(self) -> None:
        config = self.config

        def train() -> CheckResult:
            dataset = self._dataset(self.train_data, self.train_error)
            normalize = self._built().normalize
            # Colour jitter is photometric: it changes the colours this check reads, and no geometry.
            transform = dataclasses.replace(build_train_transform(config.data, normalize), color_jitter=None)
            sizes = config.data.augment.crop_sizes or [config.data.crop_size]

            def sized(sample: dict, generator: torch.Generator) -> dict:
                size = sizes[int(torch.randint(len(sizes), (1,), generator=generator))]
                return transform(sample, generator, crop_size=size)

            collate = None
            if config.data.augment.cutmix > 0:
                rng = np.random.default_rng(0)
                def collate(samples):  # noqa: E306 - CutMix is geometric: image and mask boxes must agree
                    return cutmix(default_collate(samples), rng, alpha=config.data.augment.cutmix_alpha)
            return alignment.check_train_alignment(sized, self._masks(dataset), normalize=normalize, collate=collate)

        def inference() -> CheckResult:
            dataset = self._dataset(self.val_data, self.val_error)
            protocol = config.eval
            protocols = [protocol]
            if protocol.mode != "slide":  # the sliding-window path is always exercised
                protocols.append(dataclasses.replace(protocol, mode="slide"))
            return alignment.check_inference_alignment(protocols, self._masks(dataset),
                                                       normalize=self._built().normalize)

        self.on_main("4.train_alignment", train)
        self.on_main("4.inference_alignment", inference)

    def splits(self) -> None:
        data = self.config.data
        tree = self.is_folder_tree()
        counts = split_checks.count_split_images(data.root, data.scenes) if tree else {}
        self.on_main("5.split_folders", lambda: split_checks.check_split_folders(
            source=data.source, root=data.root, train_split=data.train_split, val_split=data.val_split, counts=counts))
        name = "5.split_leakage"
        if not self.options.selects(name):
            return
        if not tree:
            self.on_main(name, lambda: _not_a_tree(name, data.source))
            return
        groups = {split: split_checks.split_images(data.root, split, data.scenes) for split in SPLITS}
        groups["extra"] = [p for folder in self.options.pretrain_images for p in split_checks.image_files_under(folder)]
        jobs = [(group, path) for group, paths in groups.items() for path in paths]
        mine = split_checks.hash_files(path for _, path in self.shard(jobs))
        hashes: dict[str, str] = {}
        for part in self.gather(mine):
            hashes.update(part)

        def of(group: str) -> dict[str, str]:
            return {str(p): hashes[str(p)] for p in groups[group]}

        held_out = {split: of(split) for split in SPLITS if split != data.train_split}
        self.on_main(name, lambda: split_checks.check_split_leakage(of(data.train_split), held_out,
                                                                   extra_train=of("extra")))

    def consistency(self) -> None:
        def judge() -> CheckResult:
            final, source = consistency.read_final_eval(self.options.final_eval)
            validation, validation_source = consistency.validation_protocol(self.config.eval, self.options.final_eval)
            return consistency.check_evaluation_consistency(validation, final, final_source=source,
                                                            validation_source=validation_source)
        self.on_main("6.evaluation_consistency", judge)

    def metric(self) -> None:
        self.on_main("7.metric_correctness", lambda: metric.check_metric(metric.project_metric))

    # -- helpers -------------------------------------------------------------------------------

    def _built(self):
        if self.built is None:
            raise self.model_error or RuntimeError("the model was not built")
        return self.built

    def _model(self):
        return self._built().module

    @staticmethod
    def _dataset(dataset: Dataset | None, error: Exception | None) -> Dataset:
        if dataset is None:
            raise error
        return dataset

    def _masks(self, dataset: Dataset) -> list[torch.Tensor]:
        count = min(self.options.alignment_images, len(dataset))
        return [dataset[i]["mask"] for i in range(count)]


def run_health_checks(config: Config, ctx: DistributedContext, options: HealthOptions) -> list[CheckResult]:
    """Run the selected checks on every rank (a collective); returns every result on every rank.

    Order: pre-flight (devices, collectives, data files, checkpoint keys), then the plan's checks
    1 to 7 (3 includes the overfit).
    """
    run = _Run(config, ctx, options)
    run.setup()
    run.preflight()
    run.labels()
    run.evaluation_outputs()
    run.scale_and_normalisation()
    run.tile_alignment()
    run.splits()
    run.consistency()
    run.metric()
    shared = [run.results]
    dist.broadcast_object_list(shared, src=0)
    order = {name: i for i, name in enumerate(CHECK_NAMES)}
    return sorted(shared[0], key=lambda r: order.get(r.name, len(order)))


# ----------------------------------------------------------------------------------------------


def _try(build: Callable[[], Any]) -> tuple[Any, Exception | None]:
    try:
        return build(), None
    except Exception as error:  # noqa: BLE001 - kept and reported by the checks that need it
        return None, error


def _guard(name: str, judge: Callable[[], CheckResult]) -> CheckResult:
    try:
        return judge()
    except Exception as error:  # noqa: BLE001 - a check that cannot run is a FAIL naming why
        return failed(name, "not run", f"{type(error).__name__}: {error}".splitlines()[0][:500],
                      "fix the error above (it stops the run as well)")


def _raise_or(outcome: Any, judge: Callable[[Any], CheckResult]) -> CheckResult:
    if isinstance(outcome, Exception):
        raise outcome
    return judge(outcome)


def _not_a_tree(name: str, source: str) -> CheckResult:
    return warned(name, f"source {source}", "not checked: this check reads the raw files of a LoveDA folder tree",
                  f"run the health check on the LoveDA folder tree the {source} dataset was built from")


def _sampled(items: list[Any], indices: Callable[[int], list[int]]) -> list[Any]:
    return [items[i] for i in indices(len(items))]

