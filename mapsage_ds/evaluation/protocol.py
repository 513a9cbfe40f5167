"""The evaluation protocol: the ``eval`` section of a run config, and the one spelling of it everywhere.

Validation during training, ``mapsage-evaluate``, ``mapsage-predict``, the experiment tracks and
the health checks all take an :class:`EvalProtocol`; its fields are the ``eval.*`` config keys, so
a protocol is recorded, compared and overridden (``--set eval.tile=1024``) in one form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from mapsage_ds.errors import ConfigError

MODES = ("whole", "slide")
# The eight dihedral views of an image [.., H, W]: name -> (quarter turns of torch.rot90 over (H, W),
# counter-clockwise, then a horizontal flip or not). Each is a pure permutation of pixels, so a view
# and its inverse (flip back, then turn back) are exact.
VIEWS: dict[str, tuple[int, bool]] = {
    "identity": (0, False), "rot90": (1, False), "hv": (2, False), "rot270": (3, False),
    "h": (0, True), "antitranspose": (1, True), "v": (2, True), "transpose": (3, True),
}
# TTA flip option (eval.tta_flip) -> the views it adds to the identity; "d4" is the whole dihedral
# group (rotations by 0/90/180/270 degrees and the horizontal flip of each; hv is the 180 degree turn).
FLIPS: dict[str, tuple[str, ...]] = {
    "h": ("h",), "v": ("v",), "hv": ("hv",),
    "d4": ("rot90", "hv", "rot270", "h", "antitranspose", "v", "transpose"),
}


def flip_views(tta_flip: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The views of one scale: the identity, then each flip option's views, in order."""
    return ("identity", *(view for flip in tta_flip for view in FLIPS[flip]))


def overlapping_flips(tta_flip: list[str] | tuple[str, ...]) -> list[tuple[str, str, list[str]]]:
    """Pairs of flip options that share views (``h`` and ``d4``), with the shared views; empty when valid."""
    return [(a, b, [v for v in FLIPS[a] if v in FLIPS[b]])
            for i, a in enumerate(tta_flip) for b in tta_flip[i + 1:]
            if a in FLIPS and b in FLIPS and a != b and set(FLIPS[a]) & set(FLIPS[b])]


@dataclass(frozen=True)
class EnsembleMember:
    """One exported model of an ensemble; members' softmax probabilities are averaged with these weights.

    Attributes:
        path: An export directory of a training run (``export/`` or ``best/``).
        weight: Weight of this member's softmax probabilities in the ensemble's average (> 0).
    """

    path: str
    weight: float = 1.0


@dataclass(frozen=True)
class RefineSettings:
    """SAM boundary refinement of the predictions (docs/evaluation.md, "SAM boundary refinement").

    Attributes:
        method: ``"sam"``.
        model: a transformers SAM directory or Meta's ``sam_vit_{b,l,h}_*.pth``.
        score_threshold: minimum SAM predicted IoU for a region's mask to be used.
        confidence: minimum SAM pixel probability for a pixel to change.
        min_area: smallest region prompted, in pixels.
        max_regions: regions prompted per image.
    """

    method: str = "sam"
    model: str | None = None
    score_threshold: float = 0.8
    confidence: float = 0.9
    min_area: int = 64
    max_regions: int = 32


REFINE_METHODS = ("sam",)


@dataclass(frozen=True)
class EvalProtocol:
    """How images become predictions and how predictions are scored; record it beside every score.

    Attributes:
        mode: ``"whole"`` (one forward per image) or ``"slide"`` (overlapping windows).
        tile: Window side in pixels (slide); a side shorter than ``tile`` is one window wide.
        stride: Step between window origins (slide), ``0 < stride <= tile``.
        tta_scales: TTA scale factors; each view is resized by the factor, predicted, and its
            logits resized back to the input size.
        tta_flip: Extra TTA views per scale (:data:`FLIPS`): any of ``"h"``, ``"v"``, ``"hv"``, or
            ``"d4"`` alone (the eight rotations and flips of the dihedral group); the identity view is
            always included.
        window_batch_size: Windows per forward pass (slide).
        batch_size: Images per evaluation step.
        max_images: Evaluate the first N images only (None: all).
        boundary_width: Boundary IoU band in pixels (Cheng et al., 2021); None: ``boundary_dilation_ratio``
            of the image diagonal.
        boundary_dilation_ratio: The band as a fraction of the image diagonal.
        ensemble: Exported models whose probabilities are averaged (``mapsage-evaluate --ensemble``);
            empty: the one model the command names.
        refine: SAM boundary refinement (``--refine sam``); None: off.

    Raises:
        ConfigError: naming every invalid ``eval.*`` value at once.
    """

    mode: str = "whole"
    tile: int = 512
    stride: int = 256
    tta_scales: list[float] = field(default_factory=lambda: [1.0])
    tta_flip: list[str] = field(default_factory=list)
    window_batch_size: int = 8
    batch_size: int = 1
    max_images: int | None = None
    boundary_width: int | None = None
    boundary_dilation_ratio: float = 0.02
    ensemble: list[EnsembleMember] = field(default_factory=list)
    refine: RefineSettings | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tta_scales", [float(s) for s in self.tta_scales])
        object.__setattr__(self, "tta_flip", list(self.tta_flip))
        problems = []
        if self.mode not in MODES:
            problems.append(f"eval.mode={self.mode!r}: expected one of {', '.join(MODES)}")
        if self.tile <= 0 or self.stride <= 0 or self.stride > self.tile:
            problems.append(f"eval.tile={self.tile}, eval.stride={self.stride}: expected 0 < stride <= tile")
        if not self.tta_scales or any(not s > 0 for s in self.tta_scales):
            problems.append(f"eval.tta_scales={self.tta_scales}: expected one or more values > 0")
        unknown = [f for f in self.tta_flip if f not in FLIPS]
        if unknown or len(set(self.tta_flip)) != len(self.tta_flip):
            problems.append(f"eval.tta_flip={self.tta_flip}: expected distinct values among {', '.join(FLIPS)}")
        problems += [f"eval.tta_flip={self.tta_flip}: {a} and {b} both hold the view(s) {', '.join(shared)}; "
                     "expected options without common views (d4 already holds h, v and hv: give d4 alone)"
                     for a, b, shared in overlapping_flips(self.tta_flip)]
        for name in ("window_batch_size", "batch_size"):
            if getattr(self, name) <= 0:
                problems.append(f"eval.{name}={getattr(self, name)}: expected a value > 0")
        if self.max_images is not None and self.max_images <= 0:
            problems.append(f"eval.max_images={self.max_images}: expected a value > 0 (or null for all)")
        if self.boundary_width is not None and self.boundary_width < 1:
            problems.append(f"eval.boundary_width={self.boundary_width}: expected pixels >= 1 (or null)")
        if not 0.0 < self.boundary_dilation_ratio < 1.0:
            problems.append(f"eval.boundary_dilation_ratio={self.boundary_dilation_ratio}: expected 0 < value < 1")
        problems += [f"eval.ensemble[{i}]={m.path}:{m.weight}: weight must be > 0"
                     for i, m in enumerate(self.ensemble) if not m.weight > 0]
        if self.refine is not None:
            refine = self.refine
            if refine.method not in REFINE_METHODS:
                problems.append(f"eval.refine.method={refine.method!r}: expected one of {', '.join(REFINE_METHODS)}")
            if refine.model is None:
                problems.append("eval.refine.model is not set: --refine sam needs --sam-model PATH (a local SAM)")
            if not 0.5 < refine.confidence <= 1.0 or refine.min_area < 1 or refine.max_regions < 1:
                problems.append(f"eval.refine={refine}: expected 0.5 < confidence <= 1, min_area >= 1, "
                                "max_regions >= 1")
        if problems:
            raise ConfigError("invalid evaluation protocol:\n  " + "\n  ".join(problems))

    @property
    def views(self) -> list[tuple[float, str]]:
        """The TTA views as ``(scale, view name)`` pairs, in the order the predictor averages them.

        For each scale: the identity, then each flip option's views (:data:`FLIPS`, :data:`VIEWS`).
        """
        per_scale = flip_views(self.tta_flip)
        return [(scale, view) for scale in self.tta_scales for view in per_scale]

    @property
    def num_views(self) -> int:
        """TTA views per image: scales × (1 + the flip options' views); ``d4`` alone is 8 per scale."""
        return len(self.tta_scales) * len(flip_views(self.tta_flip))

    def scored(self) -> dict[str, object]:
        """The settings that change a score (slide geometry only in slide mode); equal dicts score alike.

        Batch sizes are left out: every image is predicted on its own, so they change nothing.
        """
        values: dict[str, object] = {"mode": self.mode}
        if self.mode == "slide":
            values.update(tile=self.tile, stride=self.stride)
        values["tta_scales"] = list(self.tta_scales)
        values["tta_flip"] = sorted(self.tta_flip)
        values["boundary_band"] = (f"{self.boundary_width} px" if self.boundary_width is not None
                                   else f"{self.boundary_dilation_ratio:g} of the diagonal")
        values["max_images"] = self.max_images
        return values

    def to_dict(self) -> dict:
        """Plain, JSON-friendly dict (for reports)."""
        return asdict(self)


def protocol_keys() -> list[str]:
    """The ``eval.*`` keys, in declaration order."""
    return [f.name for f in fields(EvalProtocol)]
