"""Evaluation: protocol, predictor (whole/slide/TTA/ensemble), sharded loop, metrics, refinement, reports.

Also where evaluated models come from (``sources``) and how predictions are written (``writers``).
"""
