"""Load local weights into a model by key, with a report of what matched.

Weights never come from the network: ``pretrained`` is a local Hugging Face directory, a
``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` state dict read with
``torch.load(weights_only=True)`` (no arbitrary pickle execution).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

from mapsage_ds.errors import DataError, MissingFileError

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

    def summary(self, max_names: int = 8) -> str:
        """Human-readable report, listing the first few names of every category."""
        def names(items: list) -> str:
            shown = ", ".join(str(i) for i in items[:max_names])
            return shown + (f", ... (+{len(items) - max_names})" if len(items) > max_names else "")

        lines = [f"weights from {self.source}: {len(self.matched)} matched, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.shape_mismatched)} shape-mismatched"]
        if self.missing:
            lines.append(f"  missing (left as initialised): {names(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {names(self.unexpected)}")
        if self.shape_mismatched:
            lines.append("  shape-mismatched (left as initialised): " + names(
                [f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatched]))
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file or HF model directory, on the CPU."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"pretrained weights not found: {path}")
    if path.is_dir():
        return _read_hf_directory(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for bad or unsafe pickles
            raise DataError(f"{path}: cannot be read as a weights-only state dict: {error}") from error
        return _unwrap(data, path)
    raise DataError(f"{path}: unknown weights format; expected a directory, .safetensors, .pth, .pt or .bin")


def _read_hf_directory(path: Path) -> dict[str, torch.Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
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
        with safe_open(str(file), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def _unwrap(data: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside common checkpoint wrappers ({'state_dict': ...})."""
    for _ in range(3):
        if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return data
        if isinstance(data, dict):
            inner = next((data[k] for k in _NESTED_KEYS if isinstance(data.get(k), dict)), None)
            if inner is not None:
                data = inner
                continue
        break
    raise DataError(f"{path}: expected a mapping of parameter names to tensors")


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
