"""The d4 TTA group (exact views and inverses) and the TTA sweep (equal to separate evaluations)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import clear_world
from mapsage_ds.cli.evaluate import main as evaluate_main
from mapsage_ds.data.classes import IGNORE_INDEX, LOVEDA_CLASSES
from mapsage_ds.data.loveda import LoveDA
from mapsage_ds.data.transforms import Normalize
from mapsage_ds.errors import ConfigError
from mapsage_ds.evaluation.loop import run_evaluation
from mapsage_ds.evaluation.predictor import Ensemble, Predictor, apply_view, invert_view
from mapsage_ds.evaluation.protocol import FLIPS, VIEWS, EvalProtocol
from mapsage_ds.evaluation.sweep import SWEEP_FILES, parse_sweep, run_sweep, sweep_protocols
from mapsage_ds.models import load_exported
from mapsage_ds.tasks import SegmentationTask

NUM_CLASSES = 4
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two shared cores: one thread is faster than contention (as in test_health.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ContextNet(nn.Module):
    """Two 3×3 convolutions with random weights: not equivariant to any rotation or flip."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, NUM_CLASSES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


def _dihedral_net() -> nn.Module:
    """Pointwise convolution, then a 3×3 kernel averaged over the eight dihedral transforms: d4-equivariant."""
    torch.manual_seed(1)
    pointwise, spatial = nn.Conv2d(3, 6, 1), nn.Conv2d(6, NUM_CLASSES, 3, padding=1)
    with torch.no_grad():
        w = spatial.weight
        turns = [torch.rot90(w, k, dims=(-2, -1)) for k in range(4)]
        spatial.weight.copy_(sum(t + t.flip(-1) for t in turns) / 8)
    return nn.Sequential(pointwise, nn.ReLU(), spatial).eval()


def _manual_d4(forward, x: torch.Tensor) -> torch.Tensor:
    """The eight views computed here, independently of the library's tables: turn, flip, predict, undo."""
    total = 0
    for turns in range(4):
        for flip in (False, True):
            view = torch.rot90(x, turns, dims=(2, 3))
            view = view.flip(3) if flip else view
            out = forward(view)
            out = out.flip(3) if flip else out
            total = total + torch.rot90(out, -turns, dims=(2, 3))
    return total / 8


# --- the dihedral views ----------------------------------------------------------------------------


def test_each_view_is_undone_exactly_and_the_eight_are_distinct():
    # A coloured, non-square image without any symmetry: every view moves some pixel.
    image = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = []
    for view, (turns, _) in VIEWS.items():
        out = apply_view(image, view)
        assert out.shape[-2:] == ((7, 5) if turns % 2 else (5, 7)) and out.is_contiguous()
        assert torch.equal(invert_view(out, view), image), view
        assert not any(torch.equal(out, other) for other in seen), view
        seen.append(out)
    assert len(seen) == 8
    # The names mean what they say.
    assert torch.equal(apply_view(image, "h"), image.flip(-1))
    assert torch.equal(apply_view(image, "v"), image.flip(-2))
    assert torch.equal(apply_view(image, "hv"), image.flip(-2, -1))
    assert torch.equal(apply_view(image, "transpose"), image.transpose(-2, -1))
    assert torch.equal(apply_view(image, "rot90"), torch.rot90(image, 1, dims=(-2, -1)))
    assert set(FLIPS["d4"]) | {"identity"} == set(VIEWS)


def test_d4_protocol_has_eight_views_per_scale_and_stands_alone():
    protocol = EvalProtocol(tta_scales=(0.5, 1.0), tta_flip=("d4",))
    assert protocol.num_views == 16 and len(set(protocol.views)) == 16
    assert EvalProtocol(tta_flip=("h", "v")).num_views == 3
    with pytest.raises(ConfigError, match=r"h and d4 both hold the view\(s\) h"):
        EvalProtocol(tta_flip=("h", "d4"))
    with pytest.raises(ConfigError, match="d4"):
        EvalProtocol(tta_flip=("d8",))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_d4_of_an_equivariant_model_is_its_own_output(mode):
    net = _dihedral_net()
    images = torch.randn(2, 3, 21, 34, generator=torch.Generator().manual_seed(2))
    # Slide: a pointwise model does not see window borders, so only the views' mapping back matters.
    model = net if mode == "whole" else net[0]
    protocol = EvalProtocol(mode=mode, tile=16, stride=12, window_batch_size=5, tta_flip=("d4",))
    with torch.no_grad():
        plain = model(images)
    got = Predictor(model, normalize=None, protocol=protocol).logits(images)
    assert torch.allclose(got, plain, atol=1e-5)
    assert torch.equal(got.argmax(1), plain.argmax(1))


def test_d4_of_another_model_is_the_mean_of_the_eight_views():
    net = ContextNet(seed=3).eval()
    images = torch.randn(1, 3, 19, 26, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = _manual_d4(net, images)
        assert not torch.allclose(expected, net(images), atol=1e-3)  # the views really differ
        # At scale 0.5: resize, the eight views, logits resized back.
        small = F.interpolate(images, size=(10, 13), mode="bilinear", align_corners=False)
        half = F.interpolate(_manual_d4(net, small), size=(19, 26), mode="bilinear", align_corners=False)
    got = Predictor(net, normalize=None, protocol=EvalProtocol(tta_flip=("d4",))).logits(images)
    assert torch.allclose(got, expected, atol=1e-6)
    two = Predictor(net, normalize=None, protocol=EvalProtocol(tta_scales=(1.0, 0.5), tta_flip=("d4",)))
    assert torch.allclose(two.logits(images), (expected + half) / 2, atol=1e-6)
    # Sliding window on the turned (26×19) views: each view slides on its own sides.
    slide = EvalProtocol(mode="slide", tile=16, stride=10, window_batch_size=3)
    counter = _Counting(net)
    got = Predictor(counter, normalize=None, protocol=EvalProtocol(**{**slide.to_dict(), "tta_flip": ["d4"]}))
    logits = got.logits(images)
    plain_slide = Predictor(net, normalize=None, protocol=slide).logits
    assert torch.allclose(logits, _manual_d4(plain_slide, images), atol=1e-6)
    assert got.forward_counts(1, 19, 26) == [counter.calls]


class _Counting:
    def __init__(self, forward) -> None:
        self.forward, self.calls = forward, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.forward(x)


# --- the sweep -------------------------------------------------------------------------------------


def test_sweep_spec_and_the_protocols_it_enumerates():
    spec = parse_sweep(["scales=0.75,1,1.25", "flips=h,v,d4"])
    assert spec.scales == (0.75, 1.0, 1.25) and spec.flips == ("h", "v", "d4")
    protocols = sweep_protocols(EvalProtocol(mode="slide", tile=64, stride=32), spec)
    assert len(protocols) == 7 * 5  # flip subsets: none, h, v, h+v, d4
    assert {tuple(p.tta_flip) for p in protocols} == {(), ("h",), ("v",), ("h", "v"), ("d4",)}
    assert all(p.mode == "slide" and p.tile == 64 for p in protocols)
    assert len({(tuple(p.tta_scales), tuple(p.tta_flip)) for p in protocols}) == 35
    assert parse_sweep("flips=hv").scales == (1.0,) and parse_sweep("scales=1,2").flips == ()
    for bad in ("scales=1,x", "scales=0", "flips=h,h", "flips=d8", "size=3", "scales=1 scales=2", "",
                "scales=" + ",".join(str(s) for s in range(1, 11))):
        with pytest.raises(ConfigError, match="--tta-sweep"):
            parse_sweep(bad)


class _Images(torch.utils.data.Dataset):
    sizes = [(30, 41), (24, 24), (33, 20)]

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        height, width = self.sizes[index]
        mask = torch.randint(0, NUM_CLASSES, (height, width), generator=generator)
        mask[:3] = IGNORE_INDEX
        return {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
                "mask": mask, "name": str(index)}


def test_sweep_of_an_ensemble_scores_each_protocol_as_its_own_evaluation():
    base = EvalProtocol(mode="slide", tile=16, stride=12, window_batch_size=4)
    nets = [ContextNet(seed=5).eval(), ContextNet(seed=6).eval()]

    def ensemble(protocol: EvalProtocol) -> Ensemble:
        return Ensemble([(Predictor(nets[0], normalize=Normalize(), protocol=protocol), 2.0),
                         (Predictor(nets[1], normalize=Normalize(), protocol=protocol), 1.0)])

    names = [f"c{i}" for i in range(NUM_CLASSES)]
    protocols = sweep_protocols(base, parse_sweep("scales=1,0.6 flips=v,d4"))
    swept = ensemble(base)
    result = run_sweep(swept, _Images(), protocols=protocols, device=CPU, rank=0, world_size=1, class_names=names)
    assert len(result.entries) == 3 * 3
    # Every view of both scales ran once per image and member, and nothing else.
    union = [(s, v) for s in (1.0, 0.6) for v in VIEWS]
    first = swept.members[0][0]
    assert result.forwards == 2 * sum(first.view_forwards(1, h, w, union) for h, w in _Images.sizes)
    assert result.windows_per_image == pytest.approx(
        2 * sum(first.view_windows(h, w, union) for h, w in _Images.sizes) / 3)
    for entry in result.entries:
        alone = run_evaluation(ensemble(entry.protocol), _Images(), protocol=entry.protocol, device=CPU, rank=0,
                               world_size=1, class_names=names)
        assert entry.metrics.confusion == alone.metrics.confusion, entry.name
        assert entry.metrics.boundary_iou == alone.metrics.boundary_iou, entry.name
        windows = [first.view_windows(h, w, entry.protocol.views) for h, w in _Images.sizes]
        assert entry.windows_per_image == pytest.approx(2 * sum(windows) / len(windows))
    mious = [e.metrics.miou for e in result.entries]
    assert mious == sorted(mious, reverse=True) and len(set(mious)) > 1


SWEEP_ARGS = ["--tta-sweep", "scales=1,0.75", "flips=h,d4", "--mode", "slide", "--tile", "96", "--stride", "64",
              "--window-batch-size", "3", "--scenes", "urban", "--max-images", "2"]


def run_evaluate(argv: list[str], monkeypatch):
    """evaluate main(argv) in this process, as a world of one."""
    clear_world(monkeypatch)
    return evaluate_main(argv)


def test_evaluate_tta_sweep_writes_a_leaderboard_equal_to_separate_evaluations(tmp_path, tiny_tree, export_dir,
                                                                                monkeypatch, capsys):
    out = tmp_path / "sweep"
    result = run_evaluate(["--model", str(export_dir), "--data-root", str(tiny_tree), *SWEEP_ARGS,
                           "--output-dir", str(out)], monkeypatch)
    report = json.loads((out / SWEEP_FILES[0]).read_text())
    assert report["protocols"] == len(report["leaderboard"]) == 3 * 3 == len(result.entries)
    assert [row["rank"] for row in report["leaderboard"]] == list(range(1, 10))
    mious = [row["miou"] for row in report["leaderboard"]]
    assert mious == sorted(mious, reverse=True)
    assert len({str(row["confusion"]) for row in report["leaderboard"]}) > 1  # the protocols predict differently
    assert report["sweep"]["spec"] == "scales=1,0.75 flips=h,d4" and report["num_images"] == 2
    table = (out / SWEEP_FILES[1]).read_text()
    assert table.count("\n| ") == 9 + 1 and "windows/image" in table and "flip d4" in table
    assert "TTA sweep written to" in capsys.readouterr().out

    # Each protocol scored alone, as `evaluate.py --tta-scales S --tta-flip F` would: the same counts.
    model, normalize = load_exported(export_dir)
    task = SegmentationTask(model).eval()
    data = LoveDA(tiny_tree, "Val", scenes="urban")
    for row, entry in zip(report["leaderboard"], result.entries, strict=True):
        protocol = entry.protocol
        assert row["protocol"] == protocol.to_dict() and row["name"] == entry.name
        alone = run_evaluation(Predictor(task.predict, normalize=normalize, protocol=protocol, module=task), data,
                               protocol=protocol, device=CPU, rank=0, world_size=1, class_names=list(LOVEDA_CLASSES),
                               ignore_index=IGNORE_INDEX)
        assert row["confusion"] == alone.metrics.confusion, entry.name
        assert row["num_views"] == protocol.num_views
    # 128² images, 96/64 windows: 4 windows per view at scale 1, one at 0.75 (96²); 3 windows per forward.
    costs = {row["name"]: row["windows_per_image"] for row in report["leaderboard"]}
    assert costs["scales 0.75; flips none"] == 1 and costs["scales 1,0.75; flips d4"] == 8 * (4 + 1)
    assert report["sweep_windows_per_image"] == 8 * (4 + 1)
    assert report["separate_windows_per_image"] == sum(costs.values()) == (1 + 2 + 8) * (4 + 1 + 5)
    assert result.forwards == report["forwards_per_rank"][0] == 2 * 8 * (2 + 1)


@pytest.mark.parametrize(("extra", "message"), [
    (["--tta-sweep", "scales=1", "--tta-flip"], "cannot be combined with --tta-flip"),
    (["--tta-sweep", "flips=h,q"], "flips=h,q"),
])
def test_bad_sweeps_fail_before_any_work(extra, message, export_dir, monkeypatch):
    with pytest.raises(ConfigError, match=message):
        run_evaluate(["--model", str(export_dir), "--data-root", "nowhere", *extra], monkeypatch)
