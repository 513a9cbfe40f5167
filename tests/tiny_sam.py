"""A tiny random SAM saved like a hub checkpoint, for refinement tests (never downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor
from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig


def save_tiny_sam(path: Path, seed: int = 0) -> Path:
    """Write a random SAM (64 px input, ~20 k parameters) and its processor to ``path``."""
    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1],
                                      num_pos_feats=8, mlp_dim=32).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                                     mask_input_channels=4).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, mlp_dim=32, num_hidden_layers=2,
                                                 num_attention_heads=2, iou_head_hidden_dim=16).to_dict(),
    )
    model = SamModel(config).eval()
    with torch.no_grad():
        # HF's init makes a random SAM answer ~0.5 everywhere; wider weights give confident (random) masks.
        for param in model.parameters():
            param.normal_(0.0, 0.3)
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(100.0)
    model.save_pretrained(path)
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    processor.save_pretrained(path)
    return path
