"""Inference protocol: sliding window against a straightforward reference, TTA, ensembles, forward counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, normalize_images, window_starts
from mapsage_ds.evaluation.protocol import EvalProtocol
from mapsage_ds.models.segformer import build_segformer
from mapsage_ds.tasks import SegmentationTask

NUM_CLASSES = 5


class ContextNet(nn.Module):
    """Two 3×3 convolutions: logits depend on a 5×5 neighbourhood, so window borders matter."""

    def __init__(self, seed: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


class CountingForward:
    """Wraps a forward and counts its calls."""

    def __init__(self, forward) -> None:
        self.forward, self.calls = forward, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.forward(x)


def reference_slide(forward, images: torch.Tensor, tile: int, stride: int) -> torch.Tensor:
    """Each window run alone, logits summed, divided by the per-pixel window count."""
    results = []
    for image in images:
        height, width = image.shape[-2:]

        def origins(length: int) -> list[int]:
            if length <= tile:
                return [0]
            starts = list(range(0, length - tile + 1, stride))
            if starts[-1] != length - tile:
                starts.append(length - tile)
            return starts

        total, count = None, torch.zeros(height, width)
        for top in origins(height):
            for left in origins(width):
                bottom, right = min(top + tile, height), min(left + tile, width)
                logits = forward(image[None, :, top:bottom, left:right])[0]
                if total is None:
                    total = torch.zeros(logits.shape[0], height, width)
                total[:, top:bottom, left:right] += logits
                count[top:bottom, left:right] += 1
        assert count.min() >= 1
        results.append(total / count)
    return torch.stack(results)


@pytest.mark.parametrize("size", [(50, 71), (20, 45), (17, 25), (64, 33)])
def test_sliding_window_equals_reference_on_a_conv_net(size):
    net = ContextNet(seed=1).eval()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    predictor = Predictor(net, normalize=None,
                          protocol=EvalProtocol(mode="slide", tile=32, stride=20, window_batch_size=3))
    with torch.no_grad():
        expected = reference_slide(net, images, tile=32, stride=20)
    got = predictor.logits(images)
    assert got.shape == (2, NUM_CLASSES, *size)
    assert (got - expected).abs().max() <= 1e-5


# SegFormer's sequence reduction needs sides >= 32 px; the second case has a side shorter than the tile.
@pytest.mark.parametrize(("size", "tile", "stride"), [((70, 45), 32, 24), ((40, 90), 48, 30)])
def test_sliding_window_equals_reference_on_a_random_segformer(size, tile, stride):
    torch.manual_seed(3)
    task = SegmentationTask(build_segformer("test", [f"c{i}" for i in range(NUM_CLASSES)])).eval()
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    predictor = Predictor(task.predict, normalize=None,
                          protocol=EvalProtocol(mode="slide", tile=tile, stride=stride, window_batch_size=4))
    with torch.no_grad():
        expected = reference_slide(task.predict, images, tile=tile, stride=stride)
    assert (predictor.logits(images) - expected).abs().max() <= 1e-5


def test_window_starts_cover_the_side_and_end_flush():
    assert window_starts(50, 32, 20) == [0, 18]
    assert window_starts(100, 32, 32) == [0, 32, 64, 68]
    assert window_starts(20, 32, 20) == [0]
    assert window_starts(32, 32, 16) == [0]


def test_whole_mode_is_the_plain_forward():
    net = ContextNet(seed=5).eval()
    images = torch.randn(2, 3, 23, 31)
    with torch.no_grad():
        assert torch.equal(Predictor(net, normalize=None).logits(images), net(images))


def _symmetric_net() -> nn.Module:
    """Pointwise convolution then a kernel symmetric under both flips: equivariant to h, v and hv flips."""
    torch.manual_seed(6)
    pointwise, spatial = nn.Conv2d(3, 6, 1), nn.Conv2d(6, NUM_CLASSES, 3, padding=1)
    with torch.no_grad():
        w = spatial.weight
        w.copy_((w + w.flip(-1) + w.flip(-2) + w.flip(-1, -2)) / 4)
    return nn.Sequential(pointwise, nn.ReLU(), spatial).eval()


def test_flip_tta_of_a_flip_equivariant_model_returns_its_output():
    net = _symmetric_net()
    images = torch.randn(2, 3, 21, 34)
    with torch.no_grad():
        plain = net(images)
    tta = Predictor(net, normalize=None, protocol=EvalProtocol(tta_flip=("h", "v", "hv"))).logits(images)
    assert torch.allclose(tta, plain, atol=1e-6)
    # A model that is not equivariant gives something else: the flips really run.
    other = ContextNet(seed=7).eval()
    with torch.no_grad():
        assert not torch.allclose(Predictor(other, normalize=None,
                                            protocol=EvalProtocol(tta_flip=("h",))).logits(images), other(images))


def test_flip_tta_averages_the_flipped_back_views():
    net = ContextNet(seed=8).eval()
    images = torch.randn(1, 3, 19, 27)
    with torch.no_grad():
        expected = (net(images) + net(images.flip(-1)).flip(-1) + net(images.flip(-2)).flip(-2)) / 3
    got = Predictor(net, normalize=None, protocol=EvalProtocol(tta_flip=("h", "v"))).logits(images)
    assert torch.allclose(got, expected, atol=1e-6)


def test_scale_tta_resizes_back_to_the_label_size():
    net = ContextNet(seed=9).eval()
    images = torch.randn(2, 3, 37, 50)
    predictor = Predictor(net, normalize=None, protocol=EvalProtocol(tta_scales=(0.5, 0.75, 1.5)))
    logits = predictor.logits(images)
    assert logits.shape == (2, NUM_CLASSES, 37, 50)
    with torch.no_grad():
        half = F.interpolate(net(F.interpolate(images, size=(19, 25), mode="bilinear", align_corners=False)),
                             size=(37, 50), mode="bilinear", align_corners=False)
    single = Predictor(net, normalize=None, protocol=EvalProtocol(tta_scales=(0.5,))).logits(images)
    assert torch.allclose(single, half, atol=1e-6)
    # A pointwise model on a constant image gives the same logits at every scale.
    pointwise = nn.Conv2d(3, NUM_CLASSES, 1).eval()
    flat = torch.ones(1, 3, 37, 50) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(Predictor(pointwise, normalize=None, protocol=EvalProtocol(
            tta_scales=(0.5, 1.25))).logits(flat), pointwise(flat), atol=1e-6)


@pytest.mark.parametrize("protocol", [
    EvalProtocol(),
    EvalProtocol(mode="slide", tile=16, stride=10, window_batch_size=3),
    EvalProtocol(mode="slide", tile=16, stride=16, window_batch_size=64, tta_scales=(0.5, 1.0, 1.3), tta_flip=("h",)),
    EvalProtocol(tta_scales=(0.75, 1.25), tta_flip=("h", "v", "hv")),
])
@pytest.mark.parametrize("shape", [(1, 30, 41), (3, 12, 50)])
def test_forward_counts_match_the_forwards_run(protocol, shape):
    counter = CountingForward(ContextNet(seed=10).eval())
    predictor = Predictor(counter, normalize=None, protocol=protocol)
    predictor.logits(torch.randn(shape[0], 3, *shape[1:]))
    assert predictor.forward_counts(*shape) == [counter.calls]
    counter.calls = 0
    predictor.pad_forwards([4], torch.device("cpu"))
    assert counter.calls == 4


def test_normalisation_on_the_device_is_bitwise_the_data_pipeline_one():
    image = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    stats = Normalize(mean=(0.43, 0.411, 0.296), std=(0.213, 0.156, 0.143))
    assert torch.equal(normalize_images(image[None], stats)[0], stats(image))
    with pytest.raises(ValueError, match="uint8"):
        normalize_images(image[None].float(), stats)


def test_ensemble_averages_member_probabilities_with_their_own_normalisation():
    images = torch.randint(0, 256, (2, 3, 26, 30), dtype=torch.uint8)
    first, second = ContextNet(seed=11).eval(), ContextNet(seed=12).eval()
    stats_a, stats_b = Normalize(), Normalize(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ensemble = Ensemble([(Predictor(first, normalize=stats_a), 3.0), (Predictor(second, normalize=stats_b), 2.0)])
    with torch.no_grad():
        prob_a = first(torch.stack([stats_a(i) for i in images])).softmax(1)
        prob_b = second(torch.stack([stats_b(i) for i in images])).softmax(1)
    expected = 0.6 * prob_a + 0.4 * prob_b
    got = ensemble.probabilities(images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(ensemble.predict(images), got.argmax(1))
    assert ensemble.forward_counts(2, 26, 30) == [1, 1]


def test_invalid_protocols_and_ensembles_are_errors():
    for bad in (dict(mode="tiles"), dict(tile=16, stride=32), dict(tta_scales=()), dict(tta_scales=(0.0,)),
                dict(tta_flip=("x",)), dict(tta_flip=("h", "h")), dict(window_batch_size=0)):
        with pytest.raises(ConfigError):
            EvalProtocol(**bad)
    with pytest.raises(ConfigError):
        Ensemble([])
    with pytest.raises(ConfigError):
        Ensemble([(Predictor(ContextNet(seed=0), normalize=None), 0.0)])


# --- forward accounting ----------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    sizes = [(40, 40), (20, 24), (33, 70)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        height, width = self.sizes[index]
        return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
                "mask": torch.randint(0, NUM_CLASSES, (height, width), generator=generator), "name": str(index)}


def test_evaluation_reports_the_forwards_it_ran_and_restores_train_mode():
    net = ContextNet(seed=13).train()
    counter = CountingForward(net)
    protocol = EvalProtocol(mode="slide", tile=16, stride=12, window_batch_size=2, tta_flip=("h",))
    predictor = Predictor(counter, normalize=Normalize(), protocol=protocol, module=net)
    result = run_evaluation(predictor, _Images(), device=torch.device("cpu"), rank=0, world_size=1,
                            class_names=[f"c{i}" for i in range(NUM_CLASSES)], num_panels=2)
    expected = sum(predictor.forward_counts(1, h, w)[0] for h, w in _Images.sizes)
    assert result.forwards == counter.calls == expected
    assert net.training
    assert [p.name for p in result.panels] == ["0", "1"]
    assert sum(map(sum, result.metrics.confusion)) == sum(h * w for h, w in _Images.sizes)
