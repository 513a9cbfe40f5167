"""The frozen teacher of a distillation run: loaded from an export, in eval mode, without gradients.

:class:`FrozenTeacher` is deliberately *not* an ``nn.Module``: the distillation task stores it as
a plain attribute, so it never appears in the task's ``state_dict`` or ``named_parameters``, is
never handed to ``deepspeed.initialize`` (no optimizer state, no ZeRO partitioning, no hooks),
is never written into a checkpoint or an export, and ``task.train()`` cannot switch it out of
eval mode. It moves itself to the device and precision it is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError, MapSageError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TeacherOutputs:
    """What the teacher gives the student for one batch.

    Attributes:
        logits: (N, C, h, w) class scores at the teacher's output grid, or None when not needed.
        features: (N, D, h', w') patch features at the chosen level, or None when not needed.
    """

    logits: torch.Tensor | None
    features: torch.Tensor | None


def feature_channels(model: nn.Module) -> list[int]:
    """Channels of each map ``model`` returns as ``hidden_states`` with ``output_hidden_states=True``.

    Knows HF SegFormer (the four stage maps) and :class:`~mapsage_ds.models.dinov3.DINOv3Segmenter`
    (one normalised patch map per fused layer).

    Raises:
        ConfigError: For a model whose features it cannot describe.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "segformer":
        return list(config.hidden_sizes)
    backbone, layers = getattr(model, "backbone", None), getattr(model, "feature_layers", None)
    if backbone is not None and layers is not None and hasattr(backbone.config, "hidden_size"):
        return [backbone.config.hidden_size] * len(layers)
    raise ConfigError(f"feature distillation: cannot tell the feature channels of {type(model).__name__} "
                      "(supported: SegFormer, DINOv3Segmenter)")


def resolve_precision(name: str, *, default: torch.dtype) -> torch.dtype:
    """``auto`` (``default``, the student's compute dtype), ``fp32``, ``bf16`` or ``fp16``."""
    if name == "auto":
        return default
    if name not in PRECISIONS:
        raise ConfigError(f"teacher.precision={name!r}: expected one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over ``module.state_dict()``: names in sorted order, each with dtype, shape and raw bytes.

    Buffers count too (a teacher left in train mode would change its BatchNorm statistics).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenTeacher:
    """A segmentation model used only for targets: eval mode, ``requires_grad=False``, no autograd graph.

    Images arrive normalised for the *student*; the teacher re-normalises them for its own
    pretraining statistics (an exact per-channel affine map), so both see the same pixels.

    Args:
        model: Maps ``pixel_values`` to an output with ``.logits`` (and ``.hidden_states`` maps).
        normalize: The teacher's input normalisation.
        input_normalize: The normalisation the incoming images carry (the student's).
        device: Where the teacher runs.
        dtype: Its precision (bf16/fp16 halves its memory; targets are used in fp32).
        feature_level: Which of the teacher's ``hidden_states`` maps is the feature target.
        logits: Whether outputs include logits.
        features: Whether outputs include features.
        source: Where it was loaded from (for messages).
    """

    def __init__(self, model: nn.Module, *, normalize: Normalize, input_normalize: Normalize,
                 device: torch.device, dtype: torch.dtype, feature_level: int = -1, logits: bool = True,
                 features: bool = False, source: str = "") -> None:
        model.eval()
        model.requires_grad_(False)
        self._model: nn.Module | None = model.to(device=device, dtype=dtype)
        self.device, self.dtype, self.source = device, dtype, source
        self.feature_level, self.logits, self.features = feature_level, logits, features
        self.channels = feature_channels(model) if features else []
        if features and not -len(self.channels) <= feature_level < len(self.channels):
            raise ConfigError(f"teacher.feature_level={feature_level}: the teacher has {len(self.channels)} "
                              "feature maps")
        # x_teacher = (u - m_t) / s_t with u = x_student * s_s + m_s.
        mean_in, std_in = torch.tensor(input_normalize.mean), torch.tensor(input_normalize.std)
        mean, std = torch.tensor(normalize.mean), torch.tensor(normalize.std)
        self._scale = (std_in / std).view(1, 3, 1, 1).to(device)
        self._shift = ((mean_in - mean) / std).view(1, 3, 1, 1).to(device)
        self.digest_at_load = weights_digest(model)
        self._digest_at_release: str | None = None

    @classmethod
    def load(cls, path: str | Path, *, input_normalize: Normalize, device: torch.device, dtype: torch.dtype,
             feature_level: int = -1, logits: bool = True, features: bool = False) -> FrozenTeacher:
        """Load a MapSage export (SegFormer or DINOv3) as a frozen teacher.

        Loading runs under a forked RNG: building the teacher's modules draws random initial
        values, and that must not shift the student's random stream (drop path, dropout). The
        weights are read straight into ``dtype`` (no fp32 copy of a 7B teacher on every rank).

        Raises:
            MissingFileError: When ``path`` is not an export.
        """
        from mapsage_ds.models.factory import load_exported

        with torch.random.fork_rng(devices=[]):
            model, normalize = load_exported(path, dtype=dtype)
        return cls(model, normalize=normalize, input_normalize=input_normalize, device=device, dtype=dtype,
                   feature_level=feature_level, logits=logits, features=features, source=str(path))

    @property
    def model(self) -> nn.Module:
        """The teacher network (an error after :meth:`release`)."""
        if self._model is None:
            raise MapSageError(f"teacher {self.source} was released (its outputs come from the cache)")
        return self._model

    @property
    def feature_dim(self) -> int:
        """Channels of the feature target."""
        return self.channels[self.feature_level]

    @torch.no_grad()
    def forward_images(self, images: torch.Tensor) -> TeacherOutputs:
        """Teacher outputs for images (N, 3, H, W) normalised like the student's input."""
        pixels = (images.to(self.device, torch.float32) * self._scale + self._shift).to(self.dtype)
        output = self.model(pixel_values=pixels, output_hidden_states=self.features)
        features = None
        if self.features:
            features = output.hidden_states[self.feature_level]
            if features.dim() != 4:
                raise ConfigError(f"teacher {self.source}: hidden state {self.feature_level} has shape "
                                  f"{tuple(features.shape)}; expected (N, D, h, w) maps")
        # Contiguous, as the cache stores them: the memory layout changes the order of float
        # reductions in the losses, and live and cached targets must give identical losses.
        return TeacherOutputs(logits=output.logits.contiguous() if self.logits else None,
                              features=None if features is None else features.contiguous())

    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherOutputs:
        """Teacher outputs for a training batch (uses ``batch["image"]``)."""
        return self.forward_images(batch["image"])

    def digest(self) -> str:
        """Current :func:`weights_digest` of the teacher."""
        return weights_digest(self.model)

    def check_unchanged(self) -> str:
        """The current digest, after checking it equals the one at load time.

        Raises:
            MapSageError: When the teacher's weights or buffers changed.
        """
        now = self.digest()
        if now != self.digest_at_load:
            raise MapSageError(f"teacher {self.source}: weights changed during distillation "
                               f"({self.digest_at_load[:12]} -> {now[:12]})")
        return now

    def final_digest(self) -> str:
        """The digest now (checked against load time), or the one checked at :meth:`release`."""
        return self.check_unchanged() if self._model is not None else self._digest_at_release

    def release(self) -> None:
        """Check the weights, then drop the network (its outputs went to the cache) so its memory is reused."""
        self._digest_at_release = self.check_unchanged()
        self._model = None
