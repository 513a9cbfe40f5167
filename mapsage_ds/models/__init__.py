"""Model builders and weight loading."""

from mapsage_ds.models.factory import build_model, load_exported
from mapsage_ds.models.weights import KeyReport, load_matching_weights, read_state_dict

__all__ = ["KeyReport", "build_model", "load_exported", "load_matching_weights", "read_state_dict"]
