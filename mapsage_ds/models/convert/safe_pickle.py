"""Open ``torch.save`` checkpoints without running arbitrary pickled code.

A plain state dict opens with ``torch.load(weights_only=True)``. Training checkpoints written by
mmengine's ``Runner`` (mmsegmentation 1.x) also pickle the logging ``MessageHub``: mmengine
``HistoryBuffer`` objects holding numpy arrays and scalars, plus ``getattr(HistoryBuffer, "min")``
style references to its statistics methods. Those globals are refused by ``weights_only``; this
module admits exactly them, through stand-ins of its own, so mmengine need not be installed and
nothing outside the list can run:

- ``mmengine.logging.history_buffer.HistoryBuffer`` -> :class:`HistoryBuffer` (data only);
- ``builtins.getattr`` -> a getattr that answers only ``HistoryBuffer``'s four default statistics
  (a general ``getattr`` would reach ``__globals__`` and from there any module);
- numpy arrays, scalars and dtypes under both the numpy 2 (``numpy._core.*``) and the numpy 1
  (``numpy.core.*``) module names, and the ``numpy.dtypes.*DType`` classes.

Anything else is refused with a :class:`~mapsage_ds.errors.DataError` that names the file, the
offending globals and the command that re-saves the bare state dict from a trusted copy.
"""

from __future__ import annotations

import pickle
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mapsage_ds.errors import DataError, MissingFileError

HISTORY_BUFFER_NAME = "mmengine.logging.history_buffer.HistoryBuffer"
_STATISTICS = ("min", "max", "current", "mean")


class HistoryBuffer:
    """Data-only stand-in for mmengine's ``HistoryBuffer`` (a logged scalar's recent history).

    Attributes:
        max_length: how many values the buffer keeps.
        log_history: the logged values, oldest first.
        count_history: how many samples each logged value averaged over.
    """

    max_length: int
    log_history: np.ndarray
    count_history: np.ndarray

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.max_length = int(state.get("max_length", 0))
        self.log_history = np.asarray(state.get("_log_history", np.zeros(0)))
        self.count_history = np.asarray(state.get("_count_history", np.zeros(0)))

    def __repr__(self) -> str:
        return f"HistoryBuffer(max_length={self.max_length}, {len(self.log_history)} values)"

    # The statistics mmengine registers by default; pickled buffers refer to them by name.
    def min(self) -> float:
        return float(self.log_history.min())

    def max(self) -> float:
        return float(self.log_history.max())

    def current(self) -> float:
        return float(self.log_history[-1])

    def mean(self) -> float:
        return float(self.log_history.mean())


def _restricted_getattr(obj: object, name: str) -> Callable[..., float]:
    """``builtins.getattr`` as far as mmengine checkpoints need it, and no further."""
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refused builtins.getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r})")


def _numpy_globals() -> list[tuple[object, str]]:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    pairs: list[tuple[object, str]] = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar"),
                  (np.ndarray, f"{module}.ndarray"), (np.dtype, f"{module}.dtype")]
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            pairs.append((cls, f"numpy.dtypes.{name}"))
    return pairs


def allowed_globals() -> list[tuple[object, str]]:
    """The ``(object, pickled name)`` pairs admitted beyond torch's own weights-only list."""
    return [(HistoryBuffer, HISTORY_BUFFER_NAME), (_restricted_getattr, "builtins.getattr"), *_numpy_globals()]


def resave_command(path: str | Path) -> str:
    """The one-line command that re-saves a trusted checkpoint's ``state_dict`` as a plain file."""
    path = Path(path)
    out = path.with_name(f"{path.stem}_state_dict.pth")
    code = (f"import torch; torch.save(torch.load({str(path)!r}, weights_only=False)['state_dict'], "
            f"{str(out)!r})")
    quoted = shlex.quote(code) if any(c in code for c in '"$`\\') else f'"{code}"'
    return f"python -c {quoted}"


def load_checkpoint(path: str | Path) -> object:
    """Load a ``torch.save`` file on the CPU without a full unpickle.

    First ``torch.load(weights_only=True)``; if that refuses globals, a second try admits the
    types of mmengine 1.x training checkpoints (see the module docstring) and nothing else.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` file written by ``torch.save``.

    Returns:
        The unpickled object: a state dict, or a dict such as ``{"meta", "state_dict",
        "message_hub", "optimizer", "param_schedulers"}``.

    Raises:
        MissingFileError: ``path`` does not exist.
        DataError: the file is not a readable checkpoint, or it pickles a global outside the
            allow-list (the message names it and the command to re-save the state dict).
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise DataError(f"{path}: expected a checkpoint file, found a directory")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # globals outside torch's list (or not a pickle at all): the second try tells which
    except Exception as error:  # truncated archives and garbage raise RuntimeError, EOFError, ...
        raise DataError(f"{path}: not a readable torch checkpoint, truncated or not written by torch.save "
                        f"({type(error).__name__}: {error})") from error
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            offending = _unsafe_globals(path, str(error))
            if not offending:
                raise DataError(f"{path}: not a readable torch checkpoint: {_first_line(error)}") from error
            raise DataError(
                f"{path}: refused to unpickle global(s) {', '.join(offending)}: loading is weights-only (tensors, "
                f"containers, numpy values and mmengine HistoryBuffer). Only if you trust this file (the command runs "
                f"its pickled code), re-save its state dict and use that file instead:\n  {resave_command(path)}"
            ) from error
        except Exception as error:
            raise DataError(f"{path}: not a readable torch checkpoint ({type(error).__name__}: {error})") from error


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """Globals of the checkpoint outside every allow-list in force (call inside ``safe_globals``)."""
    try:
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files cannot be scanned; torch's message names the first global
        found = []
    found += re.findall(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", message)
    found += re.findall(r"refused (builtins\.getattr\([^)]*\))", message)
    return sorted(set(found))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
