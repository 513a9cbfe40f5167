"""Tests of the generated configuration reference, docs/config.md: current, complete, and linked correctly."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
from pathlib import Path

import pytest

from mapsage_ds.config import Config, _choices, from_dict, read_recipe, recipe_names, to_dict
from mapsage_ds.config_docs import (
    REGENERATE,
    anchor,
    attribute_docs,
    config_sections,
    flatten,
    main,
    missing_descriptions,
    render_config_reference,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "config.md"
# Keys issue 17 found undocumented, and the reliability keys added since.
NAMED_KEYS = ["train.keep_checkpoints", "data.hf_image_column", "data.hf_mask_column", "data.hf_mask_encoding",
              "optim.grad_clip", "optim.min_lr_ratio", "train.seed", "eval.max_images", "train.nonfinite",
              "train.max_skipped_share", "train.skip_window", "data.validate", "data.generate"]


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_config_reference()


def _rows(text: str) -> dict[str, str]:
    """Key table rows of the reference (before its recipes): dotted key -> its whole row."""
    keys_part = text.split("\n## Recipes\n", 1)[0]
    return {match.group(1): line for line in keys_part.splitlines() if (match := re.match(r"\| `([^`]+)` \| ", line))}


def test_docs_config_md_is_current(rendered):
    current = DOC.read_text() if DOC.is_file() else ""
    if current != rendered:
        diff = "".join(list(difflib.unified_diff(current.splitlines(True), rendered.splitlines(True),
                                                 "docs/config.md", "generated"))[:40])
        pytest.fail(f"docs/config.md is stale: run {REGENERATE}\n{diff}")


def test_every_key_has_a_description():
    missing = missing_descriptions()
    assert not missing, f"keys without a description: {missing}; add an 'Attributes:' entry to their dataclass"


def test_the_walk_reaches_every_key_of_a_config_with_every_section_on(rendered):
    # Every optional section switched on, so that to_dict holds its keys as leaves.
    full = from_dict(Config, {
        "data": {"synthetic": {}, "augment": {"color_jitter": {}}},
        "model": {"normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}},
        "loss": {"ohem": {}},
        "unfreeze": {"stages": [{"at_step": 10, "frozen_fraction": 0.5}]},
        "teacher": {"bootstrap": {}},
        "eval": {"ensemble": [{"path": "a"}], "refine": {"model": "sam"}},
    })

    def leaves(data: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in data.items():
            if isinstance(value, dict):
                keys |= leaves(value, f"{prefix}{key}.")
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                keys |= leaves(value[0], f"{prefix}{key}[].")
            else:
                keys.add(prefix + key)
        return keys

    walked = {key.key for section in config_sections() for key in section.keys}
    assert leaves(to_dict(full)) - walked == set()
    rows = _rows(rendered)
    assert walked <= set(rows)
    for key in NAMED_KEYS:
        assert key in walked and len(rows[key].rsplit("|", 2)[1].strip()) > 10, rows.get(key)


def test_rows_show_types_yaml_defaults_and_choices(rendered):
    rows = _rows(rendered)
    assert "| `train.keep_checkpoints` | `int` | `2` |" in rows["train.keep_checkpoints"]
    assert "never the one `latest` names or the best one" in rows["train.keep_checkpoints"]
    assert "| `loss.class_weights` | `list[float] \\| None` | `null` |" in rows["loss.class_weights"]
    assert "| `optim.betas` | `list[float]` | `[0.9, 0.999]` |" in rows["optim.betas"]
    assert "| `data.validate` | `bool` | `true` |" in rows["data.validate"]
    assert "| required |" in rows["model.normalization.mean"]
    assert "| [`data.augment`](#dataaugment) | [section](#dataaugment) |" in rows["data.augment"]
    assert "| [`loss.ohem`](#lossohem) \\| `None` | `null` |" in rows["loss.ohem"]
    assert "list of [`unfreeze.stages[]`](#unfreezestages)" in rows["unfreeze.stages"]
    for key, choices in _choices().items():
        assert all(f"`{choice}`" in rows[key].split(" | ")[3] for choice in choices), rows[key]
    assert "`slide`" in rows["eval.mode"].split(" | ")[3]


def test_every_internal_link_names_a_heading(rendered):
    headings = {anchor(line.lstrip("#").strip()) for line in rendered.splitlines() if line.startswith("#")}
    links = set(re.findall(r"\]\(#([^)]+)\)", rendered))
    assert links and links <= headings, links - headings


def test_every_recipe_is_listed_with_every_key_it_sets(rendered):
    for name in recipe_names():
        block = rendered.split(f"### Recipe `{name}`\n", 1)[1].split("\n### ", 1)[0]
        keys = re.findall(r"^\| `([^`]+)` \| ", block, flags=re.M)
        assert keys == list(flatten(read_recipe(name))), name
    demo = rendered.split("### Recipe `demo`\n", 1)[1].split("\n### ", 1)[0]
    assert "> Built-in default: a small SegFormer" in demo
    assert "| `data.synthetic.size` | `256` |" in demo


def test_attribute_docs_reads_google_style_entries():
    @dataclasses.dataclass
    class Section:
        """A section.

        Attributes:
            alpha (int): First line,
                continued here.
            beta: One line.

        Raises:
            gamma: not an attribute.
        """

        alpha: int = 1
        beta: str = "b"
        delta: float = 0.0

    assert attribute_docs(Section) == {"alpha": "First line, continued here.", "beta": "One line."}
    assert missing_descriptions(Section) == ["delta"]


def test_main_writes_and_checks(tmp_path, capsys, rendered):
    output = tmp_path / "config.md"
    output.write_text(rendered.replace("train.keep_checkpoints", "train.keep", 1))
    assert main(["--check", "--output", str(output)]) == 1
    assert f"is stale: run {REGENERATE}" in capsys.readouterr().err
    assert main(["--output", str(output)]) == 0
    assert output.read_text() == rendered
    assert main(["--check", "--output", str(output)]) == 0


def test_the_script_is_a_shim_over_main():
    spec = importlib.util.spec_from_file_location("generate_config_docs", REPO / "scripts" / "generate_config_docs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main is main
