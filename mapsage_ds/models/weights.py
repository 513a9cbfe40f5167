"""Load local weights into a model by key, with a report of what matched.

Weights never come from the network: ``pretrained`` is a local Hugging Face directory, a
``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` state dict read with
``torch.load(weights_only=True)`` (no arbitrary pickle execution).

:func:`load_pretrained_state` is the strict loader of training's starting weights (every
backbone tensor required, ZeRO-3 shards filled under a gather and verified);
:func:`load_matching_weights` is the lenient key-by-key copy kept for inspecting checkpoints.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel

from mapsage_ds.errors import DataError, MissingFileError
from mapsage_ds.models.convert.common import list_names

_WRAPPER_PREFIXES = ("module.", "model.")
_NESTED_KEYS = ("state_dict", "model", "module")


@dataclass
class KeyReport:
    """Outcome of matching a checkpoint's keys against a model's."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    # Head tensors of the checkpoint that do not fit this model (another class count): not loaded.
    head_skipped: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def summary(self, max_names: int = 8) -> str:
        """Human-readable report, listing the first few names of every category."""
        def names(items: list) -> str:
            return list_names(items, max_names)

        lines = [f"weights from {self.source}: {len(self.matched)} matched, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.shape_mismatched)} shape-mismatched"]
        if self.missing:
            lines.append(f"  missing (left as initialised): {names(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {names(self.unexpected)}")
        if self.shape_mismatched:
            lines.append("  shape-mismatched (left as initialised): " + names(
                [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatched]))
        if self.head_skipped:
            lines.append(f"  head tensors skipped ({len(self.head_skipped)}, they do not fit this head; trained from "
                         "their initial values): " + names(
                             [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.head_skipped]))
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file or HF model directory, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"pretrained weights not found: {path}")
    if path.is_dir():
        return _read_hf_directory(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if path.suffix in (".pth", ".pt", ".bin"):
        from mapsage_ds.models.convert.safe_pickle import load_checkpoint

        return find_state_dict(load_checkpoint(path), path)
    raise DataError(f"{path}: unknown weights format; expected a directory, .safetensors, .pth, .pt or .bin")


def open_safetensors(path: str | Path, *, device: str = "cpu") -> safe_open:
    """A ``safe_open`` handle on ``path``: its header is read and checked, its tensors memory-mapped.

    The one place this project opens a ``.safetensors`` file: the library's own error (``header too
    large``) names no file.

    Raises:
        MissingFileError: ``path`` does not exist.
        DataError: ``path`` is not a valid safetensors file (the library's reason is in the message),
            or cannot be read.
    """
    try:
        return safe_open(str(path), framework="pt", device=device)
    except FileNotFoundError as error:
        raise MissingFileError(f"safetensors file not found: {path}") from error
    except SafetensorError as error:
        raise DataError(f"{path}: not a valid safetensors file ({error})") from error
    except OSError as error:  # a directory, no read permission
        raise DataError(f"{path}: cannot be read as a safetensors file ({error})") from error


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, on the CPU (errors as :func:`open_safetensors`)."""
    with open_safetensors(path) as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def check_safetensors(directory: str | Path) -> None:
    """Check the header of every ``.safetensors`` file in ``directory`` before transformers reads them.

    ``from_pretrained`` lets the library's error through without the file's name.

    Raises:
        DataError: one of them is not a valid safetensors file.
    """
    for file in sorted(Path(directory).glob("*.safetensors")):
        with open_safetensors(file):
            pass


def _read_hf_directory(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(path / shard))
        return state
    if (path / "pytorch_model.bin").is_file():
        return read_state_dict(path / "pytorch_model.bin")
    raise MissingFileError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin inside")


def checkpoint_keys(path: str | Path) -> list[str]:
    """Tensor names of a local checkpoint without loading the tensors (safetensors headers)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("model*.safetensors"))
    if not files:
        return list(read_state_dict(path))
    keys: list[str] = []
    for file in files:
        with open_safetensors(file) as handle:
            keys.extend(handle.keys())
    return keys


def find_state_dict(data: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint, on its own or under ``state_dict`` / ``model`` / ``module``.

    mmengine's ``{meta, state_dict, ...}`` is found too; a DDP ``module.`` prefix is dropped.
    """
    for _ in range(3):
        if isinstance(data, Mapping) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            state = dict(data)
            if all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
                state = {k.removeprefix("module."): v for k, v in state.items()}
            return state
        if isinstance(data, Mapping):
            inner = next((data[k] for k in _NESTED_KEYS if isinstance(data.get(k), Mapping)), None)
            if inner is not None:
                data = inner
                continue
        break
    raise DataError(f"{path}: expected a mapping of parameter names to tensors (bare, or under "
                    f"{' / '.join(_NESTED_KEYS)})")


def _strip_wrapper_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a DDP/task prefix ('module.', 'model.') when that is what makes keys match."""
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state) and not any(k in model_keys for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _rename_legacy_keys(
    state: dict[str, torch.Tensor], model: nn.Module, model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Map checkpoint names to the model's where transformers renamed its modules.

    transformers 5 renamed SegFormer's modules (``segformer.encoder.block.N`` is now
    ``segformer.stages.N.blocks``) but ``save_pretrained`` and every published checkpoint keep the
    old names; ``from_pretrained`` renames them on load, so we apply the same renamings here.
    """
    try:  # transformers >= 5; with 4.x the module names are the checkpoint names
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return state
    if not isinstance(model, PreTrainedModel):
        return state
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    renamed = {}
    for key, tensor in state.items():
        new_key = key if key in model_keys else rename_source_key(key, renamings, [])[0]
        renamed[new_key if new_key in model_keys else key] = tensor
    return renamed


def load_matching_weights(model: nn.Module, path: str | Path) -> KeyReport:
    """Copy every tensor of ``path`` whose name and shape match into ``model``.

    Returns:
        KeyReport: matched, missing, unexpected and shape-mismatched keys.
    """
    target = model.state_dict()
    state = _strip_wrapper_prefix(read_state_dict(path), set(target))
    state = _rename_legacy_keys(state, model, set(target))
    report = KeyReport(source=str(path))
    loadable = {}
    for key, tensor in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif tensor.shape != target[key].shape:
            report.shape_mismatched.append((key, tuple(tensor.shape), tuple(target[key].shape)))
        else:
            loadable[key] = tensor
            report.matched.append(key)
    report.missing = [k for k in target if k not in state]
    model.load_state_dict(loadable, strict=False)
    return report


# ----------------------------------------------------------------------------------------------
# Strict loading of pretrained weights (every ZeRO stage)


def to_module_names(state: dict[str, torch.Tensor], hf_model: PreTrainedModel, *, prefix: str = "",
                    model_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint (hub) names of ``hf_model``'s tensors as names in the module holding it at ``prefix``.

    Args:
        state: tensors under the HF on-disk names (``segformer.encoder.*``, ``layer.N.*``).
        hf_model: the transformers model the tensors belong to.
        prefix: where ``hf_model`` sits in the trained module (``"backbone."`` for DINOv3).
        model_keys: ``hf_model``'s own state-dict names (default: read from it).
    """
    keys = set(hf_model.state_dict()) if model_keys is None else model_keys
    renamed = _rename_legacy_keys(state, hf_model, keys)
    return {prefix + key: tensor for key, tensor in renamed.items()}


def load_pretrained_state(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, is_head: Callable[[str], bool],
    strict: bool = True,
) -> KeyReport:
    """Copy ``state`` into ``model`` (ZeRO-3 shards included), requiring every backbone tensor.

    Shapes are compared with a parameter's full shape (``ds_shape`` for a ZeRO-3 shard, whose
    own shape is ``(0,)``). Head tensors that do not fit (another class count) are skipped and
    listed; head tensors absent from the checkpoint keep their initial values. Under ZeRO-3 the
    copy runs module by module under ``GatheredParameters(modifier_rank=0)``. Afterwards every
    copied tensor is read back (gathered) and compared with the checkpoint.

    Args:
        model: the module as built (before ``deepspeed.initialize``).
        state: tensors under ``model``'s own state-dict names.
        source: the checkpoint, for messages.
        is_head: whether a name of ``model`` belongs to the (re-initialisable) head.
        strict: False only to inspect a checkpoint (the health check): backbone problems are then
            left in the report for the caller to judge instead of raised.

    Raises:
        DataError: a backbone tensor is missing or shape-mismatched (naming the keys), or the
            weights read back differ from the checkpoint.
    """
    targets = dict(model.state_dict(keep_vars=True))
    report = KeyReport(source=source)
    loadable: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key not in targets:
            report.unexpected.append(key)
            continue
        shape = _full_shape(targets[key])
        if tuple(tensor.shape) != shape:
            bucket = report.head_skipped if is_head(key) else report.shape_mismatched
            bucket.append((key, tuple(tensor.shape), shape))
        else:
            loadable[key] = tensor
            report.matched.append(key)
    report.missing = [k for k in targets if k not in state]
    missing = [k for k in report.missing if not is_head(k)]
    if strict and (missing or report.shape_mismatched):
        raise DataError(f"model.pretrained={source}: backbone keys missing or shape-mismatched: {len(missing)} "
                        f"missing, {len(report.shape_mismatched)} shape-mismatched (no run may start with part of the "
                        f"backbone random)\n" + _key_lines(missing, report))
    _copy_into(model, loadable)
    differing = _differing_after_copy(model, loadable)
    if differing:
        raise DataError(f"model.pretrained={source}: after loading, {len(differing)} tensor(s) differ from the "
                        f"checkpoint: {', '.join(differing[:8])}")
    return report


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    shape = getattr(tensor, "ds_shape", None)  # a ZeRO-3 shard's own shape is (0,)
    return tuple(shape) if shape is not None else tuple(tensor.shape)


def _key_lines(missing: list[str], report: KeyReport, limit: int = 12) -> str:
    lines = []
    if missing:
        shown = ", ".join(missing[:limit]) + (f", ... (+{len(missing) - limit})" if len(missing) > limit else "")
        lines.append(f"  missing: {shown}")
    if report.shape_mismatched:
        shown = ", ".join(f"{k} checkpoint {a} vs model {b}" for k, a, b in report.shape_mismatched[:limit])
        extra = len(report.shape_mismatched) - limit
        lines.append(f"  shape-mismatched: {shown}" + (f", ... (+{extra})" if extra > 0 else ""))
    return "\n".join(lines)


def _by_module(model: nn.Module, names: dict[str, torch.Tensor]) -> Iterator[tuple[list, list]]:
    """Per submodule: its own (name, parameter) and (name, buffer) pairs whose names are in ``names``."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        params = [(prefix + n, p) for n, p in module._parameters.items() if p is not None and prefix + n in names]
        buffers = [(prefix + n, b) for n, b in module._buffers.items() if b is not None and prefix + n in names]
        if params or buffers:
            yield params, buffers


def _gathered(params: list[torch.nn.Parameter], *, modify: bool) -> contextlib.AbstractContextManager:
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


@torch.no_grad()
def _copy_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for params, buffers in _by_module(model, state):
        # Every rank copies the same values; under ZeRO-3 rank 0's are re-partitioned on exit.
        with _gathered([p for _, p in params], modify=True):
            for name, param in params:
                param.data.copy_(state[name])
        for name, buffer in buffers:
            buffer.copy_(state[name])


@torch.no_grad()
def _differing_after_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    differing = []
    for params, buffers in _by_module(model, state):
        with _gathered([p for _, p in params], modify=False):
            for name, tensor in params + buffers:
                expected = state[name].to(device=tensor.device, dtype=tensor.dtype)
                if not torch.equal(tensor.data, expected):
                    differing.append(name)
    return differing
