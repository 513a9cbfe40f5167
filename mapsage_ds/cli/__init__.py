"""Commands: one module per command.

Each has ``main(argv)``, which returns its result (for tests and callers), and ``console``, the
console-script entry point, which returns the exit status.
"""

from __future__ import annotations

from collections.abc import Callable


def as_console(main: Callable[[], object], *, returns_status: bool = False) -> Callable[[], int]:
    """The console-script entry point of ``main``: its own status when it returns one, else 0 once done."""

    def console() -> int:
        result = main()
        return int(result) if returns_status else 0

    console.__doc__ = f"Console-script entry point of {main.__module__}."
    return console
