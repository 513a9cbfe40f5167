"""Convert a checkpoint from any supported source into a plain Hugging Face directory.

    mapsage-convert mit_b5.pth weights/mit-b5                       # NVlabs or mmsegmentation MiT
    mapsage-convert segformer_mit-b5_ade.pth weights/segformer-b5   # mmseg segmentor / training checkpoint
    mapsage-convert dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth weights/dinov3-vitl16-sat493m
    mapsage-convert dinov3_vitl16_pretrain_xxx.pth out --normalization 0.485,0.456,0.406:0.229,0.224,0.225

The destination gets ``config.json`` (with the pretraining identity), ``model.safetensors``,
``preprocessor_config.json`` (the statistics of the pretraining data, and why) and, when
something was left out, ``mapsage_dropped.json``. See docs/weights.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapsage_ds.cli import as_console
from mapsage_ds.errors import ConfigError


def main(argv: list[str] | None = None) -> Path:
    """Parse ``argv``, convert SRC into DST and print what was converted and dropped; returns DST."""
    from mapsage_ds.models.convert.sources import check_destination, read_pretrained, write_hf_directory
    from mapsage_ds.models.normalization import decide_normalization

    parser = argparse.ArgumentParser(prog="mapsage-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF directory, .safetensors, or .pth/.pt/.bin (NVlabs, mmseg, Meta DINOv3)")
    parser.add_argument("dst", help="new directory to write (must not exist, or be empty)")
    parser.add_argument("--num-attention-heads", default=None,
                        help="MiT heads per stage, comma-separated (default: the checkpoint's config, else 1,2,5,8)")
    parser.add_argument("--normalization", default=None, metavar="MEAN:STD",
                        help="input statistics as r,g,b:r,g,b when the checkpoint does not say its pretraining data")
    args = parser.parse_args(argv)
    heads = _int_list(args.num_attention_heads, "--num-attention-heads") if args.num_attention_heads else None
    override = _statistics(args.normalization) if args.normalization else None
    check_destination(args.dst)  # before reading what may be a 7B checkpoint

    converted = read_pretrained(args.src, num_attention_heads=heads)
    decision = decide_normalization(arch=converted.arch, pretrained=args.src, override=override,
                                    checkpoint_pretraining=converted.pretraining)
    write_hf_directory(converted, args.dst, normalization=decision)
    print(f"{args.src} ({converted.source_format} layout, {converted.arch}) -> {args.dst}: "
          f"{len(converted.state_dict)} tensors")
    for key, why in converted.dropped.items():
        print(f"  dropped {key}: {why}")
    print(decision.describe())
    return Path(args.dst)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError as error:
        raise ConfigError(f"{flag}={text!r}: expected comma-separated integers, e.g. 1,2,5,8") from error


def _statistics(text: str) -> dict[str, list[float]]:
    try:
        mean, std = text.split(":")
        return {"mean": [float(v) for v in mean.split(",")], "std": [float(v) for v in std.split(",")]}
    except ValueError as error:
        raise ConfigError(f"--normalization={text!r}: expected MEAN:STD as r,g,b:r,g,b") from error


console = as_console(main)

if __name__ == "__main__":
    sys.exit(console())
