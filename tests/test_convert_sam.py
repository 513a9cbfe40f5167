"""Meta SAM checkpoints -> transformers SamModel, checked against Meta's own ``segment_anything`` package.

A tiny SAM is built from segment_anything's modeling classes (the structure of ``build_sam``, at 64 px with a
window that does not divide the patch grid), given random weights everywhere (LayerNorms, relative-position
tables and embeddings included), saved as a real ``.pth`` and loaded with ``load_sam``. Meta's ``SamPredictor``
and transformers' ``SamModel`` + ``SamProcessor`` must then agree on image embeddings, mask logits, binary masks
and IoU predictions for point, box, mask and batched region prompts.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

segment_anything = pytest.importorskip("segment_anything")
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.build_sam import sam_model_registry  # noqa: E402
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402
from transformers import SamImageProcessor, SamModel, SamProcessor  # noqa: E402

from mapsage_ds.errors import ConfigError, DataError, MissingFileError  # noqa: E402
from mapsage_ds.models.convert.sam import convert_meta_sam, is_meta_sam, load_sam, sam_processor  # noqa: E402

IMAGE = 64
PATCH = 8
GRID = IMAGE // PATCH
ATOL = 1e-4


def _tiny_meta_sam(seed: int = 0, *, use_rel_pos: bool = True, depth: int = 4, window: int = 3,
                   global_attn: tuple[int, ...] = (1, 3)) -> Sam:
    """build_sam's structure at toy size: 4 heads of 8, a 3x3 window on the 8x8 grid (padded), 8 decoder heads."""
    torch.manual_seed(seed)
    prompt_dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=depth, num_heads=4, mlp_ratio=2.0,
            out_chans=prompt_dim, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=use_rel_pos, window_size=window, global_attn_indexes=global_attn,
        ),
        prompt_encoder=PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(GRID, GRID),
                                     input_image_size=(IMAGE, IMAGE), mask_in_chans=8),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=48, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=4, iou_head_hidden_dim=24,
        ),
    ).eval()
    with torch.no_grad():
        for name, param in sam.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):  # every 1-D weight is a (2-D) LayerNorm's
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
            elif "patch_embed" not in name and ("pos" in name or "embed" in name or "token" in name):
                # pos_embed, rel_pos_h/w, point/no-mask embeddings, IoU and mask tokens
                param.normal_(0.0, 0.5)
            else:
                fan_in = math.prod(param.shape[1:]) if "output_upscaling" not in name else param.shape[0]
                param.normal_(0.0, 1.0 / math.sqrt(fan_in))
        # Confident masks, so that binary masks compare something other than noise around zero.
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(4.0)
    return sam


@pytest.fixture(scope="module")
def meta_sam() -> Sam:
    return _tiny_meta_sam()


@pytest.fixture(scope="module")
def checkpoint(meta_sam, tmp_path_factory):
    path = tmp_path_factory.mktemp("meta-sam") / "sam_vit_tiny.pth"
    torch.save(meta_sam.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hf_sam(checkpoint) -> SamModel:
    return load_sam(checkpoint)


@pytest.fixture(scope="module")
def processor(hf_sam) -> SamProcessor:
    return sam_processor(hf_sam.config.vision_config.image_size)


@pytest.fixture(scope="module")
def scene():
    """A 48x64 uint8 image: both sides pad it to 64x64 and crop the masks back."""
    return np.random.default_rng(5).integers(0, 256, (48, IMAGE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pixel_values(meta_sam, scene):
    """Meta's normalised, padded input, fed to both models so that only the models are compared."""
    return meta_sam.preprocess(torch.as_tensor(scene).permute(2, 0, 1).float())[None]


@pytest.fixture(scope="module")
def predictor(meta_sam, scene):
    predictor = SamPredictor(meta_sam)
    predictor.set_image(scene)
    return predictor


def _hf_predict(hf_sam, processor, scene, pixel_values, *, multimask, points=None, labels=None, boxes=None,
                masks=None):
    """SamModel's low-res logits, full-size logits and IoUs, with SamProcessor placing prompts and resizing masks."""
    inputs = processor(images=scene, input_points=points, input_labels=labels, input_boxes=boxes,
                       return_tensors="pt")
    with torch.no_grad():
        out = hf_sam(pixel_values=pixel_values, input_points=inputs.get("input_points"),
                     input_labels=inputs.get("input_labels"), input_boxes=inputs.get("input_boxes"),
                     input_masks=masks, multimask_output=multimask)
    (full,) = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                           binarize=False)
    return out.pred_masks[0], full, out.iou_scores[0]


def _assert_same(meta, hf):
    """Meta's predictor output (full-size logits, IoU, low-res logits) vs ``_hf_predict`` (low-res, full-size, IoU)."""
    meta_full, meta_iou, meta_low = (torch.as_tensor(np.asarray(x)) for x in meta)
    hf_low, hf_full, hf_iou = (x.reshape(meta_x.shape) for x, meta_x in zip(hf, (meta_low, meta_full, meta_iou)))
    assert (meta_full.abs() > 0.02).float().mean() > 0.9, "most pixels should be clearly inside or outside"
    torch.testing.assert_close(hf_low, meta_low, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_full, meta_full, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_iou, meta_iou, atol=ATOL, rtol=0)
    assert torch.equal(hf_full > 0, meta_full > 0)
    assert 0 < int((meta_full > 0).sum()) < meta_full.numel(), "binary masks should be neither empty nor full"


def test_config_is_read_from_the_tensors(meta_sam):
    converted = convert_meta_sam(meta_sam.state_dict(), source="tiny.pth")
    vision, prompt, decoder = (converted.config.vision_config, converted.config.prompt_encoder_config,
                               converted.config.mask_decoder_config)
    assert converted.arch == "sam" and converted.source_format == "meta-sam"
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.mlp_dim) == (32, 4, 4, 64)
    assert (vision.image_size, vision.patch_size, vision.window_size) == (IMAGE, PATCH, 3)
    assert list(vision.global_attn_indexes) == [1, 3]
    assert (vision.output_channels, vision.num_pos_feats) == (32, 16)
    assert (prompt.hidden_size, prompt.image_size, prompt.image_embedding_size, prompt.mask_input_channels) == (
        32, IMAGE, GRID, 8)
    assert (decoder.hidden_size, decoder.num_hidden_layers, decoder.mlp_dim, decoder.num_attention_heads) == (
        32, 2, 48, 8)
    assert (decoder.attention_downsample_rate, decoder.iou_head_depth, decoder.iou_head_hidden_dim) == (2, 4, 24)
    assert decoder.layer_norm_eps == 1e-5, "Meta's two-way transformer uses nn.LayerNorm's default epsilon"
    assert converted.dropped == {}


def test_keys_are_sammodel_on_disk_names(meta_sam, hf_sam, tmp_path):
    converted = convert_meta_sam(meta_sam.state_dict())
    hf_sam.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(converted.state_dict)
    for key, value in converted.state_dict.items():
        assert torch.equal(saved[key], value), key
    # The saved directory loads back through the same function.
    again = load_sam(tmp_path)
    assert isinstance(again, SamModel) and not again.training
    for (name, a), b in zip(hf_sam.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_image_embeddings_match_meta(hf_sam, processor, scene, pixel_values, predictor):
    assert not hf_sam.training
    # sam_processor (1/255, ImageNet mean/std, pad right/bottom) is Meta's preprocessing; at 1024 px, HF's defaults.
    assert sam_processor(1024).image_processor.to_dict() == SamImageProcessor().to_dict()
    torch.testing.assert_close(processor(images=scene, return_tensors="pt")["pixel_values"], pixel_values,
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        embeddings = hf_sam.get_image_embeddings(pixel_values)
    torch.testing.assert_close(embeddings, predictor.features, atol=ATOL, rtol=0)
    assert predictor.features.std() > 0.1


@pytest.mark.parametrize("multimask", [True, False])
def test_point_prompt_matches_meta(hf_sam, processor, scene, pixel_values, predictor, multimask):
    meta = predictor.predict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]),
                             multimask_output=multimask, return_logits=True)
    hf = _hf_predict(hf_sam, processor, scene, pixel_values, multimask=multimask, points=[[[[20.0, 30.0]]]],
                     labels=[[[1]]])
    _assert_same(meta, hf)


def test_box_prompt_matches_meta(hf_sam, processor, scene, pixel_values, predictor):
    meta = predictor.predict(box=np.array([8.0, 5.0, 40.0, 33.0]), multimask_output=False, return_logits=True)
    hf = _hf_predict(hf_sam, processor, scene, pixel_values, multimask=False, boxes=[[[8.0, 5.0, 40.0, 33.0]]])
    _assert_same(meta, hf)


def test_points_box_and_mask_prompt_matches_meta(hf_sam, processor, scene, pixel_values, predictor):
    rng = np.random.default_rng(7)
    low_res = rng.normal(0.0, 3.0, (1, 4 * GRID, 4 * GRID)).astype(np.float32)
    points, labels, box = np.array([[12.0, 10.0], [50.0, 40.0]]), np.array([1, 0]), np.array([4.0, 2.0, 44.0, 30.0])
    meta = predictor.predict(point_coords=points, point_labels=labels, box=box, mask_input=low_res,
                             multimask_output=True, return_logits=True)
    hf = _hf_predict(hf_sam, processor, scene, pixel_values, multimask=True, points=[[points.tolist()]],
                     labels=[[labels.tolist()]], boxes=[[box.tolist()]], masks=torch.as_tensor(low_res)[None])
    _assert_same(meta, hf)


def test_batched_region_prompts_match_meta(hf_sam, processor, scene, pixel_values, predictor):
    """The refinement's call: R regions, each with its box and one positive point."""
    boxes = [[2.0, 3.0, 20.0, 25.0], [30.0, 10.0, 60.0, 44.0], [10.0, 30.0, 35.0, 47.0]]
    points = [[11.0, 14.0], [45.0, 27.0], [22.0, 38.0]]
    with torch.no_grad():
        meta = predictor.predict_torch(torch.tensor(points)[:, None], torch.ones(3, 1), torch.tensor(boxes),
                                       multimask_output=False, return_logits=True)
    hf = _hf_predict(hf_sam, processor, scene, pixel_values, multimask=False, points=[[[p] for p in points]],
                     labels=[[[1] for _ in points]], boxes=[boxes])
    _assert_same(meta, hf)


def test_modules_agree_to_float64_precision(meta_sam, hf_sam):
    """In float64 the two implementations agree to rounding, so the float32 tolerances above hide no mapping error."""
    meta = _tiny_meta_sam().double()
    hf = SamModel.from_pretrained(None, config=hf_sam.config, state_dict=hf_sam.state_dict()).double().eval()
    meta.prompt_encoder.float()  # Meta's positional encoding casts coordinates to float32
    pixels = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64)
    points, labels = torch.tensor([[[20.0, 30.0], [3.0, 50.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        embeddings = meta.image_encoder(pixels)
        torch.testing.assert_close(hf.get_image_embeddings(pixels), embeddings, atol=1e-10, rtol=0)
        sparse, dense = meta.prompt_encoder(points=(points, labels), boxes=torch.tensor([[4.0, 2.0, 44.0, 30.0]]),
                                            masks=torch.randn(1, 1, 4 * GRID, 4 * GRID))
        position = meta.prompt_encoder.get_dense_pe().double()
        sparse, dense = sparse.double(), dense.double()
        masks, iou = meta.mask_decoder(embeddings[:1], position, sparse, dense, multimask_output=True)
        hf_masks, hf_iou = hf.mask_decoder(embeddings[:1], position, sparse[None], dense, multimask_output=True)[:2]
    torch.testing.assert_close(hf_masks[0], masks, atol=1e-9, rtol=0)
    torch.testing.assert_close(hf_iou[0], iou, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name, heads, global_attn", [
    ("vit_b", 12, [2, 5, 8, 11]), ("vit_l", 16, [5, 11, 17, 23]), ("vit_h", 16, [7, 15, 23, 31])])
def test_published_sizes(name, heads, global_attn):
    """Meta's real architectures, built on the meta device (no memory): the config is the published one."""
    with torch.device("meta"):
        state = sam_model_registry[name]().state_dict()
    converted = convert_meta_sam(state, source=f"sam_{name}.pth")
    vision, decoder = converted.config.vision_config, converted.config.mask_decoder_config
    assert vision.num_attention_heads == heads and list(vision.global_attn_indexes) == global_attn
    assert (vision.window_size, vision.image_size, vision.patch_size, vision.output_channels) == (14, 1024, 16, 256)
    assert vision.mlp_dim == 4 * vision.hidden_size and vision.num_pos_feats == 128
    assert (decoder.hidden_size, decoder.num_attention_heads, decoder.mlp_dim, decoder.iou_head_depth) == (
        256, 8, 2048, 3)
    assert converted.config.prompt_encoder_config.mask_input_channels == 16
    assert len(converted.state_dict) == len(state)


def test_without_relative_positions_keywords_supply_the_layout(tmp_path):
    meta = _tiny_meta_sam(1, use_rel_pos=False, depth=3, window=3, global_attn=(2,))
    state = meta.state_dict()
    with pytest.raises(ConfigError, match="num_attention_heads"):
        convert_meta_sam(state, source="norel.pth")
    with pytest.raises(ConfigError, match="global_attn_indexes"):
        convert_meta_sam(state, source="norel.pth", num_attention_heads=4)
    converted = convert_meta_sam(state, num_attention_heads=4, global_attn_indexes=[2], window_size=3)
    hf = SamModel.from_pretrained(None, config=converted.config, state_dict=converted.state_dict).eval()
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_embeddings(pixels), meta.image_encoder(pixels), atol=ATOL, rtol=0)
    # A wrong window is a real difference, not a tolerance question.
    wrong = convert_meta_sam(state, num_attention_heads=4, global_attn_indexes=[2], window_size=4)
    hf = SamModel.from_pretrained(None, config=wrong.config, state_dict=wrong.state_dict).eval()
    with torch.no_grad():
        assert (hf.get_image_embeddings(pixels) - meta.image_encoder(pixels)).abs().max() > 1e-2


def test_keywords_that_contradict_the_tensors_are_errors(meta_sam):
    state = meta_sam.state_dict()
    with pytest.raises(ConfigError, match="num_attention_heads=8.*4 heads"):
        convert_meta_sam(state, source="tiny.pth", num_attention_heads=8)
    with pytest.raises(ConfigError, match=r"global_attn_indexes=\[0, 3\].*\[1, 3\]"):
        convert_meta_sam(state, source="tiny.pth", global_attn_indexes=[0, 3])
    with pytest.raises(ConfigError, match="window_size=4"):
        convert_meta_sam(state, source="tiny.pth", window_size=4)
    with pytest.raises(ConfigError, match="decoder_num_attention_heads=3"):
        convert_meta_sam(state, source="tiny.pth", decoder_num_attention_heads=3)


def test_normalisation_buffers_are_dropped_and_unknown_tensors_refused(meta_sam):
    state = dict(meta_sam.state_dict())
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    converted = convert_meta_sam(state)
    assert set(converted.dropped) == {"pixel_mean", "pixel_std"} and "SamProcessor" in converted.dropped["pixel_mean"]
    state["mask_decoder.hf_token.weight"] = torch.zeros(1, 32)  # SAM-HQ's extra token
    with pytest.raises(DataError, match=r"hq\.pth.*mask_decoder\.hf_token\.weight"):
        convert_meta_sam(state, source="hq.pth")
    del state["mask_decoder.hf_token.weight"], state["image_encoder.blocks.2.mlp.lin2.bias"]
    with pytest.raises(DataError, match=r"cut\.pth.*missing.*vision_encoder\.layers\.2\.mlp\.lin2\.bias"):
        convert_meta_sam(state, source="cut.pth")


def test_nested_state_and_safetensors_load(meta_sam, hf_sam, tmp_path):
    nested = tmp_path / "finetune.pt"
    torch.save({"model": meta_sam.state_dict(), "epoch": 3}, nested)
    flat = tmp_path / "sam.safetensors"
    save_file({k: v.contiguous() for k, v in meta_sam.state_dict().items()}, str(flat))
    expected = hf_sam.state_dict()
    for path in (nested, flat):
        model = load_sam(path)
        for key, value in model.state_dict().items():
            assert torch.equal(value, expected[key]), (path, key)


def test_files_that_are_not_sam_are_refused_by_name(tmp_path):
    other = tmp_path / "segformer_b0.pth"
    torch.save({"patch_embed1.proj.weight": torch.zeros(32, 3, 7, 7), "head.weight": torch.zeros(10, 32)}, other)
    assert not is_meta_sam(torch.load(other, weights_only=True))
    with pytest.raises(DataError, match=r"segformer_b0\.pth.*not a Meta SAM"):
        load_sam(other)
    sam2 = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7),
                          "sam_mask_decoder.iou_token.weight": torch.zeros(1, 256)}}, sam2)
    with pytest.raises(DataError, match=r"sam2\.1_hiera_tiny\.pt.*SAM 2"):
        load_sam(sam2)
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DataError, match=r"broken\.pth"):
        load_sam(garbage)
    with pytest.raises(DataError, match=r"weights\.npz"):
        (tmp_path / "weights.npz").write_bytes(b"")
        load_sam(tmp_path / "weights.npz")
    with pytest.raises(MissingFileError, match=r"absent\.pth"):
        load_sam(tmp_path / "absent.pth")
    not_sam = tmp_path / "segformer-dir"
    not_sam.mkdir()
    (not_sam / "config.json").write_text('{"model_type": "segformer"}')
    (not_sam / "model.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match=r"segformer-dir.*model_type='segformer'"):
        load_sam(not_sam)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(MissingFileError, match=r"empty-dir.*config\.json"):
        load_sam(empty)
