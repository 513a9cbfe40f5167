"""Exceptions raised for bad user input.

Every error names the file, key or value at fault and says what was expected, so that a
misconfigured run stops at once instead of training on the wrong thing.
"""


class MapSageError(Exception):
    """Base class of all MapSage DS errors."""


class ConfigError(MapSageError, ValueError):
    """A configuration key or value is unknown, mistyped or inconsistent."""


class DataError(MapSageError, ValueError):
    """A dataset file is unreadable, mismatched or holds unexpected values."""


class MissingFileError(MapSageError, FileNotFoundError):
    """A file or directory the run needs does not exist."""


class AcceleratorError(MapSageError, RuntimeError):
    """The requested device or collective backend is not available."""
