"""Conversion of checkpoints written by other code (NVlabs, mmsegmentation, Meta) into HF layout."""
