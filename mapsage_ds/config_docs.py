"""The configuration reference, ``docs/config.md``, generated from the config dataclasses and the recipes.

Every key of :class:`~mapsage_ds.config.Config` is found by walking its type hints; a key's
meaning is the entry for its field in the owning dataclass's Google-style ``Attributes:``
docstring section (the one home of a field's description), its allowed values come from
:func:`mapsage_ds.config._choices` and the evaluation protocol's own constants. The recipes are
read with :func:`~mapsage_ds.config.read_recipe`.

    python scripts/generate_config_docs.py          # rewrite docs/config.md
    python scripts/generate_config_docs.py --check  # exit 1 when docs/config.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mapsage_ds.cli import as_console
from mapsage_ds.config import Config, _choices, read_recipe, recipe_names
from mapsage_ds.evaluation.protocol import FLIPS, MODES, REFINE_METHODS

# A checkout's docs/ folder (the generator is a development tool: an installed wheel has no docs/).
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "python scripts/generate_config_docs.py"



def _protocol_choices() -> dict[str, tuple[str, ...]]:
    """Choice keys of the ``eval`` section, which :class:`EvalProtocol` checks itself (not ``validate``)."""
    return {"eval.mode": MODES, "eval.tta_flip": tuple(FLIPS), "eval.refine.method": REFINE_METHODS}


@dataclass(frozen=True)
class KeyDoc:
    """One config key as the reference shows it.

    Attributes:
        key: Dotted key; items of a list of sections are spelled ``unfreeze.stages[].at_step``.
        annotation: The field's type hint.
        default: The default value, :data:`dataclasses.MISSING` when the field is required.
        choices: Allowed values of a choice key, else empty.
        help: The field's description (empty when it has none).
        section: Dotted name of the section the key opens, when its type holds a dataclass.
    """

    key: str
    annotation: Any
    default: Any
    choices: tuple[str, ...]
    help: str
    section: str | None


@dataclass(frozen=True)
class SectionDoc:
    """A config section: ``""`` for the top level, ``data.augment``, ``unfreeze.stages[]``, ...

    Attributes:
        name: Dotted name of the section (empty for the top level).
        cls: The dataclass of the section.
        keys: The section's keys, in declaration order.
    """

    name: str
    cls: type
    keys: list[KeyDoc]


# ----------------------------------------------------------------------------------------------
# Walking the dataclasses


def attribute_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` section of ``cls``'s docstring, each joined into one line.

    Args:
        cls: A dataclass with a Google-style docstring.

    Returns:
        ``{field name: description}`` for the fields the section describes.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    docs: dict[str, list[str]] = {}
    current: list[str] | None = None
    inside, entry_indent = False, None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if not inside:
            inside = line.strip() == "Attributes:"
            continue
        if not line.strip():
            continue
        if indent == 0:  # the next section (Raises:, ...)
            break
        entry_indent = indent if entry_indent is None else entry_indent
        match = re.match(r"(\w+)(?: \([^)]*\))?:\s*(.*)", line.strip())
        if indent == entry_indent and match:
            current = docs.setdefault(match.group(1), [])
            current.append(match.group(2))
        elif current is not None:
            current.append(line.strip())
    return {name: " ".join(part for part in parts if part) for name, parts in docs.items()}


def field_descriptions(cls: type) -> dict[str, str]:
    """Descriptions of ``cls``'s fields, from the "Attributes:" section of its docstring."""
    return attribute_docs(cls)


def _dataclass_in(annotation: Any) -> type | None:
    """The dataclass a field's type holds (``X``, ``X | None``, ``list[X]``), if any."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in typing.get_args(annotation):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return dataclasses.MISSING


def config_sections(root: type = Config) -> list[SectionDoc]:
    """Every section of the config, depth first in declaration order, starting with the top level.

    Args:
        root: The dataclass to walk (the run config).

    Returns:
        The sections, each with its keys.
    """
    choices = {**_choices(), **_protocol_choices()}
    sections: list[SectionDoc] = []

    def walk(cls: type, name: str) -> None:
        hints = typing.get_type_hints(cls)
        helps = field_descriptions(cls)
        prefix = f"{name}." if name else ""
        keys, nested = [], []
        for spec in dataclasses.fields(cls):
            annotation = hints[spec.name]
            inner = _dataclass_in(annotation)
            section = None
            if inner is not None:
                is_list = typing.get_origin(annotation) is list
                section = f"{prefix}{spec.name}{'[]' if is_list else ''}"
                nested.append((inner, section))
            keys.append(KeyDoc(key=prefix + spec.name, annotation=annotation, default=_default(spec),
                               choices=tuple(choices.get(prefix + spec.name, ())), help=helps.get(spec.name, ""),
                               section=section))
        sections.append(SectionDoc(name=name, cls=cls, keys=keys))
        for inner, section in nested:
            walk(inner, section)

    walk(root, "")
    return sections


def missing_descriptions(root: type = Config) -> list[str]:
    """Dotted keys whose field has no description (the reference must describe every key)."""
    return [key.key for section in config_sections(root) for key in section.keys if not key.help.strip()]


# ----------------------------------------------------------------------------------------------
# Recipes


def recipe_description(name: str) -> list[str]:
    """The leading ``#`` comment lines of a packaged recipe, without the ``#``."""
    text = (resources.files("mapsage_ds") / "recipes" / f"{name}.yaml").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------------------------
# Markdown


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _section_heading(name: str) -> str:
    return f"`{name}`" if name else "Top level"


def _section_link(name: str) -> str:
    return f"[`{name}`](#{anchor(_section_heading(name))})"


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _prose(text: str) -> str:
    """Docstring text as a markdown table cell: reST roles and ``literals`` as code, ``<`` and ``|`` escaped."""
    text = re.sub(r":[\w:]+:`~?([^`]+)`", r"``\1``", text).replace("``", "`")
    parts = text.split("`")
    # Even parts are prose, odd ones code spans: only prose needs "<" escaped (it would open an HTML tag).
    parts = [part if i % 2 else part.replace("<", "&lt;").replace("*", "\\*") for i, part in enumerate(parts)]
    return "`".join(parts).replace("|", "\\|")


def yaml_text(value: Any) -> str:
    """A value as YAML writes it in a flow (one-line) document: ``null``, ``[0.9, 0.999]``, ``6.0e-05``."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=sys.maxsize, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _type_text(annotation: Any) -> str:
    """A type hint as written: ``int``, ``list[float] | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list[{_type_text(typing.get_args(annotation)[0])}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _type_cell(key: KeyDoc) -> str:
    if key.section is None:
        return _code(_type_text(key.annotation))

    # The section's dotted name stands for its dataclass, linked to its table.
    def part(annotation: Any) -> str:
        if dataclasses.is_dataclass(annotation):
            return _section_link(key.section)
        if typing.get_origin(annotation) is list:
            return "list of " + part(typing.get_args(annotation)[0])
        return _code(_type_text(annotation))

    union = typing.get_origin(key.annotation) in (typing.Union, types.UnionType)
    return " \\| ".join(part(option) for option in (typing.get_args(key.annotation) if union else [key.annotation]))


def _default_cell(key: KeyDoc) -> str:
    if key.default is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(key.default):
        return f"[section](#{anchor(_section_heading(key.section))})"
    return _code(yaml_text(key.default))


def _section_markdown(section: SectionDoc) -> list[str]:
    summary = inspect.cleandoc(section.cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"### {_section_heading(section.name)}", "", _prose(summary), "",
             "| key | type | default | allowed values | meaning |", "|---|---|---|---|---|"]
    for key in section.keys:
        choices = ", ".join(_code(choice) for choice in key.choices)
        lines.append(f"| {_code(key.key)} | {_type_cell(key)} | {_default_cell(key)} | {choices} | "
                     f"{_prose(key.help[:1].upper() + key.help[1:])} |")
    return [*lines, ""]


def _recipe_markdown(name: str) -> list[str]:
    lines = [f"### Recipe `{name}`", ""]
    description = recipe_description(name)
    if description:
        lines += [f"> {_prose(line)}" if line else ">" for line in description] + [""]
    lines += ["| key | value |", "|---|---|"]
    lines += [f"| {_code(key)} | {_code(yaml_text(value))} |" for key, value in flatten(read_recipe(name)).items()]
    return [*lines, ""]


def _default_recipes() -> dict[str, str]:
    """Command -> the recipe it starts from when given neither ``--recipe`` nor ``--config``."""
    # Imported here: the commands import the training stack, which only the generator needs.
    from mapsage_ds.cli import distill, finetune, health

    return {"scripts/finetune.py": finetune.DEFAULT_RECIPE, "scripts/health_check.py": health.DEFAULT_RECIPE,
            "scripts/distill.py": distill.DEFAULT_RECIPE}


def _introduction() -> list[str]:
    default_rows = [f"| `{command}` | `{recipe}` |" for command, recipe in _default_recipes().items()]
    return [
        "# Configuration reference",
        "",
        f"<!-- Generated from mapsage_ds/config.py and mapsage_ds/recipes/ by {REGENERATE}; do not edit. -->",
        "",
        "A run is one typed config: the dataclass `Config` in `mapsage_ds/config.py` and its nested sections,",
        "every key of which is listed [below](#keys) with its type, default, allowed values and meaning.",
        "Each field's description lives in its dataclass's docstring (`Attributes:`); this page is generated",
        "from them and from the packaged [recipes](#recipes). After changing a field or a recipe, run",
        f"`{REGENERATE}`: `tests/test_config_docs.py` fails while this page is stale",
        "or a key has no description.",
        "",
        "## How a config is resolved",
        "",
        "Four layers, each overriding the one before it:",
        "",
        "1. **Defaults**: the values in the tables below.",
        "2. **A recipe**, `--recipe NAME`: a YAML file packaged in `mapsage_ds/recipes/` ([listed below](#recipes)).",
        "3. **A config file**, `--config my.yaml`: YAML of the same shape, for example the `config.yaml` of an",
        "   earlier run.",
        "4. **Overrides**, `--set key.sub=value` (repeatable, applied in order). The value is parsed as YAML:",
        "   `--set eval.tta_scales=[0.75,1.0]`, `--set model.pretrained=null`, `--set optim.lr=1e-4`. The",
        "   shortcuts `--data-root PATH`, `--generate-data` and `--output-dir PATH` are `--set data.root=PATH`,",
        "   `--set data.generate=true` and `--set output_dir=PATH`, applied after every `--set`; the protocol",
        "   shorthands of `evaluate.py` and `predict.py` (`--mode`, `--tile`, ...) are `--set eval.KEY=VALUE`",
        "   applied before them.",
        "",
        "Sections merge key by key: a config file holding `optim: {lr: 1.0e-4}` changes that key and keeps the",
        "recipe's other `optim` keys. Any other value, a list included, is replaced whole. A float may be",
        "written `1e-4`, although YAML 1.1 (PyYAML) reads that as a string.",
        "",
        "### The default recipe, and `--config`",
        "",
        "Given neither `--recipe` nor `--config`, these commands start from a recipe (`evaluate.py`,",
        "`predict.py` and `plan.py` have none):",
        "",
        "| command | default recipe |",
        "|---|---|",
        *default_rows,
        "",
        "**A `--config` file given without `--recipe` takes the default recipe's place**: it is applied to the",
        "defaults of this page, not on top of the default recipe. So `--config my.yaml` alone runs your file",
        "plus these defaults (no generated demo data, no demo model or schedule); to build on a recipe, name it",
        "as well: `--recipe segformer_b5_loveda --config my.yaml`. A run's saved `config.yaml` holds every key,",
        "so `--config runs/x/config.yaml` reproduces that run either way.",
        "",
        "### Errors",
        "",
        "An unknown key stops the command with an error naming the key and the closest valid one",
        "(`unknown config key 'optim.learning_rate'; did you mean 'lr'?`); a value of the wrong type names the",
        "key and the type expected; then every out-of-range value and unknown choice is reported together in",
        "one error. Each exits with status 2 before the run starts.",
        "",
        "### Where the resolved config is kept",
        "",
        "A run writes it to `OUTPUT_DIR/config.yaml` (a file `--config` accepts back) and into every",
        "checkpoint (beside the step and the data position); each export (`best/`, `export/`) holds it as",
        "`mapsage_config.yaml`.",
        "",
        "## Keys",
        "",
        "`type` is the field's annotation, with a nested section named by its dotted key and linked; `default`",
        "is written as YAML writes it (`null` for None). A section that defaults to `null` is off until the",
        "config gives it a mapping: `--set loss.ohem={}` turns it on with its defaults. Items of a list of",
        "sections are spelled `key[].sub`.",
        "",
    ]


def render_config_reference(root: type = Config) -> str:
    """The whole ``docs/config.md``: introduction, every key by section, every packaged recipe.

    Args:
        root: The dataclass to document (the run config).

    Returns:
        The markdown text, ending with one newline.
    """
    lines = _introduction()
    for section in config_sections(root):
        lines += _section_markdown(section)
    lines += ["## Recipes", "",
              "Each packaged recipe, its leading comment, and every key it sets (on top of the defaults).", ""]
    lines += [f"- [`{name}`](#{anchor(f'Recipe `{name}`')})" for name in recipe_names()] + [""]
    for name in recipe_names():
        lines += _recipe_markdown(name)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write ``docs/config.md`` (or with ``--check`` compare it); returns the exit status.

    Args:
        argv: Command-line arguments (``--output PATH``, ``--check``).

    Returns:
        0, or 1 when ``--check`` finds the file stale or a key has no description.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    missing = missing_descriptions()
    if missing:
        print(f"keys without a description (add an 'Attributes:' entry to their dataclass): {', '.join(missing)}",
              file=sys.stderr)
    text = render_config_reference()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is stale: run {REGENERATE}", file=sys.stderr)
            return 1
        return 1 if missing else 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 1 if missing else 0


console = as_console(main, returns_status=True)


if __name__ == "__main__":
    sys.exit(console())
