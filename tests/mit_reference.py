"""Helpers for the MiT converter tests: mmsegmentation's own MiT as the reference, and checkpoint writers.

The reference network is ``mmseg.models.backbones.mit.MixVisionTransformer`` from mmsegmentation
1.2.2. Its package ``__init__`` pulls in every model, and some of those import mmcv's compiled ops,
which mmcv-lite does not ship; the MiT backbone itself needs none. When the compiled ops are absent,
:func:`mmseg_mit_class` therefore imports only the three source files the backbone needs
(``models/utils/embed.py``, ``models/utils/shape_convert.py``, ``models/backbones/mit.py``) under
their own names, behind empty package entries, and takes those entries out again afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import pickle
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

TINY = {"embed_dims": 16, "num_heads": [1, 2, 4, 8], "num_layers": [1, 2, 1, 1], "sr_ratios": [8, 4, 2, 1]}
TINY_HIDDEN = [16, 32, 64, 128]


@contextlib.contextmanager
def mmseg_source_packages(packages: tuple[str, ...]) -> Iterator[Path]:
    """Empty entries for mmseg's ``packages``, so their source files import without the package ``__init__``s.

    mmsegmentation's package ``__init__`` files import every model, some of them mmcv's compiled ops,
    which mmcv-lite lacks. Inside this block, ``importlib.import_module("mmseg.models.x.y")`` loads
    just that file; every module imported under the packages is taken out again afterwards. Yields
    mmseg's source root.
    """
    import mmseg  # noqa: F401  (checks the mmcv version range)

    root = Path(sys.modules["mmseg"].__file__).parent
    before = set(sys.modules)
    try:
        for name in packages:
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
        yield root
    finally:
        for name in set(sys.modules) - before:
            if name.startswith(packages):
                del sys.modules[name]


@functools.cache
def mmseg_mit_class() -> type[nn.Module]:
    """mmsegmentation's ``MixVisionTransformer`` class (raises ImportError when mmseg is not installed)."""
    import mmseg  # noqa: F401  (checks the mmcv version range)

    if importlib.util.find_spec("mmcv._ext") is not None:  # full mmcv: the normal import works
        from mmseg.models.backbones.mit import MixVisionTransformer

        return MixVisionTransformer
    with mmseg_source_packages(("mmseg.models", "mmseg.models.utils", "mmseg.models.backbones")):
        utils = sys.modules["mmseg.models.utils"]
        embed = importlib.import_module("mmseg.models.utils.embed")
        shape = importlib.import_module("mmseg.models.utils.shape_convert")
        utils.PatchEmbed, utils.nchw_to_nlc, utils.nlc_to_nchw = embed.PatchEmbed, shape.nchw_to_nlc, shape.nlc_to_nchw
        return importlib.import_module("mmseg.models.backbones.mit").MixVisionTransformer


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter and BatchNorm buffer non-trivial random values, so wrong mappings show.

    Weights get unit-gain scale (attention is far from uniform), biases and LayerNorm shifts are
    non-zero, LayerNorm/BatchNorm gains are away from one, BatchNorm running statistics are set.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() == 1 and name.endswith("weight"):  # norm gains
                param.copy_(1.0 + 0.3 * noise)
            elif param.dim() == 1:
                param.copy_(0.2 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise * fan_in ** -0.5)
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen))
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(17)
    return module


def build_reference(eps: float, seed: int = 0) -> nn.Module:
    """A tiny mmseg MiT (widths 16/32/64/128, depths 1/2/1/1) with random weights, in eval mode."""
    mit_cls = mmseg_mit_class()
    model = mit_cls(**TINY, norm_cfg={"type": "LN", "eps": eps})
    return randomize_(model, seed).eval()


def mmseg_to_nvlabs(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an mmseg MiT state dict to NVlabs' ``mix_transformer.py`` names (the inverse of ``mit2mmseg``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        stage = int(parts[1]) + 1
        if parts[2] == "0":  # patch embed: projection -> proj
            out[f"patch_embed{stage}.{'proj' if parts[3] == 'projection' else 'norm'}.{parts[4]}"] = value
        elif parts[2] == "2":  # stage norm
            out[f"norm{stage}.{parts[3]}"] = value
        else:
            block, rest = f"block{stage}.{parts[3]}.", ".".join(parts[4:])
            if rest.startswith("attn.attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                width = value.shape[0] // 3
                out[f"{block}attn.q.{kind}"] = value[:width].clone()
                out[f"{block}attn.kv.{kind}"] = value[width:].clone()
            elif rest.startswith("attn.attn.out_proj."):
                out[block + "attn.proj." + rest.rsplit(".", 1)[1]] = value
            elif rest.startswith("ffn.layers."):
                index, kind = rest.split(".")[2:]
                name = {"0": "mlp.fc1", "1": "mlp.dwconv.dwconv", "4": "mlp.fc2"}[index]
                out[f"{block}{name}.{kind}"] = value.flatten(1) if index != "1" and kind == "weight" else value
            else:  # norm1, norm2, attn.sr, attn.norm keep their names
                out[block + rest] = value
    return out


class NVLabsMLPHead(nn.Module):
    """The module names of NVlabs' ``SegFormerHead`` (with mmseg's unused ``conv_seg``), for its state dict."""

    def __init__(self, in_channels: list[int], embed: int, num_classes: int) -> None:
        super().__init__()
        for i, width in enumerate(in_channels, start=1):
            linear = nn.Module()
            linear.proj = nn.Linear(width, embed)
            setattr(self, f"linear_c{i}", linear)
        self.linear_fuse = nn.Module()
        self.linear_fuse.conv = nn.Conv2d(4 * embed, embed, 1, bias=False)
        self.linear_fuse.bn = nn.BatchNorm2d(embed)
        self.linear_pred = nn.Conv2d(embed, num_classes, 1)
        self.conv_seg = nn.Conv2d(embed, num_classes, 1)


def nvlabs_head_logits(head: dict[str, Tensor], features: list[Tensor]) -> Tensor:
    """NVlabs' all-MLP head computed by hand from its tensors (eval mode: BatchNorm uses running stats)."""
    size = features[0].shape[2:]
    projected = []
    for i, feature in enumerate(features, start=1):
        n, _, h, w = feature.shape
        weight, bias = head[f"linear_c{i}.proj.weight"], head[f"linear_c{i}.proj.bias"]
        tokens = feature.flatten(2).transpose(1, 2) @ weight.T + bias
        grid = tokens.transpose(1, 2).reshape(n, -1, h, w)
        projected.append(torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False))
    fused = torch.cat(projected[::-1], dim=1)  # c4, c3, c2, c1
    fused = torch.einsum("oc,nchw->nohw", head["linear_fuse.conv.weight"].flatten(1), fused)
    mean, var = head["linear_fuse.bn.running_mean"], head["linear_fuse.bn.running_var"]
    gain, shift = head["linear_fuse.bn.weight"], head["linear_fuse.bn.bias"]
    fused = (fused - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * gain[:, None, None]
    fused = torch.relu(fused + shift[:, None, None])
    logits = torch.einsum("oc,nchw->nohw", head["linear_pred.weight"].flatten(1), fused)
    return logits + head["linear_pred.bias"][:, None, None]


def mmseg_segmentor(backbone: nn.Module, channels: int, num_classes: int) -> nn.Module:
    """An ``EncoderDecoder``-shaped module: ``backbone`` plus a head laid out like mmseg's ``SegformerHead``.

    The head is built from mmcv's ``ConvModule`` (``convs.{i}``, ``fusion_conv``, ``conv_seg``) with
    random weights; the converter must drop it.
    """
    from mmcv.cnn import ConvModule

    head = nn.Module()
    bn = {"type": "BN", "requires_grad": True}
    widths = [m.projection.out_channels for m in (stage[0] for stage in backbone.layers)]
    head.convs = nn.ModuleList(ConvModule(w, channels, 1, norm_cfg=bn) for w in widths)
    head.fusion_conv = ConvModule(channels * len(widths), channels, 1, norm_cfg=bn)
    head.conv_seg = nn.Conv2d(channels, num_classes, 1)
    segmentor = nn.Module()
    segmentor.backbone = copy.deepcopy(backbone)
    segmentor.decode_head = randomize_(head, seed=5)
    return segmentor.eval()


def write_mmengine_training_checkpoint(path: Path, model: nn.Module) -> None:
    """Write ``model``'s weights the way mmengine's ``Runner.save_checkpoint`` does, with real mmengine objects.

    The file holds ``meta``, ``state_dict`` (``model``'s current weights), ``message_hub`` (mmengine
    ``HistoryBuffer`` objects of numpy arrays, numpy scalars in the logs), ``optimizer`` (an
    ``OptimWrapper`` after real AdamW steps, taken on a copy so ``model`` keeps its weights) and
    ``param_schedulers``.
    """
    state_dict = model.state_dict()
    model = copy.deepcopy(model).train()
    import mmengine
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper, PolyLR
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    params = [p for p in model.parameters() if p.requires_grad]
    wrapper = OptimWrapper(torch.optim.AdamW(params, lr=6e-5, weight_decay=0.01))
    scheduler = PolyLR(wrapper.optimizer, eta_min=0.0, power=1.0, begin=0, end=160, by_epoch=False)
    hub = MessageHub.get_instance(f"mapsage_test_{time.monotonic_ns()}")
    for step in range(3):
        loss = sum((p.float() ** 2).mean() for p in params) * (step + 1)
        wrapper.update_params(loss)
        scheduler.step()
        hub.update_scalar("train/loss", float(loss.detach()))
        hub.update_scalar("train/lr", np.float64(scheduler.get_last_value()[0]))
        hub.update_scalar("train/data_time", np.float32(0.01 * step))
    hub.update_info("iter", 3)
    hub.update_info("epoch", 0)
    hub.update_info("max_iters", 160)
    hub.update_info("last_ckpt", str(path))
    meta = {"epoch": 0, "iter": 3, "cfg": "model = dict(type='EncoderDecoder')", "seed": 0,
            "experiment_name": "tiny_segformer", "time": time.strftime("%Y%m%d_%H%M%S"),
            "mmengine_version": mmengine.__version__,
            "dataset_meta": {"classes": ("background", "building"), "palette": [[0, 0, 0], [255, 0, 0]]}}
    checkpoint = {"meta": meta, "state_dict": weights_to_cpu(state_dict), "message_hub": hub.state_dict(),
                  "optimizer": wrapper.state_dict(), "param_schedulers": [scheduler.state_dict()]}
    save_checkpoint(checkpoint, str(path))


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy's ``numpy._core.*`` globals under the numpy 1 names ``numpy.core.*``."""

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core", 1)
            qualname = name or obj.__qualname__
            self.write(pickle.GLOBAL + module.encode() + b"\n" + qualname.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1_PICKLE = types.SimpleNamespace(Pickler=_Numpy1Pickler, __name__="numpy1_pickle")
"""A ``pickle_module`` for ``torch.save`` that writes files as numpy 1 would name its globals."""
