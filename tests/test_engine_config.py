"""Tests of DeepSpeed config resolution: reading, filling "auto", cross-checks against the run config."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from mapsage_ds.builders import build_ds_config
from mapsage_ds.config import load_config
from mapsage_ds.errors import ConfigError, MissingFileError
from mapsage_ds.runtime.engine import (
    compute_dtype,
    ds_config_names,
    fill_ds_config,
    fill_zero_comm,
    read_ds_config,
    zero_stage,
)

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"  # the source tree
PACKAGED = ds_config_names()
GEOMETRY = dict(micro_batch_size=2, grad_accum_steps=3, world_size=4, grad_clip=0.5)
# DeepSpeed's identity: train_batch_size = micro × accum × world = 2 × 3 × 4.
GLOBAL_BATCH = 24
AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def _explicit(**changes: object) -> dict:
    """A ZeRO-2 fp32 config whose explicit batch values agree with GEOMETRY, then ``changes``."""
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2},
    }
    config.update(changes)
    return config


def _problems(config: dict, **geometry: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        fill_ds_config(config, **{**GEOMETRY, **geometry})
    header, *lines = str(info.value).splitlines()
    assert header == "DeepSpeed config does not fit the run:"
    return [line.strip() for line in lines]


def test_the_packaged_configs_are_there() -> None:
    # One per ZeRO stage (0 = plain data parallelism) and precision, plus the offload variant the docs mention.
    assert {f"zero{s}_{p}" for s in (0, 1, 2, 3) for p in ("bf16", "fp16", "fp32")} <= set(PACKAGED)


@pytest.mark.parametrize("name", PACKAGED)
def test_every_packaged_config_reads_and_fills(name: str) -> None:
    path = DS_CONFIG_DIR / f"{name}.json"
    raw = read_ds_config(name)
    assert raw == json.loads(path.read_text())
    assert read_ds_config(str(path)) == raw  # by path too
    untouched = copy.deepcopy(raw)

    filled = fill_ds_config(raw, **GEOMETRY)

    assert raw == untouched  # the input is not modified
    expected = {"train_batch_size": GLOBAL_BATCH, "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 3, "gradient_clipping": 0.5}
    for key in AUTO_KEYS:
        assert raw.get(key, "auto") in ("auto", expected[key]), key
        assert filled[key] == expected[key], key
    assert "auto" not in json.dumps(filled)
    # Everything else passes through unchanged.
    rest = {k: v for k, v in raw.items() if k not in AUTO_KEYS}
    assert {k: v for k, v in filled.items() if k not in AUTO_KEYS} == rest
    assert "scheduler" not in filled and "optimizer" not in filled

    # Stage and dtype as the file name says (zero<stage>[_offload]_<precision>).
    stage, precision = re.fullmatch(r"zero(\d)(?:_offload)?_(bf16|fp16|fp32)", name).groups()
    assert zero_stage(filled) == int(stage)
    assert compute_dtype(filled) == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


@pytest.mark.parametrize(("micro", "accum", "world"), [(1, 1, 1), (2, 1, 2), (3, 4, 5), (8, 2, 1)])
def test_auto_batch_is_micro_times_accum_times_world(micro: int, accum: int, world: int) -> None:
    filled = fill_ds_config(read_ds_config("zero2_fp32"), micro_batch_size=micro, grad_accum_steps=accum,
                            world_size=world, grad_clip=1.0)
    assert filled["train_batch_size"] == micro * accum * world
    assert filled["train_micro_batch_size_per_gpu"] == micro
    assert filled["gradient_accumulation_steps"] == accum
    assert filled["gradient_clipping"] == 1.0


def test_absent_batch_keys_are_filled_like_auto() -> None:
    filled = fill_ds_config({"zero_optimization": {"stage": 1}}, **GEOMETRY)
    assert filled["train_batch_size"] == GLOBAL_BATCH and filled["gradient_clipping"] == 0.5


def test_explicit_agreeing_values_pass_unchanged() -> None:
    config = _explicit()
    assert fill_ds_config(config, **GEOMETRY) == config
    # An int clip agrees with the same float clip.
    assert fill_ds_config(_explicit(gradient_clipping=1), **{**GEOMETRY, "grad_clip": 1.0})["gradient_clipping"] == 1


def test_every_disagreement_is_listed_in_one_error() -> None:
    config = _explicit(train_batch_size=16, gradient_accumulation_steps=2,
                       scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})
    problems = _problems(config)
    assert len(problems) == 3, problems
    assert any(p.startswith("'scheduler'") and "schedule" in p for p in problems)
    assert any(p.startswith(f"'train_batch_size' is 16 but the run config gives {GLOBAL_BATCH}") for p in problems)
    assert any(p.startswith("'gradient_accumulation_steps' is 2 but the run config gives 3") for p in problems)
    # The agreeing keys are not reported.
    assert not any("train_micro_batch_size_per_gpu" in p.split(" is ")[0] for p in problems)
    assert not any(p.startswith("'gradient_clipping'") for p in problems)


def test_all_kinds_of_problem_at_once() -> None:
    config = _explicit(
        train_micro_batch_size_per_gpu=4,
        gradient_clipping=1.0,
        optimizer={"type": "AdamW"},
        scheduler={"type": "WarmupLR"},
        bf16={"enabled": True},
        fp16={"enabled": True},
        zero_optimization={"stage": 4},
    )
    problems = _problems(config)
    starts = ["'scheduler'", "'optimizer'", "'train_micro_batch_size_per_gpu' is 4", "'gradient_clipping' is 1.0",
              "'bf16' and 'fp16' are both enabled", "'zero_optimization.stage' is 4"]
    for start in starts:
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert len(problems) == len(starts)


@pytest.mark.parametrize("config", [{}, {"zero_optimization": {"stage": 0}}])
def test_stage_0_is_accepted_also_without_a_zero_section(config: dict) -> None:
    # DeepSpeed reads a missing section as stage 0: plain data parallelism.
    filled = fill_ds_config(config, **GEOMETRY)
    assert zero_stage(filled) == 0 and filled["train_batch_size"] == GLOBAL_BATCH


@pytest.mark.parametrize("stage", [4, -1, "2"])
def test_an_unknown_stage_is_rejected(stage: object) -> None:
    problems = _problems(_explicit(zero_optimization={"stage": stage}))
    assert problems == [f"'zero_optimization.stage' is {stage!r}: expected one of 0, 1, 2, 3"]


COMM_KEYS = ("overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size")


def test_packaged_configs_leave_the_communication_settings_to_the_accelerator() -> None:
    for name in PACKAGED:
        zero = read_ds_config(name)["zero_optimization"]
        # ZeRO-3 keeps its own smaller reduce bucket (an explicit value, so it wins everywhere).
        allowed = {"reduce_bucket_size"} if zero["stage"] == 3 else set()
        assert set(COMM_KEYS) & set(zero) == allowed, name


@pytest.mark.parametrize(("accelerator", "on"), [("cpu", False), ("cuda", True), ("gcu", True)])
def test_communication_defaults_are_on_for_cards_and_off_for_cpu(accelerator: str, on: bool) -> None:
    raw = read_ds_config("zero2_bf16")
    zero = fill_zero_comm(raw, accelerator=accelerator)["zero_optimization"]
    assert "overlap_comm" not in raw["zero_optimization"]  # the input is not modified
    assert zero["stage"] == 2
    assert zero["overlap_comm"] is on and zero["contiguous_gradients"] is on
    # Cards: 2e8-element buckets (overlap keeps two alive); the CPU keeps DeepSpeed's 5e8.
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == (200_000_000 if on else 500_000_000)


def test_an_explicit_communication_value_wins_over_the_accelerator_default(tmp_path: Path) -> None:
    user = {"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 12345}}
    on_card = fill_zero_comm(user, accelerator="cuda")["zero_optimization"]
    assert on_card["overlap_comm"] is False and on_card["reduce_bucket_size"] == 12345
    assert on_card["contiguous_gradients"] is True and on_card["allgather_bucket_size"] == 200_000_000
    on_cpu = fill_zero_comm({"zero_optimization": {"stage": 1, "contiguous_gradients": True}}, accelerator="cpu")
    assert on_cpu["zero_optimization"]["contiguous_gradients"] is True
    assert on_cpu["zero_optimization"]["overlap_comm"] is False
    assert fill_zero_comm(read_ds_config("zero3_fp32"), accelerator="gcu")["zero_optimization"][
        "reduce_bucket_size"] == 50_000_000
    # The run's builder takes the accelerator in use, and a user's JSON file keeps its own values.
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(user))
    for deepspeed, overlap in (("zero0_bf16", True), (str(path), False)):
        config = load_config(overrides=["data.root=/x", f"train.deepspeed={deepspeed}"])
        filled = build_ds_config(config.train, config.optim, world_size=2, accelerator="gcu")
        assert filled["zero_optimization"]["overlap_comm"] is overlap
        assert filled["train_batch_size"] == 2 * config.train.micro_batch_size * config.train.grad_accum_steps


def test_world_size_enters_the_check() -> None:
    # 24 agrees with world 4 but not with world 2 (2 × 3 × 2 = 12).
    problems = _problems(_explicit(), world_size=2)
    assert len(problems) == 1 and problems[0].startswith("'train_batch_size' is 24 but the run config gives 12")
    assert "world_size=2" in problems[0]


def test_unknown_name_lists_the_known_configs() -> None:
    with pytest.raises(MissingFileError) as info:
        read_ds_config("zero4_fp8")
    message = str(info.value)
    assert "zero4_fp8" in message
    for name in PACKAGED:
        assert name in message


def test_user_json_file_by_path(tmp_path: Path) -> None:
    user = {"train_batch_size": "auto", "zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(user))
    config = read_ds_config(str(path))
    assert config == user
    filled = fill_ds_config(config, **GEOMETRY)
    assert filled["train_batch_size"] == GLOBAL_BATCH
    assert (zero_stage(filled), compute_dtype(filled)) == (3, torch.float16)


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"train_batch_size": "auto",}')
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        read_ds_config(str(path))


def test_missing_user_path_is_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="known: "):
        read_ds_config(str(tmp_path / "absent.json"))


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ({}, torch.float32),
        ({"bf16": {"enabled": True}}, torch.bfloat16),
        ({"fp16": {"enabled": True}}, torch.float16),
        ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, torch.float32),
        ({"bf16": {"enabled": False}, "fp16": {"enabled": True}}, torch.float16),
    ],
)
def test_compute_dtype(config: dict, dtype: torch.dtype) -> None:
    assert compute_dtype(config) == dtype


@pytest.mark.parametrize(("config", "stage"), [({}, 0), ({"zero_optimization": {}}, 0),
                                                ({"zero_optimization": {"stage": 3}}, 3)])
def test_zero_stage(config: dict, stage: int) -> None:
    assert zero_stage(config) == stage
