"""Stand-in for the older XLA-generation ``torch_gcu`` (TopsRider 2.5, torch_gcu 1.10). For tests only.

That package exposes cards as XLA devices through module functions (``torch_gcu.gcu_device()``)
and registers no ``torch.gcu`` namespace and no ``eccl`` process-group backend. This stand-in
imports cleanly and looks like it, so that the test can check that ``mapsage_ds`` refuses it
with a clear message instead of running anything.
"""

__version__ = "1.10.0"


def gcu_device(index: int = 0) -> str:
    """The XLA device string the old package hands out."""
    return f"xla:{index}"


def is_available() -> bool:
    return True
