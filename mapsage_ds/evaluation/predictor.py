"""Inference protocol: whole image or sliding window, test-time augmentation, weighted ensembles.

One :class:`Predictor` turns raw ``uint8`` images into class scores at the input resolution.
Validation during training and ``scripts/evaluate.py`` build it from the same
:class:`EvalProtocol`, so every experiment is scored with identical resize/slide/TTA
(health check 6).

What gets averaged, and why:
    * Sliding windows of one model: logits are summed over the windows covering a pixel and
      divided by that pixel's window count (the windows come from the same network, so their
      logits share one scale).
    * TTA views of one model (scales × flips or the dihedral group ``d4``): logits are averaged, for
      the same reason, after each view is mapped back by its exact inverse (flipped back, turned
      back) and resized to the input size. The sum runs in :attr:`EvalProtocol.views` order
      (:func:`average_views`), so that anything combining cached view logits in that order (the
      TTA sweep) gets these logits bit for bit.
    * Ensemble members: softmax probabilities are averaged with the members' weights. Models
      trained separately (other losses, other backbones) have logits of different scale, so a
      logit average would let the most over-confident model dominate whatever its weight;
      probabilities live on one scale, so the weights mean what they say.

Every model forward is counted: :meth:`Predictor.forward_counts` says how many forwards a batch
will take, so that sharded evaluation can make every rank run the same number of forwards
(ZeRO-3 gathers parameters collectively inside each forward and hangs otherwise).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError, DataError
from mapsage_ds.evaluation.protocol import VIEWS, EvalProtocol
from mapsage_ds.tasks.segmentation import upsample_logits

__all__ = ["Ensemble", "Predictor", "apply_view", "average_views", "eval_mode", "invert_view", "normalize_images",
           "window_starts"]

# A TTA view: (scale, view name of protocol.VIEWS).
ViewKey = tuple[float, str]

# Side of the dummy input of padding forwards (any size the networks accept will do).
_PADDING_INPUT_SIDE = 64


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Origins of the windows along one side: every ``stride``, the last flush with the end.

    A side no longer than ``tile`` gets one window at 0 (which is then the whole side).
    """
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Size of an image resized by ``scale`` (rounded half up, at least 1 pixel)."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def apply_view(x: Tensor, view: str) -> Tensor:
    """The dihedral view ``view`` (:data:`~mapsage_ds.evaluation.protocol.VIEWS`) of images, contiguous.

    A quarter turn swaps the last two sides; the result is made contiguous so that the model sees
    the same memory layout as for an image that was never turned.

    Shape:
        - x: ``[..., H, W]``; returns ``[..., H, W]``, or ``[..., W, H]`` for an odd number of turns.
    """
    turns, flip = VIEWS[view]
    out = torch.rot90(x, turns, dims=(-2, -1)) if turns else x
    out = out.flip(-1) if flip else out
    return out.contiguous() if out is not x else x


def invert_view(x: Tensor, view: str) -> Tensor:
    """The inverse of :func:`apply_view`: flip back, then turn back; exact (``invert_view(apply_view(x)) == x``)."""
    turns, flip = VIEWS[view]
    out = x.flip(-1) if flip else x
    return torch.rot90(out, -turns, dims=(-2, -1)) if turns else out


def average_views(outputs: Iterable[Tensor]) -> Tensor:
    """Mean of view logits, summed left to right in the given order (the order fixes the rounding)."""
    total, count = None, 0
    for out in outputs:
        total = out if total is None else total + out
        count += 1
    if total is None:
        raise ConfigError("no TTA view to average")
    return total / count


def normalize_images(images: Tensor, normalize: Normalize | None) -> Tensor:
    """Standardise ``uint8`` images on their device with the statistics of ``normalize``.

    The arithmetic is that of :class:`~mapsage_ds.data.transforms.Normalize`, so the result
    is bitwise what the CPU data pipeline would give. ``normalize=None`` means the images
    are already standardised floats and are returned unchanged.

    Shape:
        - images: ``[N, 3, H, W]``.

    Raises:
        DataError: If raw images are not ``uint8`` or normalised ones are not floating point.
    """
    if normalize is None:
        if not images.is_floating_point():
            raise DataError(f"images of dtype {images.dtype} given to a predictor without normalisation; "
                            "pass uint8 images and a Normalize, or already standardised float images")
        return images
    if images.dtype != torch.uint8:
        raise DataError(f"the predictor normalises raw uint8 images itself, got dtype {images.dtype}")
    mean = torch.tensor(normalize.mean, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(normalize.std, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std


class Predictor:
    """One model under an inference protocol.

    Args:
        forward: Maps standardised images ``[B, 3, h, w]`` to logits ``[B, C, h, w]`` at the
            input size (e.g. ``SegmentationTask.predict``).
        normalize: The model's input statistics; None when images arrive standardised.
        protocol: Whole/slide and TTA settings.
        module: The module behind ``forward``, switched to eval mode by :func:`eval_mode`.

    Shape:
        - images: ``[N, 3, H, W]``, ``uint8`` (or standardised floats when ``normalize`` is None).
        - logits / probabilities: ``[N, C, H, W]`` float32; predict: ``[N, H, W]`` int64.
    """

    def __init__(self, forward: Callable[[Tensor], Tensor], *, normalize: Normalize | None,
                 protocol: EvalProtocol | None = None, module: nn.Module | None = None) -> None:
        self.forward = forward
        self.normalize = normalize
        self.protocol = protocol or EvalProtocol()
        self.module = module
        self.forwards_run = 0  # model forwards so far, padding included (ranks compare it)

    def modules(self) -> list[nn.Module]:
        """The modules whose train/eval mode matters."""
        return [self.module] if self.module is not None else []

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Logits averaged over the TTA views (:attr:`EvalProtocol.views`), at the input resolution."""
        return average_views(out for _, out in self._each_view(images, self.protocol.views))

    @torch.no_grad()
    def view_logits(self, images: Tensor, views: Sequence[ViewKey]) -> dict[ViewKey, Tensor]:
        """Each view's logits, mapped back to the input geometry and size (one pass per distinct view).

        :meth:`logits` is ``average_views`` of these, taken in ``protocol.views`` order; the TTA sweep
        computes the views of many protocols once and combines them.
        """
        return dict(self._each_view(images, list(dict.fromkeys(views))))

    def _each_view(self, images: Tensor, views: Sequence[ViewKey]) -> Iterator[tuple[ViewKey, Tensor]]:
        x = normalize_images(images, self.normalize)
        height, width = x.shape[-2:]
        resized: dict[float, Tensor] = {}  # the current scale only: views come grouped by scale
        for scale, view in views:
            if scale not in resized:
                size = scaled_size(height, width, scale)
                resized = {scale: x if size == (height, width) else F.interpolate(x, size=size, mode="bilinear",
                                                                                   align_corners=False)}
            out = invert_view(self._view_logits(apply_view(resized[scale], view)), view)
            yield (scale, view), upsample_logits(out, (height, width))

    def probabilities(self, images: Tensor) -> Tensor:
        """Softmax of :meth:`logits` over classes."""
        return self.logits(images).softmax(dim=1)

    def predict(self, images: Tensor) -> Tensor:
        """Class index per pixel."""
        return self.logits(images).argmax(dim=1)

    def forward_counts(self, batch: int, height: int, width: int) -> list[int]:
        """Model forwards :meth:`logits` runs for ``batch`` images of this size (one entry)."""
        return [self.view_forwards(batch, height, width, self.protocol.views)]

    def view_forwards(self, batch: int, height: int, width: int, views: Sequence[ViewKey]) -> int:
        """Model forwards that ``batch`` images of this size take for these views (window batches counted)."""
        protocol = self.protocol
        if protocol.mode == "whole":
            return len(views)
        return sum(math.ceil(batch * self.view_windows(height, width, [key]) / protocol.window_batch_size)
                   for key in views)

    def view_windows(self, height: int, width: int, views: Sequence[ViewKey]) -> int:
        """Network evaluations of one image of this size for these views: 1 per view whole, its windows sliding.

        Unlike :meth:`view_forwards` this does not depend on how windows are batched: it is the cost of a
        protocol in windows (a quarter-turned view swaps the sides, which leaves the count unchanged).
        """
        protocol = self.protocol
        if protocol.mode == "whole":
            return len(views)
        total = 0
        for scale, view in views:
            h, w = scaled_size(height, width, scale)
            if VIEWS[view][0] % 2:
                h, w = w, h
            total += len(window_starts(h, protocol.tile, protocol.stride)) * len(
                window_starts(w, protocol.tile, protocol.stride))
        return total

    @torch.no_grad()
    def pad_forwards(self, counts: Sequence[int], device: torch.device) -> None:
        """Run ``counts[0]`` discarded forwards on a dummy input (keeps ZeRO-3 ranks in step)."""
        (count,) = counts
        dummy = torch.zeros(1, 3, _PADDING_INPUT_SIDE, _PADDING_INPUT_SIDE, device=device)
        for _ in range(count):
            self.forward(dummy)
            self.forwards_run += 1

    def _view_logits(self, x: Tensor) -> Tensor:
        if self.protocol.mode == "whole":
            return self._run(x)
        return self._slide(x)

    def _run(self, x: Tensor) -> Tensor:
        out = self.forward(x)
        self.forwards_run += 1
        if out.shape[0] != x.shape[0] or out.shape[-2:] != x.shape[-2:]:
            raise DataError(f"the model forward must return logits [B, C, h, w] at its input size; input "
                            f"{tuple(x.shape)} gave {tuple(out.shape)}")
        return out.float()

    def _slide(self, x: Tensor) -> Tensor:
        """Overlapping windows of all images, batched ``window_batch_size`` at a time."""
        protocol = self.protocol
        num_images, _, height, width = x.shape
        tile_h, tile_w = min(protocol.tile, height), min(protocol.tile, width)
        origins = [(top, left) for top in window_starts(height, protocol.tile, protocol.stride)
                   for left in window_starts(width, protocol.tile, protocol.stride)]
        windows = [(n, top, left) for n in range(num_images) for top, left in origins]
        summed = None
        for start in range(0, len(windows), protocol.window_batch_size):
            chunk = windows[start:start + protocol.window_batch_size]
            batch = torch.stack([x[n, :, top:top + tile_h, left:left + tile_w] for n, top, left in chunk])
            out = self._run(batch)
            if summed is None:
                summed = out.new_zeros(num_images, out.shape[1], height, width)
            for k, (n, top, left) in enumerate(chunk):
                summed[n, :, top:top + tile_h, left:left + tile_w] += out[k]
        count = x.new_zeros(1, 1, height, width)
        for top, left in origins:
            count[..., top:top + tile_h, left:left + tile_w] += 1
        return summed / count


class Ensemble:
    """Weighted average of the members' softmax probabilities (see the module docstring).

    Each member is a :class:`Predictor` with its own normalisation and protocol; weights are
    divided by their sum.

    Args:
        members: ``(predictor, weight)`` pairs, weights > 0.

    Raises:
        ConfigError: If there is no member or a weight is not positive.
    """

    def __init__(self, members: Sequence[tuple[Predictor, float]]) -> None:
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        bad = [w for _, w in members if not w > 0]
        if bad:
            raise ConfigError(f"ensemble weights must be > 0, got {[w for _, w in members]}")
        total = sum(w for _, w in members)
        self.members = [(predictor, w / total) for predictor, w in members]

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        """Weighted mean of the members' class probabilities, ``[N, C, H, W]``."""
        return self.mix(predictor.probabilities(images) for predictor, _ in self.members)

    def mix(self, member_probabilities: Iterable[Tensor]) -> Tensor:
        """Weighted mean of one probability tensor per member, in member order (as :meth:`probabilities`)."""
        mixed = None
        for index, ((_, weight), probs) in enumerate(zip(self.members, member_probabilities, strict=True)):
            if mixed is not None and probs.shape != mixed.shape:
                raise DataError(f"ensemble member {index} gives scores of shape {tuple(probs.shape)}, "
                                f"member 0 gives {tuple(mixed.shape)}: members must share the classes")
            mixed = probs * weight if mixed is None else mixed + probs * weight
        return mixed

    def predict(self, images: Tensor) -> Tensor:
        """Class index per pixel."""
        return self.probabilities(images).argmax(dim=1)

    @property
    def forwards_run(self) -> int:
        """Model forwards of all members so far."""
        return sum(predictor.forwards_run for predictor, _ in self.members)

    def modules(self) -> list[nn.Module]:
        """The members' modules."""
        return [m for predictor, _ in self.members for m in predictor.modules()]

    def forward_counts(self, batch: int, height: int, width: int) -> list[int]:
        """Forwards per member for ``batch`` images of this size."""
        return [n for predictor, _ in self.members for n in predictor.forward_counts(batch, height, width)]

    def pad_forwards(self, counts: Sequence[int], device: torch.device) -> None:
        """Padding forwards per member (see :meth:`Predictor.pad_forwards`)."""
        for (predictor, _), count in zip(self.members, counts, strict=True):
            predictor.pad_forwards([count], device)


@contextlib.contextmanager
def eval_mode(predictor: Predictor | Ensemble) -> Iterator[None]:
    """Put the predictor's modules in eval mode, restoring each one's mode afterwards."""
    modules = predictor.modules()
    modes = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
